"""Training progress that a checkpoint must carry besides the DeepSpeed engine's own state.

A checkpoint is taken at an epoch end or, every `train.checkpoint_every_steps`, in the middle of
an epoch. Rank 0 writes the shared progress (`TrainState`, with the epoch's running loss sums) and
the best weights; every rank writes its own RNG state and its reader position, so a resumed run
draws the same dropout masks and the same batches as the uninterrupted one. Under
`loss.main_loss=vocab_parallel` every rank also writes its item-table slice with its Adam state and
its best-weights slice (`table_rank<r>.pt`); a resume on another number of ranks re-cuts them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hm4sr_dist.run_folder import FINAL_METRICS_FILE
from hm4sr_dist.train.loop import EpochProgress


@dataclass
class TrainState:
    epoch: int = 0                   # the epoch running (mid-epoch checkpoint) or next to run
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list = field(default_factory=list)   # per-epoch metrics
    progress: dict | None = None     # EpochProgress of `epoch` when the checkpoint is mid-epoch
    resumed_at: list = field(default_factory=list)   # global step of every resume, in order

    def as_dict(self) -> dict:
        return asdict(self)

    def epoch_progress(self) -> EpochProgress | None:
        return EpochProgress(**self.progress) if self.progress else None


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


def save_worker_files(folder: Path, rank: int, state: TrainState, best_model: dict | None,
                      reader_state: dict | None = None) -> None:
    """Per-rank RNG state and reader position on every rank; progress and best weights on rank 0."""
    torch.save({"rng": rng_state(), "reader": reader_state}, folder / f"rank{rank}.pt")
    if rank == 0:
        torch.save(state.as_dict(), folder / "train_state.pt")
        if best_model is not None:
            torch.save(best_model, folder / "best_model.pt")


TABLE_FILE = "table_rank{}.pt"


def save_table_shard(folder: Path, rank: int, state: dict) -> None:
    """This rank's `vocab.ShardAdam.state_dict` (slice, bounds, Adam, best slice)."""
    torch.save(state, folder / TABLE_FILE.format(rank))


def has_table_shards(folder: Path) -> bool:
    return any(Path(folder).glob(TABLE_FILE.format("*")))


def load_table_shard(folder: Path, rank: int, world_size: int) -> dict:
    """This rank's table state for a world of `world_size`: its own file when the checkpoint was
    saved by as many ranks, else every rank's file re-cut (`vocab.reslice_states`). Raises
    ValueError naming the reason when the checkpoint has no (or incomplete) slices."""
    from hm4sr_dist.parallel.vocab import reslice_states

    own = Path(folder) / TABLE_FILE.format(rank)
    if own.exists():
        state = torch.load(own, map_location="cpu", weights_only=False)
        if state["world_size"] == world_size:
            return state
    files = sorted(Path(folder).glob(TABLE_FILE.format("*")))
    if not files:
        raise ValueError(f"{folder} has no item-table slices ({TABLE_FILE.format('<r>')}): the run was "
                         "not trained with loss.main_loss=vocab_parallel and cannot be resumed with it")
    return reslice_states([torch.load(f, map_location="cpu", weights_only=False) for f in files], rank, world_size)


def load_worker_files(folder: Path, rank: int) -> tuple[TrainState, dict | None, dict | None]:
    """(progress, best weights, this rank's reader state or None); restores this rank's RNG."""
    state = TrainState(**torch.load(folder / "train_state.pt", map_location="cpu", weights_only=False))
    reader_state = None
    rank_file = folder / f"rank{rank}.pt"
    if rank_file.exists():                      # a resize of the worker group has no file for new ranks
        saved = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(saved["rng"])
        reader_state = saved.get("reader")
    best = folder / "best_model.pt"
    best_model = torch.load(best, map_location="cpu", weights_only=True) if best.exists() else None
    return state, best_model, reader_state


def stored_train_state(run_dir: str) -> TrainState | None:
    """Rank 0's progress in the checkpoint a resume would start from (local path or URI), or None
    for a run with no readable checkpoint; read in the driver, before Ray Train starts."""
    found = _resume_checkpoint(run_dir)
    return found[2] if found else None


def finished_checkpoint(run_dir: str, epochs: int, patience: int):
    """The Train run's final checkpoint (a `ray.train.Checkpoint`) when resuming it would train
    nothing (its last checkpoint is the final one, of a run that reached `epochs` or early-stopped
    with `patience`), else None: a caller can read its results without starting Ray Train."""
    import json
    import posixpath

    import ray.train

    found = _resume_checkpoint(run_dir)
    if found is None:
        return None
    fs, folder, state = found
    if state.epoch > epochs:                           # trained longer: the epoch-cap refusal's case
        return None
    if state.epoch < epochs and state.epochs_without_improvement < patience:
        return None
    try:
        with fs.open_input_stream(posixpath.join(folder, FINAL_METRICS_FILE)) as stream:
            final = json.loads(stream.read())
    except (OSError, ValueError):
        return None                                    # an epoch checkpoint, or one half-written
    if not final.get("finished") or final.get("stopped_early"):
        return None
    return ray.train.Checkpoint(folder, filesystem=fs)


def _resume_checkpoint(run_dir: str):
    """(filesystem, checkpoint folder, its TrainState) of the checkpoint a resume would start from.

    Ray resumes from the latest reported checkpoint, which its `checkpoint_manager_snapshot.json`
    names; without a readable snapshot, the newest by folder name. A checkpoint still being
    written (no or a truncated `train_state.pt`) is passed over for the one before it."""
    import io
    import json
    import posixpath

    import pyarrow.fs as pafs

    from hm4sr_dist.train.identity import run_filesystem

    fs, path = run_filesystem(run_dir)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    # checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>: newest last in name order
    names = sorted((i.base_name for i in found if i.base_name.startswith("checkpoint_")), reverse=True)
    try:
        with fs.open_input_stream(posixpath.join(path, "checkpoint_manager_snapshot.json")) as stream:
            latest = json.loads(stream.read())["latest_checkpoint_result"]["checkpoint_dir_name"]
        names = [latest] + [n for n in names if n != latest]
    except Exception:  # noqa: BLE001 - no snapshot, or a Ray version that writes it otherwise
        pass
    for name in names:
        folder = posixpath.join(path, name)
        try:
            with fs.open_input_stream(posixpath.join(folder, "train_state.pt")) as stream:
                return fs, folder, TrainState(**torch.load(io.BytesIO(stream.read()), map_location="cpu",
                                                                  weights_only=False))
        except (OSError, RuntimeError, EOFError, TypeError):
            continue                                   # missing or half-written: an older one
    return None


def epoch_cap_error(cfg, state: TrainState | None) -> str | None:
    """The refusal when the run already trained more epochs than `optim.epochs` allows, else None.
    optim.epochs is not part of the run identity (a longer cap continues a run), but a shorter one
    cannot be honoured: the stored best weights may come from an epoch it never reaches."""
    if state is None or state.epoch <= cfg.optim.epochs:
        return None
    return (f"optim.epochs={cfg.optim.epochs}: run {cfg.train.run_name} has already trained {state.epoch} "
            f"epochs (best validation epoch {state.best_epoch}), so its results are not those of a "
            f"{cfg.optim.epochs}-epoch run; use optim.epochs>={state.epoch} to report this run, or another "
            "train.run_name (or storage) for a fresh one")
