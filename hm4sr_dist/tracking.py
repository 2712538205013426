"""Experiment tracking with MLflow: one small interface for the training worker (rank 0), the job
driver and the study driver (issue 22).

    uri = tracking_uri_for(cfg.train.tracking_uri, cfg.train.storage_path)   # None: tracking off
    with Tracker.open(uri, experiment=cfg.name, identity=ident, run_name=run) as tracker:
        tracker.log_params(to_dict(cfg))                 # nested or flat; dotted keys
        tracker.log_metrics({"train/loss": 0.41, "valid/ndcg@10": 0.2}, step=120)
        tracker.log_artifact("results.json")
    run_id = find_run(uri, cfg.name, ident)              # the driver, after training: same run

The tracking URI (`train.tracking_uri`, see `tracking_uri_for`): "" puts a SQLite database next to
the Ray results, `<storage>/mlflow.db`, with artifacts in `<storage>/mlartifacts`; "off"/"none"
turns tracking off; anything else (`http://host:5000`, `sqlite:////shared/mlflow.db`, ...) is used
as given. With a URI storage path (s3://...) and no tracking URI, tracking is off with one note:
there is no file every node can open as a database there, and a local default would give each node
its own database.

One MLflow run per training run: `Tracker.open` finds the run of the experiment tagged
`hm4sr.identity=<identity>` (and, when given, the same parent) and continues it, else creates it;
a resumed training run appends to the same MLflow run. A study opens a parent run (identity e.g.
`study:<study_id>`, tag `hm4sr.study`) and each trial a child with `parent_run_id=parent.run_id`
(tag `mlflow.parentRunId`, so the UI nests them).

Keys: every param, metric and tag key goes through `sanitize_key`, so searches can predict them.
MLflow allows only letters, digits, `_ - . / space :` (no colon on Windows) and no path-like
`a//b`, `./a`, `a/..`; here `@` becomes `_at_` (`test/ndcg@5` -> `test/ndcg_at_5`) and any other
character outside `[A-Za-z0-9_./-]` becomes `_`.

Params: MLflow refuses to change a logged param. On a resumed run, identical values are skipped,
missing ones logged, and a changed value (e.g. `optim.epochs` raised to continue training) is kept
as the tag `param_changed.<key>` = the new value (the param keeps the first value). Values longer
than MLflow's 6000 characters are cut, with a marker, the same way every time.

Only `mlflow.MlflowClient` is used (explicit run ids, no fluent global state), so threads of the
study driver can each hold a tracker. mlflow is imported inside the functions: importing this module
costs only the standard library (the CLI imports it before Ray starts); torch and ray are not used.

Errors: `TrackingError` (a ValueError) names the URI (password hidden). Before MLflow is asked, an
HTTP server gets one GET of `/health` without retries (`PROBE_TIMEOUT_S`), and a SQLite file one
open with the standard library, so a wrong address or a broken database is one line in about a
second, instead of MLflow's retries (HTTP: `MLFLOW_HTTP_REQUEST_MAX_RETRIES`, default 7, with
exponential backoff (`MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`, 2) and `MLFLOW_HTTP_REQUEST_TIMEOUT` (120 s)
per request: minutes; SQLAlchemy engine: 10 tries over about 100 s). Later calls keep MLflow's
retries (a flaky server during a long run) and raise `TrackingError` when they give up; a caller
that wants best-effort logging catches it.

W&B: not a dependency. A backend would be another class with this interface (`open`, `log_params`,
`log_metrics`, `log_artifact(s)`, `set_tags`, `finish`, `run_id`) chosen by the URI's scheme in
`Tracker.open` (e.g. `wandb://<entity>/<project>`), with `wandb.init(id=..., resume="allow")` in
place of the identity search.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

IDENTITY_TAG = "hm4sr.identity"
STUDY_TAG = "hm4sr.study"
PARENT_TAG = "mlflow.parentRunId"        # MLflow's own: the UI nests a run under its parent
CHANGED_PREFIX = "param_changed."
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
OFF_VALUES = ("off", "none", "false", "no")     # "off" on a command line reads as YAML false
STATUSES = ("FINISHED", "FAILED", "KILLED")
PROBE_TIMEOUT_S = 5

# MLflow 3.18's limits (mlflow.utils.validation): param values 6000 characters, tag values 8000,
# keys 250; a log_batch call at most 100 params or tags and 1000 metrics (1000 entities in all).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_SQL_SCHEMES = ("postgresql", "mysql", "mssql")

_noted: set[str] = set()


class TrackingError(ValueError):
    """The tracking backend at `uri` cannot be used (unreachable, broken, refused a call)."""

    def __init__(self, uri: str, message: str):
        self.uri, self.detail = uri, message
        super().__init__(f"MLflow tracking at {_redact(uri)}: {message}")

    def __reduce__(self):                    # survives pickling (Ray sends a worker's errors so)
        return type(self), (self.uri, self.detail)


# --- the URI --------------------------------------------------------------------------------------

def absolute_tracking_uri(tracking_uri: str) -> str:
    """`train.tracking_uri` with a relative local store made absolute (`sqlite:///mlflow.db`, a
    plain folder): the driver, each Tune trial and each Ray worker run in folders of their own, and
    a relative path would give each its own database. Anything else is returned as given."""
    value = (tracking_uri or "").strip()
    if value.lower() in OFF_VALUES or not value:
        return tracking_uri
    if value.startswith("sqlite:///"):
        path = value[len("sqlite:///"):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return f"sqlite:///{Path(path).resolve()}"
        return value
    if "://" not in value and not value.startswith("file:"):
        return str(Path(value).resolve())
    return value


def tracking_uri_for(tracking_uri: str, storage_path: str) -> str | None:
    """The MLflow tracking URI for `train.tracking_uri` and `train.storage_path`; None = tracking off.

    - "" (the default): `sqlite:///<absolute storage path>/mlflow.db` for a local storage path
      (`file://` included). For a URI storage path (s3://, gs://, ...) None, with one note on stderr
      (once per process): no default database can live there, and a local one would differ per node.
    - "off", "none", "false" or "no" (any case; YAML reads `off` as false): None.
    - anything else (`http://host:5000`, `sqlite:////shared/mlflow.db`, `postgresql://...`): as given.
    """
    value = (tracking_uri or "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return value
    local = _local_storage(storage_path)
    if local is None:
        if storage_path not in _noted:
            _noted.add(storage_path)
            print(f"tracking off: train.storage_path={storage_path} is not a local path, so there is no "
                  "default MLflow database; set train.tracking_uri (http://<mlflow server>, or "
                  "sqlite:////<path every node sees>/mlflow.db), or train.tracking_uri=off to silence this",
                  file=sys.stderr)
        return None
    return f"sqlite:///{Path(local).resolve() / DB_FILE}"


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go when `Tracker.open` is not told: `<folder of the SQLite
    file>/mlartifacts` for a `sqlite:` URI (`<storage>/mlartifacts` for the default URI), else None
    (MLflow's choice: the server's for http(s), inside the store for `file:`). For another database
    (postgresql://, ...) MLflow would use ./mlruns of the working directory: pass
    `artifact_location` (e.g. `<storage>/mlartifacts`) to `Tracker.open`."""
    path = _sqlite_path(uri)
    if path is None or path == ":memory:":
        return None
    return str(Path(path).resolve().parent / ARTIFACT_DIR)


def _local_storage(storage_path: str) -> str | None:
    if "://" not in storage_path:
        return storage_path
    parts = urlsplit(storage_path)
    return parts.path if parts.scheme == "file" and parts.netloc in ("", "localhost") else None


def _sqlite_path(uri: str) -> str | None:
    """The file of a `sqlite:///path` URI (relative to the working directory unless it starts with /)."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:"):].split("?", 1)[0]
    return rest[3:] if rest.startswith("///") else (":memory:" if rest in ("", "//") else rest.lstrip("/"))


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


# --- keys and values ------------------------------------------------------------------------------

def sanitize_key(name: str) -> str:
    """A param, metric or tag key MLflow accepts, the same for the same name everywhere:
    `@` -> `_at_`, any character outside `[A-Za-z0-9_./-]` -> `_`, no empty, `.` or `..` path parts
    (`a//b` -> `a/b`, `a/./b` -> `a/_/b`), at most 250 characters (longer: cut, plus 8 hex of a hash).
    `test/ndcg@5` -> `test/ndcg_at_5`."""
    text = re.sub(r"[^A-Za-z0-9_./-]", "_", str(name).replace("@", "_at_"))
    parts = [p if p.strip(".") else "_" * len(p) for p in text.split("/") if p]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY:
        key = f"{key[:MAX_KEY - 9]}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return key


def _flatten(tree: dict, prefix: str, sep: str) -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{sep}{key}" if prefix else str(key)
        out |= _flatten(value, path, sep) if isinstance(value, dict) and value else {path: value}
    return out


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[{len(text)} chars]"
    return text[:limit - len(marker)] + marker


def _finite_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _quoted(text: str) -> str:
    """A string literal for an MLflow search filter."""
    for quote in ("'", '"'):
        if quote not in text:
            return f"{quote}{text}{quote}"
    raise ValueError(f"a tracking identity cannot hold both kinds of quotes: {text!r}")


# --- the backend ----------------------------------------------------------------------------------

def _mlflow_errors() -> tuple:
    from mlflow.exceptions import MlflowException
    errors = [MlflowException, OSError, ImportError]
    try:
        import sqlalchemy.exc
        errors.append(sqlalchemy.exc.SQLAlchemyError)
    except ImportError:
        pass
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _check_reachable(uri: str) -> None:
    """One quick attempt at the backend, without MLflow's retries; TrackingError if it fails."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request
        try:
            response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                                    backoff_factor=0, backoff_jitter=0, timeout=PROBE_TIMEOUT_S,
                                    raise_on_status=False, retry_read_errors=False)
        except _mlflow_errors() as exc:     # MlflowException wrapping requests' connection errors
            raise TrackingError(uri, f"server not reachable ({_short_http_error(exc)})") from None
        if response.status_code >= 500:
            raise TrackingError(uri, f"server answered HTTP {response.status_code} on /health")
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme.split("+")[0] in _SQL_SCHEMES:
        try:
            import sqlalchemy
            from sqlalchemy.pool import NullPool
            sqlalchemy.create_engine(uri, poolclass=NullPool).connect().close()
        except _mlflow_errors() as exc:          # SQLAlchemyError, a missing driver (ImportError), OSError
            raise TrackingError(uri, f"database not reachable ({_first_line(exc)})") from None


