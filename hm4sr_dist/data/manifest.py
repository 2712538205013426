"""The prepared-data manifest: what `data_pipelines.prepare` wrote and how to check it.

A prepared folder holds `manifest.json`, `shards/shard-NNNNN.tar` (WebDataset tars, one sample
per user) and item tables (`*.npy`, `items.parquet`). The manifest is written last, so its
presence means the folder is complete; every shard is listed with its sha256, size and counts.

The folder may be a local path, a `file://` URI or any URI `pyarrow.fs.FileSystem.from_uri`
understands (`s3://bucket/prefix`, `gs://...`, `hdfs://...`), so a cluster reads one copy from
shared or object storage. `DataLocation` is the one place that resolves it; the reader, the
catalogue and the shard writer open every file through it. pyarrow is imported lazily (this
module is part of the numpy-only format).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"


class ManifestError(ValueError):
    """The manifest is missing, malformed, or does not match the files beside it. `transient`: an
    I/O failure that may pass (a network reset, a storage timeout), which a retry may get past."""

    transient = False


def transient_io(exc: BaseException) -> bool:
    """An OSError that reading the same bytes again may not raise: not a missing file, a folder
    where a file belongs, or a refused permission (those fail the same way on every attempt)."""
    return isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))


def is_uri(where: Any) -> bool:
    return isinstance(where, str) and "://" in where


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


class DataLocation:
    """A folder on a pyarrow filesystem: a local path, `file://...`, `s3://...`, `gs://...`, or
    a path inside an explicit `filesystem` (e.g. a `pyarrow.fs.SubTreeFileSystem`).

    `path(*parts)` is the path inside `fs`; `name(*parts)` is how messages call the file (the
    plain path for local folders, the URI otherwise).
    """

    def __init__(self, where: str | os.PathLike | "DataLocation", filesystem=None):
        if isinstance(where, DataLocation):
            self.fs, self.root, self.uri = where.fs, where.root, where.uri
            return
        import pyarrow.fs as pafs

        self.uri = os.fspath(where)
        if filesystem is not None:
            self.fs, self.root = filesystem, self.uri.rstrip("/") or "/"
        elif is_uri(self.uri):
            try:
                self.fs, root = pafs.FileSystem.from_uri(self.uri)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
                raise ManifestError(f"{self.uri}: cannot open this URI's filesystem "
                                    f"({_short(exc)})") from exc
            self.root = root.rstrip("/") or "/"
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(self.uri)

    def __repr__(self) -> str:
        return f"DataLocation({self.uri!r})"

    def child(self, *parts: str) -> "DataLocation":
        out = DataLocation(self)
        out.root, out.uri = self.path(*parts), self.name(*parts)
        return out

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def name(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts]) if parts else self.uri

    def local_path(self, *parts: str) -> Path | None:
        """The file as a local `Path` when the filesystem is the local disk (so it can be
        memory-mapped), else None."""
        import pyarrow.fs as pafs

        fs, path = self.fs, self.path(*parts)
        while isinstance(fs, pafs.SubTreeFileSystem):
            path = fs.base_path.rstrip("/") + "/" + path.lstrip("/")
            fs = fs.base_fs
        return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None

    def _call(self, what: str, parts: tuple[str, ...], fn):
        try:
            return fn(self.path(*parts))
        except FileNotFoundError:
            raise ManifestError(f"{self.name(*parts)}: missing") from None
        except OSError as exc:
            error = ManifestError(f"{self.name(*parts)}: cannot {what} ({_short(exc)})")
            error.transient = transient_io(exc)
            raise error from exc

    def size(self, *parts: str) -> int | None:
        """Bytes of a file; None when there is no such file."""
        import pyarrow.fs as pafs

        info = self._call("stat", parts, self.fs.get_file_info)
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, *parts: str) -> bool:
        return self.size(*parts) is not None

    def open_stream(self, *parts: str, raw: bool = False):
        """Sequential binary reader (cheapest on object stores); a `.gz` name is decompressed
        unless `raw` (the stored bytes)."""
        return self._call("open", parts, lambda path: self.fs.open_input_stream(
            path, compression=None if raw else "detect"))

    def open_file(self, *parts: str):
        """Random-access binary reader (seek/tell)."""
        return self._call("open", parts, self.fs.open_input_file)

    def read_bytes(self, *parts: str) -> bytes:
        with self.open_stream(*parts) as fh:
            return fh.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts[:-1]) if len(parts) > 1 else self.root, recursive=True)
        with self.fs.open_output_stream(self.path(*parts), compression=None) as fh:  # as given, even as .gz
            fh.write(data)


def sha256_file(path: str | Path | DataLocation, chunk: int = 1 << 20) -> str:
    """sha256 of the stored bytes of a local file, a URI, or a `DataLocation` naming the file itself."""
    digest = hashlib.sha256()
    if isinstance(path, DataLocation) or is_uri(path):
        with DataLocation(path).open_stream(raw=True) as fh:
            while block := fh.read(chunk):
                digest.update(block)
        return digest.hexdigest()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(prepared_dir: str | Path | DataLocation, filesystem=None) -> dict[str, Any]:
    """Load and sanity-check `prepared_dir/manifest.json` (a path, a URI or a `DataLocation`)."""
    where = DataLocation(prepared_dir, filesystem)
    path = where.name(MANIFEST_NAME)
    if not where.exists(MANIFEST_NAME):
        raise ManifestError(f"{path}: no manifest (was `python -m data_pipelines.prepare` run, "
                            "and did it finish?)")
    try:
        manifest = json.loads(where.read_bytes(MANIFEST_NAME))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version!r}, this reader understands "
                            f"{SCHEMA_VERSION}; re-run the preparation")
    for key in ("counts", "shards", "max_len", "time", "interval"):
        if key not in manifest:
            raise ManifestError(f"{path}: missing field {key!r}")
    return manifest


def shard_path(prepared_dir: str | Path, entry: dict[str, Any]) -> Path:
    """A shard of a local folder (see `DataLocation` for URIs)."""
    return Path(prepared_dir) / SHARD_DIR / entry["file"]


def verify_shards(prepared_dir: str | Path | DataLocation, manifest: dict[str, Any] | None = None,
                  check: str = "sha256", files: list[str] | None = None, filesystem=None) -> None:
    """Raise ManifestError naming the first shard whose size or sha256 differs from the manifest.

    `check`: "sha256" (reads every byte), "size" (stat only) or "none". `files` limits the check
    to some shards (a rank checks only its own).
    """
    if check == "none":
        return
    if check not in ("size", "sha256"):
        raise ValueError(f"check: expected 'sha256', 'size' or 'none', got {check!r}")
    where = DataLocation(prepared_dir, filesystem)
    manifest = manifest or read_manifest(where)
    for entry in manifest["shards"]:
        if files is not None and entry["file"] not in files:
            continue
        parts = (SHARD_DIR, entry["file"])
        path = where.name(*parts)
        size = where.size(*parts)
        if size is None:
            raise ManifestError(f"shard {path}: listed in the manifest but missing")
        if size != entry["bytes"]:
            raise ManifestError(f"shard {path}: {size} bytes, the manifest says {entry['bytes']} "
                                "(truncated or replaced?)")
        if check == "sha256" and sha256_file(where.child(*parts)) != entry["sha256"]:
            raise ManifestError(f"shard {path}: sha256 differs from the manifest (corrupt or replaced)")


def local_folder(prepared_dir: str | Path | DataLocation, filesystem=None,
                 cache_dir: str | Path | None = None) -> Path:
    """A local `Path` holding the prepared folder's manifest and item tables (not the shards,
    which `ShardReader` streams from wherever they are).

    A local folder (a path, `file://`, a pyarrow local or `SubTreeFileSystem` over the local disk)
    is returned as is. A remote one (`s3://`, `gs://`, ...) is staged once per node into
    `cache_dir` (default `$HM4SR_STAGE_DIR`, else `<tmp>/hm4sr-staged`), under a name derived from
    its URI, so the tables can be memory-mapped; a staged copy whose manifest equals the remote
    one is reused. Raises ManifestError naming the URI when there is no manifest there.
    """
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    where = DataLocation(prepared_dir, filesystem)
    if not where.exists(MANIFEST_NAME):          # named as given (the URI), before any staging
        raise ManifestError(f"{where.name(MANIFEST_NAME)}: no manifest (was `python -m "
                            "data_pipelines.prepare` run, and did it finish?)")
    local = where.local_path()
    if local is not None:
        return local
    manifest_bytes = where.read_bytes(MANIFEST_NAME)
    root = Path(cache_dir or os.environ.get("HM4SR_STAGE_DIR") or
                Path(tempfile.gettempdir()) / "hm4sr-staged")
    target = root / hashlib.sha256(where.name().encode()).hexdigest()[:16]
    staged = target / MANIFEST_NAME
    if staged.is_file() and staged.read_bytes() == manifest_bytes:
        return target
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        for info in where.fs.get_file_info(pafs.FileSelector(where.path(), recursive=False)):
            if info.type == pafs.FileType.File and info.base_name != MANIFEST_NAME:
                (build / info.base_name).write_bytes(where.read_bytes(info.base_name))
        (build / MANIFEST_NAME).write_bytes(manifest_bytes)   # last, as the preparation does
        shutil.rmtree(target, ignore_errors=True)
        try:
            build.rename(target)
        except OSError:            # another worker of this node staged it meanwhile
            if not (staged.is_file() and staged.read_bytes() == manifest_bytes):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target
