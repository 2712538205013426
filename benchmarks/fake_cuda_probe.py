"""Issue 21, finding 1, on any checkout: two steps of the epoch loop with the model on fake CUDA,
the reader and the epoch built as that version's worker builds them. Prints the first error, or
"no error". Not a test: the fake-CUDA tier is tests/device/test_fake_cuda.py.

    python benchmarks/fake_cuda_probe.py                      # this checkout
    git worktree add /tmp/old 172f4cf && cp -r tests/device /tmp/old/tests/ && \\
        (cd /tmp/old && PYTHONPATH=. python <this checkout>/benchmarks/fake_cuda_probe.py [--move])

`--move`: each batch is moved to the device by hand inside the step, to see what stops next.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import _disable_current_modes

sys.path.insert(0, "tests/device")
import device_tier  # noqa: E402
from hm4sr_dist.batch import Batch  # noqa: E402
from hm4sr_dist.data import ShardReader  # noqa: E402
from hm4sr_dist.objective import build_objective  # noqa: E402
from hm4sr_dist.train.loop import optimizer_step, run_epoch  # noqa: E402


def on_the_host(fn):
    """Host-side cuts read a host tensor's values: run them outside the fake mode (as the tier does)."""
    def wrapped(*args, **kwargs):
        with _disable_current_modes():
            return fn(*args, **kwargs)
    return wrapped


def worker_placement(cfg) -> dict:
    """The placement this version's worker gives its readers and epoch loop ({} before it existed)."""
    try:
        from hm4sr_dist.data.placement import BatchPlacement
        from hm4sr_dist.train.acceleration import placement_for
    except ImportError:
        return {}
    BatchPlacement.shape = on_the_host(BatchPlacement.shape)
    return {"placement": placement_for(cfg, "cuda")}


def main() -> None:
    Batch.trimmed = on_the_host(Batch.trimmed)
    torch.Tensor.backward = lambda self, *a, **k: device_tier.graph_backward(self)   # no CUDA context
    cfg = device_tier.config()
    placed = worker_placement(cfg)
    objective = build_objective(cfg.model, cfg.loss, device_tier.catalog())
    reader = ShardReader(device_tier.write_prepared(Path(tempfile.mkdtemp())), "train", 8, seed=1,
                         max_len=device_tier.MAX_LEN, prefetch_batches=2, **placed)
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
        objective = objective.to("cuda")
        plain = optimizer_step(objective, torch.optim.Adam(objective.parameters()))
        step = (lambda batch: plain(batch.to("cuda"))) if "--move" in sys.argv else plain
        try:
            run_epoch(step, itertools.islice(reader, 2), **placed)
            print("no error: 2 steps on fake CUDA")
        except Exception as exc:                       # the finding: report where it stopped
            frame = [f for f in traceback.extract_tb(exc.__traceback__) if "hm4sr_dist" in f.filename][-1]
            print(f"{type(exc).__name__}: {str(exc).splitlines()[0]}\n"
                  f"  at {frame.filename.split('hm4sr_dist/')[-1]}:{frame.lineno}: {frame.line}")
    reader.close()


if __name__ == "__main__":
    main()
