"""Issue 21, finding 1, on any checkout: two steps of the epoch loop with the model on fake CUDA,
the reader and epoch built as that version's worker builds them. Run from the repository root
(an older checkout: copy tests/device into it first, set PYTHONPATH=.). Prints the first error, or
"no error". Not a test: the fake-CUDA tier is tests/device/test_fake_cuda.py."""
import sys, tempfile, pathlib, itertools, torch
sys.path.insert(0, "tests/device")
from device_tier import write_prepared, config, catalog, MAX_LEN
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from hm4sr_dist.data import ShardReader
from hm4sr_dist.objective import build_objective
from hm4sr_dist.train.loop import optimizer_step, run_epoch
from torch.utils._python_dispatch import _disable_current_modes
from hm4sr_dist.batch import Batch
def outside(f):                       # host-side cuts read host tensors: run them outside the mode
    def g(*a, **k):
        with _disable_current_modes():
            return f(*a, **k)
    return g
Batch.trimmed = outside(Batch.trimmed)
try:
    from hm4sr_dist.data.placement import BatchPlacement
    BatchPlacement.shape = outside(BatchPlacement.shape)
    import device_tier; torch.Tensor.backward = lambda self, *a, **k: device_tier.graph_backward(self)
except ImportError:                   # main: no placement module
    pass
d = write_prepared(pathlib.Path(tempfile.mkdtemp()))
cfg = config()
objective = build_objective(cfg.model, cfg.loss, catalog())
try:                                  # as each version's worker.py builds its reader and epoch
    from hm4sr_dist.train.acceleration import placement_for
    placed = {"placement": placement_for(cfg, "cuda")}
except ImportError:
    placed = {}
reader = ShardReader(d, "train", 8, seed=1, max_len=MAX_LEN, prefetch_batches=2, **placed)
with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
    objective = objective.to("cuda")
    step = optimizer_step(objective, torch.optim.Adam(objective.parameters()))
    try:
        run_epoch(step, itertools.islice(reader, 2), **placed)
        print("no error: 2 steps on fake CUDA")
    except Exception as exc:
        import traceback; tb = traceback.extract_tb(exc.__traceback__)
        where = [f for f in tb if "hm4sr_dist" in f.filename][-1]
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0]}\n  at {where.filename.split('hm4sr_dist/')[-1]}:{where.lineno}: {where.line}")
reader.close()
