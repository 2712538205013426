"""A run folder: what one finished training run leaves for people and tools to read.

Every runner writes it with `write_run_folder` (a plain job, a study trial, a resumed run, a
trial that reuses another study's Train run) and every reader goes through `read_results`
(`hm4sr-compare`, the study tables and figures, `benchmarks/outcome_figures.py`), so there is one
schema:

    <run folder>/results.json        the summary below (or stopped.json for a run stopped early)
    <run folder>/per_user_test.npz   every test user's rank (`user`, `rank`): paired comparisons

results.json keys: `dataset`, `variant`, `setting`, `seed`, `identity` (the run identity hash,
`train/identity.py`), `study` (or null), `test` (metric -> value, `count`), `best_valid`,
`best_epoch`, `epochs_run`, `resumed_at_steps`, `wall_seconds`, `train_seconds`, `diagnostics`
(MoE / routing), `history` (one row per epoch: loss terms, validation metrics), `data_manifest`,
`train_run` (the Ray Train run's name) and `checkpoint`, `code` + `code_history` (which code
trained it), `notes`, `config` (the resolved config tree) and, for a stopped run, `status`,
`stopped_by`, `epochs`.

The Ray Train run itself (checkpoints, TensorBoard, run_identity.json) lives under
`train.storage_path/<train run name>`, named by `train_run_name`: one Train run per identity and
data set, shared by every job and study that trains the same thing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

RESULTS_FILE = "results.json"
PER_USER_FILE = "per_user_test.npz"
STOPPED_FILE = "stopped.json"          # a run stopped early: its summary, not a result
FINAL_METRICS_FILE = "final_metrics.json"
REQUIRED_KEYS = ("dataset", "identity", "test", "best_valid", "best_epoch", "epochs_run", "history",
                 "config", "train_run")


class RunFolderError(ValueError):
    """A run folder that cannot be read as one; names the file."""


def train_run_name(dataset: str, identity_hash: str) -> str:
    """The Ray Train run's name when `train.run_name` is not set: the data set and the run identity,
    so an unchanged re-run resumes, and a study trial and a plain job of the same config share it."""
    return f"{dataset}-{identity_hash[:12]}"


def _history(checkpoint: Path) -> list[dict]:
    """Per-epoch numbers from the checkpoint's TrainState (loss terms, validation metrics)."""
    import torch

    try:
        state = torch.load(checkpoint / "train_state.pt", weights_only=False, map_location="cpu")
    except (OSError, RuntimeError):
        return []
    keep = ("epoch/", "valid/", "best")
    return [{k: v for k, v in h.items()
             if (k == "epoch" or k.startswith(keep)) and isinstance(v, (int, float))}
            for h in state.get("history", [])]


def _replace(path: Path, write) -> None:
    """Write `path` through a hidden file beside it and rename it into place: whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")     # two writers never share one
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_folder(run_dir: Path, checkpoint: Path, *, config: dict, dataset: str, identity: str,
                     fingerprint: str | None, wall_seconds: float, checkpoint_uri: str | None = None,
                     code: dict | None = None, variant: str | None = None, setting: str | None = None,
                     seed: int | None = None, study: str | None = None, notes: list | None = None,
                     counts: dict | None = None, extra: dict | None = None) -> dict:
    """Write the run folder of a finished Train run from its final checkpoint (a local folder):
    results.json + per_user_test.npz, or stopped.json alone for a run stopped early. Each file is
    renamed into place whole, results.json after the ranks it summarises; other files in `run_dir`
    are left alone. Returns the summary."""
    run_dir = Path(run_dir)
    final = json.loads((checkpoint / FINAL_METRICS_FILE).read_text())
    stopped = bool(final.get("stopped_early"))
    history = _history(checkpoint)
    results = {
        "dataset": dataset, "variant": variant or setting, "setting": setting or variant, "seed": seed,
        "identity": identity, "study": study,
        "test": {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("test/")},
        "best_valid": final.get("best_valid"), "best_epoch": final.get("best_epoch"),
        "epochs_run": final.get("epochs_run"), "resumed_at_steps": final.get("resumed_at_steps"),
        "wall_seconds": wall_seconds,
        "train_seconds": sum(h.get("epoch/seconds", 0.0) for h in history),
        "diagnostics": {k: v for k, v in final.items() if k.startswith(("moe/", "routing/"))},
        "history": history,
        "data_manifest": {"path": config["data"]["prepared_dir"], "fingerprint": fingerprint,
                          **({"counts": counts} if counts else {})},
        "train_run": config["train"]["run_name"], "checkpoint": checkpoint_uri,
        **(code or {"code": None, "code_history": []}),
        "notes": list(notes or []),
        **(extra or {}),
        "config": config,
    }
    if stopped:    # its test metrics are of an under-trained run: kept for reading, out of the tables
        results |= {"status": "stopped", "stopped_by": final.get("stopped_by"),
                    "epochs": config["optim"]["epochs"]}
    # Only the files this module owns are replaced, each atomically, and results.json last: the
    # folder may be shared (the quickstart's workdir holds its raw data, shards and Train runs).
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_file = STOPPED_FILE if stopped else RESULTS_FILE
    for stale in (RESULTS_FILE, PER_USER_FILE) if stopped else ():
        (run_dir / stale).unlink(missing_ok=True)        # an under-trained run leaves no result
    if not stopped:
        _replace(run_dir / PER_USER_FILE, lambda tmp: shutil.copyfile(checkpoint / PER_USER_FILE, tmp))
    _replace(run_dir / summary_file,
             lambda tmp: tmp.write_text(json.dumps(results, indent=2, default=str)))
    if not stopped:
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)
    return results


def read_results(run_dir: str | Path, file: str = RESULTS_FILE, strict: bool = True) -> dict:
    """A run folder's results.json (or `file`, e.g. stopped.json), checked to hold the schema's keys
    (`strict=False`: only `config` and `test`, what a comparison needs, so hand-made or older
    folders still compare); raises RunFolderError naming the file and what is missing."""
    path = Path(run_dir) / file
    try:
        results = json.loads(path.read_text())
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(results, dict):
        raise RunFolderError(f"{path}: expected a JSON object")
    missing = [k for k in (REQUIRED_KEYS if strict else ("config", "test")) if k not in results]
    if missing:
        raise RunFolderError(f"{path}: missing {', '.join(missing)} (not written by "
                             "hm4sr_dist.run_folder.write_run_folder)")
    if not isinstance(results["config"], dict) or not isinstance(results["test"], dict):
        raise RunFolderError(f"{path}: 'config' and 'test' must be objects")
    return results
