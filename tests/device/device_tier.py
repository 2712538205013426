"""The device tier: the production training path checked on a CUDA device, fake or real.

The same checks run twice: `test_fake_cuda.py` on every CPU machine (CI included) under
`FakeTensorMode`, whose `device="cuda"` tensors carry shapes, dtypes and devices but no data and
raise `FakeTensorDeviceMismatchError` on any op mixing devices; and `test_gpu.py` (`-m gpu`) on a
real GPU, where values exist and are compared with the CPU.

Under `FakeTensorMode` (with a `ShapeEnv`) any read of a tensor's value on the host -- `float(t)`,
`t.item()`, boolean indexing (a data-dependent shape) -- raises too, so a check that passes
proves the code it drives computes without a host read.

One gap of fake CUDA: PyTorch's autograd engine needs a real CUDA context to run a backward pass
over CUDA tensors (pytorch#92627: "During the backward, we assume that the full cuda context is
initialized"). `graph_backward` therefore walks the autograd graph itself -- every node's own
backward formula, custom `autograd.Function`s included, with the engine's checks of each
gradient's device, shape and dtype -- and `Device.backward` installs it as `Tensor.backward` in
fake mode, so the production step (`optimizer_step`) runs unchanged. On the CPU it gives the
engine's gradients (`test_graph_backward_matches_the_engine`).
"""

from __future__ import annotations

import io
import json
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.data.manifest import MANIFEST_NAME, SCHEMA_VERSION, SHARD_DIR, sha256_file
from hm4sr_dist.data.records import encode_user, split_count, user_key
from hm4sr_dist.model import ItemCatalog
from hm4sr_dist.model.time import max_bucket_for

N_ITEMS, MAX_LEN, TXT_W, IMG_W, N_CAT = 40, 12, 6, 5, 4
T0 = 1_600_000_000


# -- data: a prepared folder written directly (no Ray: the GPU box has none) ----------------------

def write_prepared(root: Path, n_users: int = 48, n_shards: int = 3, seed: int = 0) -> Path:
    """Users of 4..16 actions over N_ITEMS items, gaps from seconds to weeks, as shards + manifest
    (IDs and times only, as Beauty: the text, image and category tables are `catalog()`'s)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 17, n_users)
    (root / SHARD_DIR).mkdir(parents=True)
    entries = []
    for s in range(n_shards):
        users = list(range(s, n_users, n_shards))
        name = f"shard-{s:05d}.tar"
        with tarfile.open(root / SHARD_DIR / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for u in users:
                n = int(lengths[u])
                items = rng.integers(1, N_ITEMS + 1, n)
                times = T0 + np.cumsum(rng.choice([0, 5, 3600, 86400, 9 * 86400], n))
                payload = encode_user(items, times)
                info = tarfile.TarInfo(f"{user_key(u)}.seq.npy")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        path = root / SHARD_DIR / name
        entries.append({"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                        "users": len(users), "actions": int(sum(lengths[u] for u in users)),
                        **{sp: int(sum(split_count(int(lengths[u]), sp) for u in users))
                           for sp in ("train", "valid", "test")}})
    manifest = {"schema_version": SCHEMA_VERSION, "max_len": MAX_LEN, "shards": entries,
                "counts": {"users": n_users, "items": N_ITEMS, "actions": int(lengths.sum())},
                "time": {"min": T0, "max": T0 + 200 * 86400, "n_days": 200},
                "interval": {"mu": 100.0, "max_train_interval_seconds": 9 * 86400,
                             "max_train_bucket": max_bucket_for(9 * 86400, 100.0)}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def catalog(seed: int = 0) -> ItemCatalog:
    """Text, image and category tables for the N_ITEMS items (row 0 the zero padding item)."""
    g = torch.Generator().manual_seed(seed)
    text, image = torch.randn(N_ITEMS + 1, TXT_W, generator=g), torch.randn(N_ITEMS + 1, IMG_W, generator=g)
    cats = torch.rand(N_ITEMS + 1, N_CAT, generator=g) < 0.4
    text[0] = image[0] = 0
    cats[0] = False
    return ItemCatalog(n_items=N_ITEMS, text_features=text, image_features=image, categories=cats,
                       max_interval_bucket=max_bucket_for(9 * 86400, 100.0), time_origin=T0, n_days=200)


def config(**overrides) -> ExperimentConfig:
    """A tiny HM4SR with every module and all four loss terms; `overrides` are dotted keys."""
    cfg = ExperimentConfig()
    m = cfg.model
    m.hidden_size, m.inner_size, m.max_seq_len, m.n_heads = 8, 16, MAX_LEN, 2
    m.n_interactive_experts = m.n_temporal_experts = 3
    cfg.optim.batch_size, cfg.eval.batch_size = 8, 8
    cfg.train.num_workers = 1
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


# -- the device ------------------------------------------------------------------------------------

@dataclass
class Device:
    """Where the checks run: fake CUDA (no data, no GPU) or a real one."""

    name: str = "cuda"
    fake: bool = True

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.name)

    @contextmanager
    def mode(self, monkeypatch=None):
        """Inside: tensors made on `name` are fake; on a real device nothing changes. Fake mode
        needs `monkeypatch` for two stand-ins: `Tensor.backward` walks the graph (`graph_backward`),
        and `BatchPlacement.shape`, the host-side cut of a reader's batch (which reads its lengths,
        a host tensor), runs outside the mode, as on a real machine, where host tensors have values.
        And CUDA autocast, which switches itself off where no GPU is present, is told one is."""
        if not self.fake:
            yield
            return
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        from torch.utils._python_dispatch import _disable_current_modes

        from hm4sr_dist.data.placement import BatchPlacement

        shape = BatchPlacement.shape

        def host_shape(placement, batch):
            with _disable_current_modes():
                return shape(placement, batch)

        monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: graph_backward(self))
        monkeypatch.setattr(BatchPlacement, "shape", host_shape)
        monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
            yield


def graph_backward(loss: Tensor) -> None:
    """`loss.backward()` without the autograd engine: visit the graph's nodes in topological order,
    call each node's backward (`apply` for custom Functions), check each gradient's device against
    the input it belongs to (as the engine does), reduce broadcast shapes and cast dtypes, and
    accumulate into the leaves' `.grad`."""
    order, seen = [], set()

    def visit(fn) -> None:                       # iterative DFS: graphs are thousands of nodes deep
        stack = [(fn, False)]
        while stack:
            node, done = stack.pop()
            if node is None:
                continue
            if done:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions)

    visit(loss.grad_fn)
    pending = {loss.grad_fn: {0: torch.ones_like(loss)}}
    for fn in reversed(order):                  # reversed post-order: every consumer before its inputs
        given = pending.pop(fn, None)
        if given is None:
            continue
        if type(fn).__name__ == "AccumulateGrad":
            var, g = fn.variable, given[0]
            _check_device(g, var.device, "a leaf")
            g = g.sum_to_size(var.shape).to(var.dtype)
            var.grad = g if var.grad is None else var.grad + g
            continue
        grads = [given.get(i, None) if given.get(i, None) is not None else
                 torch.zeros(m.shape, dtype=m.dtype, device=m.device) for i, m in enumerate(fn._input_metadata)]
        outs = fn.apply(*grads) if hasattr(fn, "apply") else fn(*grads)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, index), g in zip(fn.next_functions, outs):
            if nxt is None or g is None:
                continue
            if hasattr(nxt, "_input_metadata"):
                meta = nxt._input_metadata[index]
                _check_device(g, meta.device, type(fn).__name__)
                if tuple(g.shape) != tuple(meta.shape):
                    g = g.sum_to_size(meta.shape)
                g = g.to(meta.dtype)
            slot = pending.setdefault(nxt, {})
            slot[index] = g if index not in slot else slot[index] + g


