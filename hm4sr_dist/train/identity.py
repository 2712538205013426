"""Run identity: a run folder belongs to one resolved configuration and one data set.

A re-run with the same `train.run_name` resumes the stored run only if everything that shapes its
results is the same: the resolved config (minus the keys in `NOT_IDENTITY`, which only say where
and how long to run) and the prepared data's fingerprint. Anything else stops with one line that
names the differing keys, so a changed loss weight can never be answered with the old run's
metrics. The identity is written as `run_identity.json` in the run folder (local path or URI).

    ident = run_identity(cfg, data_fingerprint)      # {"hash": ..., "config": {...}}
    check_or_record(run_dir, ident, allow_change=cfg.train.allow_config_change)
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys

from hm4sr_dist.config import ConfigError, ExperimentConfig, flatten, to_dict

IDENTITY_FILE = "run_identity.json"

# Keys that do not change what a run computes: where it is stored, its name, how long it may run
# (a longer cap continues a run), how often it logs or checkpoints, how it survives failures.
NOT_IDENTITY = (
    "name", "data.prepared_dir", "optim.epochs", "train.run_name", "train.storage_path",
    "train.tensorboard_dir", "train.tracking_uri", "train.max_failures", "train.checkpoints_to_keep",
    "train.log_every_steps",
    "train.checkpoint_every_steps", "train.fail_at_step", "train.cpus_per_worker",
    "train.allow_config_change", "eval.batch_size", "eval.item_chunk_size",
    "data.prefetch_batches",        # the same batches in the same order, read ahead or not
)


# Keys added after runs already existed, with the value that reproduces what those runs computed.
# At that value a key is left out of the identity, and a stored run without it counts as having it,
# so adding a key never changes an existing run's hash (nor a study's trial keys).
LEGACY_VALUES = {
    "loss.cp_reduction": "per_element",
    "train.compile": "auto",          # eager, as every run before the key existed
    "data.length_widths": [],         # each batch at its longest sequence, as before
}

# Keys that cannot change a run's results under its resolved config: left out of the identity.
INERT_WHEN = {
    "loss.cp_reduction": lambda flat: flat.get("loss.cp_weight", 0) == 0,
}


class RunIdentityError(ConfigError):
    """A run folder holds a run of a different configuration or data set."""


def run_identity(cfg: ExperimentConfig, data_fingerprint: str | None) -> dict:
    """The keys that define a run's results, and their hash."""
    flat = _identity_keys(flatten(to_dict(cfg)))
    flat["data.fingerprint"] = data_fingerprint or ""
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    return {"hash": digest[:16], "config": flat}


def _identity_keys(flat: dict) -> dict:
    return {k: v for k, v in flat.items()
            if k not in NOT_IDENTITY and LEGACY_VALUES.get(k, object()) != v
            and not (k in INERT_WHEN and INERT_WHEN[k](flat))}


def default_identity_config() -> dict:
    """What a key missing from a stored run stands for: its legacy value (the behaviour before the
    key existed) where one is listed, else its default."""
    return {**flatten(to_dict(ExperimentConfig())), **LEGACY_VALUES}


