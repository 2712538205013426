"""Training progress that a checkpoint must carry besides the DeepSpeed engine's own state."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class TrainState:
    epoch: int = 0                   # next epoch to run
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list = field(default_factory=list)   # per-epoch metrics

    def as_dict(self) -> dict:
        return asdict(self)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def save_worker_files(folder: Path, rank: int, state: TrainState, best_model: dict | None) -> None:
    """Per-rank RNG state on every rank; progress and best weights (plain fp32) on rank 0."""
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(state.as_dict(), folder / "train_state.pt")
        if best_model is not None:
            torch.save(best_model, folder / "best_model.pt")


def load_worker_files(folder: Path, rank: int) -> tuple[TrainState, dict | None]:
    state = TrainState(**torch.load(folder / "train_state.pt", weights_only=False))
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():                       # a resize of the worker group has no file for new ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    best = folder / "best_model.pt"
    return state, (torch.load(best, weights_only=True) if best.exists() else None)