def _check_device(grad: Tensor, expected: torch.device, where: str) -> None:
    if grad.device != expected:
        raise RuntimeError(f"{where}: gradient on {grad.device}, its input is on {expected}")


# -- the checks (test_fake_cuda.py and test_gpu.py run them) ---------------------------------------

@dataclass
class EpochRun:
    objective: object
    optimizer: torch.optim.Optimizer
    placement: object
    progress: object
    steps: list                      # (StepResult, placed Batch) per step


def train_steps(dev: Device, prepared: Path, monkeypatch=None, precision: str = "fp32", steps: int = 3,
                objective=None, **overrides) -> EpochRun:
    """The worker's training path on `dev`: the reader with the run's placement, `run_epoch`, the
    plain-Adam `optimizer_step` (forward with all four loss terms, backward, clipping, Adam)."""
    from itertools import islice

    from hm4sr_dist.data import ShardReader
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.train.acceleration import apply_precision, placement_for
    from hm4sr_dist.train.loop import optimizer_step, run_epoch

    cfg = config(**overrides)
    objective = objective or build_objective(cfg.model, cfg.loss, catalog())      # built on the CPU
    seen = []
    with dev.mode(monkeypatch):
        objective = objective.to(dev.name)
        apply_precision(objective, precision)
        placement = placement_for(cfg, dev.name)
        reader = ShardReader(prepared, "train", cfg.micro_batch_size, seed=1, max_len=MAX_LEN,
                             prefetch_batches=2, placement=placement)
        try:
            optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3)
            step = optimizer_step(objective, optimizer, grad_clip=1.0)
            progress = run_epoch(step, islice(reader, steps), placement=placement,
                                 on_step=lambda result, batch, _: seen.append((result, batch)))
        finally:
            reader.close()
    return EpochRun(objective, optimizer, placement, progress, seen)


def assert_on(tensor: Tensor, device: torch.device, dtype: torch.dtype | None = None, what: str = "") -> None:
    assert tensor.device.type == device.type, f"{what} on {tensor.device}, expected {device}"
    if dtype is not None:
        assert tensor.dtype == dtype, f"{what}: {tensor.dtype}, expected {dtype}"
