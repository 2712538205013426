"""Stopping a Tune trial's Ray Train run cleanly: the stop-request marker (no Ray import: the Train
workers read it).

When a Tune scheduler returns STOP, Tune stops the trial actor at once. The Train controller and
its workers are owned by that actor and die with it mid-epoch: no final checkpoint, no test
metrics, no per-user ranks; the worker group's placement group is left to Ray's detached
`PlacementGroupCleaner` (in the Ray we pin; older Rays left it behind, ray#54305). Ray Train V2
has no call that asks a running worker group to end its loop.

So `GracefulASHA` (hm4sr_dist/study/asha.py) turns ASHA's STOP into a *stop request*: a small JSON
marker, `stop_requested.json`, in the Train run's folder (under `train.storage_path`: a path every
node sees, or a URI), and lets the trial continue. Every worker checks the marker after its epoch-end
checkpoint (`hm4sr_dist.train.worker`); once any rank sees it, all ranks leave the epoch loop
together and the run ends the way a finished one does: a final checkpoint with the best weights'
test metrics, marked `stopped_early` / `stopped_by`. The controller then shuts its worker group and
placement group down itself, and the Tune trial ends normally (TERMINATED, not ERROR).

The request lands one epoch late at most (the worker is already in the next epoch while Tune
decides), and a request that arrives during the last epoch changes nothing. The trial function
clears a stale marker before it fits (`clear_stop`), so a later study that trains the same Train
run again continues it from its last checkpoint instead of stopping at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hm4sr_dist.train.identity import run_filesystem

STOP_FILE = "stop_requested.json"


def stop_file(storage: str, run_name: str) -> str:
    """The marker's path in the Train run folder `<storage>/<run_name>` (storage: a path or a URI)."""
    if "://" in storage:
        return f"{storage.rstrip('/')}/{run_name}/{STOP_FILE}"
    return os.path.join(os.path.abspath(storage), run_name, STOP_FILE)


def worker_stop_file(storage: str, run_name: str, run_dir: str | Path) -> str:
    """Where a worker looks: its run folder (absolute; a worker's working directory is Train's
    own) for a local storage, the run's folder under the URI otherwise (run_dir is node-local)."""
    return stop_file(storage, run_name) if "://" in storage else os.path.join(str(run_dir), STOP_FILE)


def request_stop(path: str, **why) -> None:
    """Write the marker (atomically on a local disk: a reader never sees half of it)."""
    text = json.dumps({"time": time.time(), **why}, default=str)
    if "://" in path:
        fs, inner = run_filesystem(path)
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def stop_request(path: str) -> dict | None:
    """The marker's content when a stop was requested, else None."""
    try:
        if "://" in path:
            fs, inner = run_filesystem(path)
            with fs.open_input_stream(inner) as f:
                text = f.read().decode()
        else:
            text = Path(path).read_text()
    except (FileNotFoundError, OSError):
        return None
    try:
        return json.loads(text) or {}
    except ValueError:
        return {}                                         # present but unreadable: still a request


def clear_stop(path: str) -> None:
    if "://" in path:
        fs, inner = run_filesystem(path)
        try:
            fs.delete_file(inner)
        except (FileNotFoundError, OSError):
            pass
        return
    Path(path).unlink(missing_ok=True)