def _short_http_error(exc: Exception) -> str:
    text = str(exc)
    for cause in ("Connection refused", "Failed to resolve", "timed out", "Name or service not known",
                  "No route to host", "SSL", "Connection reset"):
        if cause in text:
            return cause
    return _first_line(exc)


def _check_sqlite(uri: str) -> None:
    import sqlite3
    path = _sqlite_path(uri)
    if path is None or path == ":memory:":
        return
    file = Path(path)
    try:
        if file.exists() and not file.is_file():
            raise TrackingError(uri, f"{file} is not a file")
        file.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(str(file), timeout=PROBE_TIMEOUT_S)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except (OSError, sqlite3.Error) as exc:
        raise TrackingError(uri, f"database {file} cannot be opened ({_first_line(exc)})") from None


def _client(uri: str):
    """A checked `MlflowClient` for `uri`."""
    _check_reachable(uri)
    try:
        from mlflow import MlflowClient
        return MlflowClient(tracking_uri=uri)
    except _mlflow_errors() as exc:
        raise TrackingError(uri, f"cannot open the tracking store ({_first_line(exc)})") from exc


def _experiment_id(client, uri: str, experiment: str, create: bool,
                   artifact_location: str | None = None) -> str | None:
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None and create:
            try:
                return client.create_experiment(experiment, artifact_location=artifact_location)
            except _mlflow_errors():
                found = client.get_experiment_by_name(experiment)      # created meanwhile by another
                if found is None:
                    raise
    except _mlflow_errors() as exc:
        raise TrackingError(uri, f"experiment {experiment!r}: {_first_line(exc)}") from exc
    if found is None:
        return None
    if found.lifecycle_stage != "active":
        raise TrackingError(uri, f"experiment {experiment!r} is deleted; restore it "
                                 "(mlflow experiments restore) or use another name")
    return found.experiment_id


