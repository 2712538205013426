"""One training epoch and a single-process fit, shared by the tests, the benchmark and the workers.

`train_one_epoch` takes any callable `step(batch) -> LossTerms` so the same loop drives a plain
optimiser here and a DeepSpeed engine inside a Ray Train worker.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.objective import HM4SRObjective, LossTerms, build_objective


def optimizer_step(objective: HM4SRObjective, optimizer: torch.optim.Optimizer,
                   grad_clip: float = 0.0) -> Callable[[Batch], LossTerms]:
    """A plain-PyTorch step: forward (all loss terms), backward, optional clipping, Adam."""
    def step(batch: Batch) -> LossTerms:
        terms = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
        optimizer.step()
        return terms
    return step


def train_one_epoch(step: Callable[[Batch], LossTerms], batches: Iterable[Batch]) -> dict[str, float]:
    """Run `step` over `batches` (each trimmed to its longest sequence); mean terms and throughput."""
    sums: dict[str, float] = {}
    n_batches = n_sequences = 0
    start = time.perf_counter()
    for batch in batches:
        terms = step(batch.trimmed())
        for name, value in terms.scalars().items():
            sums[name] = sums.get(name, 0.0) + value
        n_batches += 1
        n_sequences += len(batch)
    seconds = time.perf_counter() - start
    stats = {name: value / max(n_batches, 1) for name, value in sums.items()}
    return stats | {"seconds": seconds, "sequences_per_s": n_sequences / max(seconds, 1e-9)}


def fit_in_process(cfg: ExperimentConfig, catalog: ItemCatalog, train: Callable[[int], Iterable[Batch]],
                   valid: Iterable[Batch], epochs: int, log: Callable[[str], None] = print
                   ) -> tuple[HM4SRObjective, list[dict]]:
    """Train on one process with Adam at `cfg.optim`; `train(epoch)` yields that epoch's batches."""
    torch.manual_seed(cfg.optim.seed)
    objective = build_objective(cfg.model, cfg.loss, catalog)
    optimizer = torch.optim.Adam(objective.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    step = optimizer_step(objective, optimizer, cfg.optim.grad_clip)
    history = []
    for epoch in range(epochs):
        stats = train_one_epoch(step, train(epoch))
        stats |= {f"valid/{k}": v for k, v in
                  finalize(evaluate_sums(objective.model, valid, cfg.eval.ks, cfg.eval.item_chunk_size), cfg.eval.ks).items()}
        history.append(stats | {"epoch": epoch})
        terms = "  ".join(f"{n} {stats[n]:.3f}" for n in ("main", "cp", "idcl", "pcl") if n in stats)
        log(f"epoch {epoch}: loss {stats['total']:.4f} ({terms})  valid {cfg.eval.valid_metric} "
            f"{stats['valid/' + cfg.eval.valid_metric]:.4f}  {stats['sequences_per_s']:.0f} seq/s")
    return objective, history