def differences(stored: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """`key: stored -> current` for every key that differs (keys missing on one side included).
    With `defaults`, a key one side does not have (added by a newer version, or left out at its
    legacy value) counts as at its value there, so a run started before the key existed resumes."""
    keys = sorted(set(stored) | set(current))
    missing = "<absent>"
    old = lambda k: stored.get(k, (defaults or {}).get(k, missing))      # noqa: E731
    new = lambda k: current.get(k, (defaults or {}).get(k, missing))     # noqa: E731
    return [f"{k}: {old(k)!r} -> {new(k)!r}" for k in keys if old(k) != new(k)]


def run_filesystem(run_dir: str):
    """(pyarrow filesystem, path inside it) for a local folder or a URI (s3://, gs://, file://)."""
    import pyarrow.fs as pafs
    if "://" in run_dir:
        return pafs.FileSystem.from_uri(run_dir)
    return pafs.LocalFileSystem(), run_dir


def read_identity(run_dir: str) -> dict | None:
    import pyarrow.fs as pafs
    fs, path = run_filesystem(run_dir)
    file = posixpath.join(path, IDENTITY_FILE)
    if fs.get_file_info(file).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(file) as stream:
        return json.loads(stream.read().decode())


def _has_run(run_dir: str) -> bool:
    import pyarrow.fs as pafs
    fs, path = run_filesystem(run_dir)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return False
    return any(i.base_name.startswith("checkpoint_")
               for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def write_identity(run_dir: str, identity: dict) -> None:
    fs, path = run_filesystem(run_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(posixpath.join(path, IDENTITY_FILE)) as stream:
        stream.write(json.dumps(identity, indent=2, sort_keys=True, default=str).encode())


def check_or_record(run_dir: str, identity: dict, allow_change: bool = False,
                    code: dict | None = None) -> str:
    """Record the identity of a new run, accept a matching one; raise on a clash (writing nothing).

    With `code` (`code_version.code_version()`), also record which code runs it: a resume by other
    code prints one line naming both versions and keeps the earlier ones under `code_history`.
    Returns "new", "same" or "changed" (a clash accepted with `allow_change`)."""
    status, stored = check_identity(run_dir, identity, allow_change)
    record_identity(run_dir, identity, status, stored, code)
    return status


def check_identity(run_dir: str, identity: dict, allow_change: bool = False) -> tuple[str, dict | None]:
    """("new" | "same" | "changed", the stored identity or None); raises on a clash. Writes nothing."""
    stored = read_identity(run_dir)
    if stored is None:
        if _has_run(run_dir) and not allow_change:
            raise RunIdentityError(
                f"train.run_name: {run_dir} holds checkpoints but no {IDENTITY_FILE} (a run of an older "
                f"version), so it cannot be resumed safely; start fresh with another train.run_name "
                f"(or delete the folder), or resume it on purpose with train.allow_config_change=true")
        return "new", None
    if stored["hash"] == identity["hash"]:
        return "same", stored
    diff = differences(stored["config"], identity["config"], defaults=default_identity_config())
    if not diff:            # only keys added since the run started, at their defaults: the same run
        return "same", stored
    if not allow_change:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise RunIdentityError(
            f"train.run_name: {run_dir} holds a run with a different config ({shown}); start fresh "
            f"with another train.run_name (or delete the folder), or continue it on purpose with "
            f"train.allow_config_change=true")
    return "changed", stored


def record_identity(run_dir: str, identity: dict, status: str, stored: dict | None,
                    code: dict | None = None) -> None:
    """Write what `check_identity` accepted (nothing when it is unchanged)."""
    if (status == "same" and stored["hash"] == identity["hash"]
            and (code is None or _fingerprint(stored.get("code")) == _fingerprint(code))):
        return
    adopted = stored is None and _has_run(run_dir)       # an older version's run, resumed on purpose
    record = dict(identity)
    if stored is not None and stored["hash"] != identity["hash"]:
        record["previous"] = stored
    if code is not None:
        record |= _code_record(run_dir, stored, code, adopted)
    elif stored is not None:                            # keep what an earlier version recorded
        record |= {k: stored[k] for k in ("code", "code_history") if k in stored}
    write_identity(run_dir, record)


def _fingerprint(code: dict | None) -> str | None:
    return (code or {}).get("fingerprint")


def _code_record(run_dir: str, stored: dict | None, code: dict, adopted: bool) -> dict:
    """{"code": this version, "code_history": the versions that ran the stored run before}."""
    from hm4sr_dist.train.code_version import describe

    history = list((stored or {}).get("code_history", []))
    if stored is not None or adopted:
        before = (stored or {}).get("code")
        if _fingerprint(before) != _fingerprint(code):
            print(f"{run_dir}: this run was trained so far by code {describe(before)}; from here on "
                  f"(further epochs, or the final evaluation of a finished run) it runs on code "
                  f"{describe(code)} (run_identity.json keeps both: code, code_history)",
                  file=sys.stderr, flush=True)
            history.append(before)
    return {"code": code, **({"code_history": history} if history else {})}
