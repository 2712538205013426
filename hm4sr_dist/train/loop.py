"""The training step and epoch, shared by the Ray Train worker, the tests and the benchmarks.

A step function maps a batch to a `StepResult` (the loss terms, the gradient norm, and whether an
optimiser step was taken); `optimizer_step` makes one for a plain torch optimiser,
`hm4sr_dist.train.engine.engine_step` for a DeepSpeed engine. `run_epoch` drives either over
an epoch's batches, keeping the running sums in an `EpochProgress` that a mid-epoch checkpoint
stores, and calls `on_step` after every batch (logging, checkpoints, fault injection live there).

`run_epoch` also times how long it is blocked in `next()` on the batch iterator (reading, or
waiting for the reader's prefetch thread): `EpochProgress.data_wait_seconds`, reported as
`data_wait_fraction` = that time / the epoch's step time (`seconds`: fetch + step, checkpoints and
logging excluded), the share of training time the input pipeline stalls the step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from torch import Tensor

from hm4sr_dist.batch import Batch
from hm4sr_dist.data.placement import BatchPlacement
from hm4sr_dist.objective import HM4SRObjective, LossTerms


@dataclass
class StepResult:
    terms: LossTerms
    grad_norm: Tensor | float = float("nan")   # a device tensor (read when logged, not per step)
    boundary: bool = True              # an optimiser step was taken (False inside accumulation)


@dataclass
class EpochProgress:
    """What an epoch has accumulated so far."""

    batches: int = 0
    sequences: int = 0
    seconds: float = 0.0              # fetching + stepping (on_step time excluded)
    sums: dict = field(default_factory=dict)   # loss term -> running sum (a device tensor while
                                               # training: no host read per step; floats once saved)
    data_wait_seconds: float = 0.0    # of `seconds`, blocked in next() on the batch iterator

    def add(self, terms: LossTerms, sequences: int) -> None:
        for name, value in terms.detached().items():
            self.sums[name] = self.sums.get(name, 0.0) + value.double()
        self.batches += 1
        self.sequences += sequences

    def host_sums(self) -> dict[str, float]:
        """The running sums on the host (one device read for all of them)."""
        names = list(self.sums)
        if not names:
            return {}
        device = next((v.device for v in self.sums.values() if isinstance(v, Tensor)), None)
        stacked = torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float64, device=device)
                               for n in names])
        return dict(zip(names, stacked.tolist()))

    def means(self) -> dict[str, float]:
        """Mean loss terms over the epoch's batches, and `data_wait_fraction` (a ratio, not a
        mean: it rides here so every epoch report carries it as `epoch/data_wait_fraction`)."""
        means = {name: value / max(self.batches, 1) for name, value in self.host_sums().items()}
        return means | {"data_wait_fraction": self.data_wait_fraction()}

    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain numbers (a mid-epoch checkpoint stores it)."""
        return asdict(self) | {"sums": self.host_sums()}


StepFn = Callable[[Batch], StepResult]


def optimizer_step(objective: HM4SRObjective, optimizer: torch.optim.Optimizer,
                   grad_clip: float = 0.0) -> StepFn:
    """A plain-PyTorch step: forward (all loss terms), backward, optional clipping, Adam. Reads
    nothing back to the host (the gradient norm stays a device tensor)."""
    def step(batch: Batch) -> StepResult:
        terms = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        return StepResult(terms, norm.detach())
    return step


def run_epoch(step: StepFn, batches: Iterable[Batch], progress: EpochProgress | None = None,
              on_step: Callable[[StepResult, Batch, EpochProgress], None] | None = None,
              sequences_per_batch: int | None = None,
              placement: BatchPlacement | None = None) -> EpochProgress:
    """Run `step` over `batches`, continuing `progress`. Each batch goes through `placement`
    (default: the CPU, trimmed to its longest sequence); a reader built with the same placement
    hands them over already on the device, and they pass unchanged. `on_step` sees the placed
    batch. The batch iterator is closed on the way out, so a reader's prefetch thread stops even
    when a step raises.

    On a GPU the steps run asynchronously; the epoch's `seconds` end with a synchronisation, so
    they hold its kernels. A host read inside `on_step` (a log line) waits for the queued steps,
    and that wait counts as `on_step` time: between logs the step time is short by at most the
    queue's length.

    `sequences_per_batch` counts the global batch (all ranks) instead of the local one."""
    place = placement or BatchPlacement()
    on_gpu = place.device.type == "cuda" and torch.cuda.is_available()
    progress = progress or EpochProgress()
    batch_iter = iter(batches)
    try:
        last = time.perf_counter()
        while True:
            try:
                batch = next(batch_iter)
            except StopIteration:
                break
            fetched = time.perf_counter()
            progress.data_wait_seconds += fetched - last
            batch = place(batch)
            result = step(batch)
            now = time.perf_counter()
            progress.seconds += now - last
            last = now
            progress.add(result.terms, sequences_per_batch or len(batch))
            if on_step is not None:
                on_step(result, batch, progress)
                last = time.perf_counter()          # checkpoint and logging time is not step time
        if on_gpu:              # the steps are asynchronous: the epoch ends when its kernels do
            torch.cuda.synchronize(place.device)
            progress.seconds += time.perf_counter() - last
    finally:
        close = getattr(batch_iter, "close", None)
        if close is not None:
            close()
    return progress


def fit_in_process(cfg, catalog, train: Callable[[int], Iterable[Batch]], valid: Iterable, epochs: int,
                   log: Callable[[str], None] = print, device: torch.device | str = "cpu"
                   ) -> tuple[HM4SRObjective, list[dict]]:
    """Train on one process with Adam at `cfg.optim` (tests, benchmarks, the GPU acceptance script);
    `train(epoch)` yields that epoch's batches. The same `run_epoch`, placement, precision and
    compile settings as the Ray Train worker (`train.precision`, `train.compile`,
    `data.length_widths`), with a plain optimiser step."""
    from hm4sr_dist.evaluate import evaluate_sums
    from hm4sr_dist.metrics import finalize
    from hm4sr_dist.objective import build_objective
    from hm4sr_dist.train.acceleration import accelerate

    device = torch.device(device)
    torch.manual_seed(cfg.optim.seed)
    objective = build_objective(cfg.model, cfg.loss, catalog).to(device)
    placement = accelerate(objective, cfg, device)
    optimizer = torch.optim.Adam(objective.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step = optimizer_step(objective, optimizer, cfg.optim.grad_clip)
    history = []
    for epoch in range(epochs):
        progress = run_epoch(step, train(epoch), placement=placement)
        stats = progress.means() | {"seconds": progress.seconds,
                                    "sequences_per_s": progress.sequences / max(progress.seconds, 1e-9)}
        valid_sums = evaluate_sums(objective.model, valid, cfg.eval.ks, cfg.eval.item_chunk_size, placement)
        stats |= {f"valid/{k}": v for k, v in finalize(valid_sums, cfg.eval.ks).items()}
        history.append(stats | {"epoch": epoch})
        terms = "  ".join(f"{n} {stats[n]:.3f}" for n in ("main", "cp", "idcl", "pcl") if n in stats)
        log(f"epoch {epoch}: loss {stats['total']:.4f} ({terms})  valid {cfg.eval.valid_metric} "
            f"{stats['valid/' + cfg.eval.valid_metric]:.4f}  {stats['sequences_per_s']:.0f} seq/s")
    return objective, history