def _search(client, uri: str, experiment_id: str, identity: str, parent_run_id: str | None):
    query = f"tags.`{IDENTITY_TAG}` = {_quoted(identity)}"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = {_quoted(parent_run_id)}"
    try:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1,
                                  order_by=["attributes.start_time DESC"])
    except _mlflow_errors() as exc:
        raise TrackingError(uri, f"searching runs ({_first_line(exc)})") from exc
    return runs[0] if runs else None


def find_run(uri: str | None, experiment: str, identity: str, parent_run_id: str | None = None) -> str | None:
    """The id of the newest active run of `experiment` tagged `hm4sr.identity=identity` (and with
    that parent when given), or None (also when tracking is off or the experiment or SQLite file
    does not exist: nothing is created)."""
    if uri is None:
        return None
    path = _sqlite_path(uri)
    if path is not None and path != ":memory:" and not Path(path).exists():
        return None
    client = _client(uri)
    experiment_id = _experiment_id(client, uri, experiment, create=False)
    if experiment_id is None:
        return None
    run = _search(client, uri, experiment_id, identity, parent_run_id)
    return run.info.run_id if run else None


# --- the tracker ----------------------------------------------------------------------------------

class Tracker:
    """One MLflow run, addressed by id through an `MlflowClient`. Make it with `Tracker.open`."""

    enabled = True

    def __init__(self, client, uri: str, run_id: str, resumed: bool):
        self._client = client
        self.uri = uri
        self.run_id: str | None = run_id
        self.resumed = resumed               # True: an existing run was continued
        self.skipped_metrics = 0             # values log_metrics left out (not finite numbers)
        self._finished = False

    @classmethod
    def open(cls, uri: str | None, experiment: str, identity: str, run_name: str,
             parent_run_id: str | None = None, tags: dict | None = None,
             artifact_location: str | None = None) -> Tracker:
        """Continue the run of `experiment` tagged `hm4sr.identity=identity` (with that parent when
        given; the newest if several), else create it (named `run_name`, its parent's child).
        `tags` are set either way. `artifact_location` only applies to a new experiment (default:
        `default_artifact_location(uri)`). `uri=None` (tracking off) returns a `NullTracker`."""
        if uri is None:
            return NullTracker()
        client = _client(uri)
        location = artifact_location if artifact_location is not None else default_artifact_location(uri)
        experiment_id = _experiment_id(client, uri, experiment, create=True, artifact_location=location)
        found = _search(client, uri, experiment_id, identity, parent_run_id)
        try:
            if found is not None:
                run_id = found.info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                first = {IDENTITY_TAG: identity} | ({PARENT_TAG: parent_run_id} if parent_run_id else {})
                user = _user()
                if user:
                    first["mlflow.user"] = user
                run_id = client.create_run(experiment_id, run_name=run_name, tags=first).info.run_id
        except _mlflow_errors() as exc:
            raise TrackingError(uri, f"opening run {identity!r} ({_first_line(exc)})") from exc
        tracker = cls(client, uri, run_id, resumed=found is not None)
        if tags:
            tracker.set_tags(tags)
        return tracker

    # -- logging

    def log_params(self, params: dict) -> list[str]:
        """Log a (nested or flat) config as params: dotted keys through `sanitize_key`, values as
        text (lists and mappings as JSON), cut to 6000 characters. Keys the run already has with the
        same value are skipped; a different value becomes the tag `param_changed.<key>` = new value.
        Returns the changed keys."""
        wanted = {}
        for key, value in _flatten(params, "", ".").items():
            wanted[sanitize_key(key)] = _cut(_text(value), MAX_PARAM_VALUE)
        have = self._call("reading the run's params", lambda: self._client.get_run(self.run_id).data.params)
        new = {k: v for k, v in wanted.items() if k not in have}
        changed = sorted(k for k, v in wanted.items() if k in have and have[k] != v)
        from mlflow.entities import Param
        self._batches([Param(k, v) for k, v in new.items()], PARAMS_PER_BATCH, "params")
        if changed:
            self.set_tags({CHANGED_PREFIX + k: wanted[k] for k in changed})
        return changed

    def log_metrics(self, metrics: dict, step: int) -> int:
        """Log the finite numbers of `metrics` (nested mappings join with `/`) at `step`, keys through
        `sanitize_key`; bools, non-numbers, NaN and inf are left out. Returns how many were left out
        (also added to `skipped_metrics`)."""
        from mlflow.entities import Metric
        stamp, flat = int(time.time() * 1000), _flatten(metrics, "", "/")
        rows = []
        for key, value in flat.items():
            number = _finite_number(value)
            if number is not None:
                rows.append(Metric(sanitize_key(key), number, stamp, int(step)))
        skipped = len(flat) - len(rows)
        self.skipped_metrics += skipped
        self._batches(rows, METRICS_PER_BATCH, "metrics")
        return skipped

    def set_tags(self, tags: dict) -> None:
        """Set (or overwrite) tags; keys through `sanitize_key`, values as text cut to 8000 characters."""
        from mlflow.entities import RunTag
        rows = [RunTag(sanitize_key(k), _cut(_text(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        self._batches(rows, PARAMS_PER_BATCH, "tags")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifacts (under `artifact_path` when given)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no file to log as an artifact: {path}")
        self._call(f"logging artifact {path}",
                   lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a folder's contents into the run's artifacts (under `artifact_path` when given)."""
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no folder to log as artifacts: {folder}")
        self._call(f"logging artifacts {folder}",
                   lambda: self._client.log_artifacts(self.run_id, str(folder), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (a later `open` of its identity continues it)."""
        if status not in STATUSES:
            raise ValueError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._call("ending the run", lambda: self._client.set_terminated(self.run_id, status))
        self._finished = True

    # -- context manager: FINISHED, FAILED on an exception, KILLED on Ctrl-C / SystemExit

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self._finished:
            return
        if kind is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(kind, (KeyboardInterrupt, SystemExit)) else "FAILED")

    # -- helpers

    def _call(self, what: str, fn):
        try:
            return fn()
        except _mlflow_errors() as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise TrackingError(self.uri, f"{what} for run {self.run_id} ({_first_line(exc)})") from exc

    def _batches(self, rows: list, size: int, kind: str) -> None:
        for start in range(0, len(rows), size):
            chunk = {kind: rows[start:start + size]}
            self._call(f"logging {kind}", lambda chunk=chunk: self._client.log_batch(self.run_id, **chunk))

    def __repr__(self) -> str:
        return f"Tracker({_redact(self.uri)!r}, run_id={self.run_id!r}, resumed={self.resumed})"


class NullTracker(Tracker):
    """Tracking off: the same methods, doing nothing, so callers never branch."""

    enabled = False

    def __init__(self):
        self.uri = None
        self.run_id = None
        self.resumed = False
        self.skipped_metrics = 0
        self._finished = False

    def log_params(self, params: dict) -> list[str]:
        return []

    def log_metrics(self, metrics: dict, step: int) -> int:
        return 0

    def set_tags(self, tags: dict) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def log_artifacts(self, folder, artifact_path=None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"run status must be one of {', '.join(STATUSES)}, got {status!r}")
        self._finished = True

    def __repr__(self) -> str:
        return "NullTracker()"


def _user() -> str | None:
    try:
        import getpass
        return getpass.getuser()
    except (KeyError, OSError, ImportError):     # no user name here (some containers)
        return None
