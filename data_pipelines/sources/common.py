"""Helpers shared by the source adapters: opening text (plain or gzip) with progress, and the
per-line loop that turns any parse failure into a counted drop naming file and line."""

from __future__ import annotations

import gzip
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
from tqdm import tqdm

from data_pipelines.report import DataError, DropLog
from hm4sr_dist.data.manifest import DataLocation, ManifestError, is_uri

_SKIPPED = re.compile(r"Skipping line (\d+): (.*)")
CSV_SUFFIXES = (".csv", ".gz", ".tsv")


def file_name(where: str | Path) -> str:
    """The file's own name (suffixes decide its format), for a local path or a URI."""
    return Path(DataLocation(where).path() if is_uri(where) else where).name


@contextmanager
def open_input(where: str | Path, random_access: bool = False):
    """What pandas or pyarrow read: a local path as it is, a URI (`s3://...`) opened through its
    pyarrow filesystem (a stream, decompressed by its suffix; or a seekable file for Parquet) and
    closed when the block ends."""
    if not is_uri(where):
        yield where
        return
    try:
        handle = DataLocation(where).open_file() if random_access else DataLocation(where).open_stream()
    except ManifestError as exc:
        raise DataError(str(exc)) from None
    with handle:
        yield handle


def csv_frames(path: str | Path, drops: DropLog, chunksize: int | None = None) -> Iterator[pd.DataFrame]:
    """The CSV (all of it, or chunks of `chunksize` rows) as str columns; a line with more fields
    than the header is dropped and counted as `malformed_line` naming file:line, the same on every
    path (pandas refuses the whole file by default, and reading some columns keeps such a line
    silently: read every column, select after). `path` may be a URI."""
    sep = "\t" if ".tsv" in file_name(path) else ","

    def counted(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            result = fn()
        for warning in caught:
            for line, detail in _SKIPPED.findall(str(warning.message)):
                drops.drop("malformed_line", f"{path}:{line}", f"{detail}; the line is dropped")
        return result

    with open_input(path) as source:
        read = lambda **kw: pd.read_csv(source, sep=sep, dtype=str, keep_default_na=False,  # noqa: E731
                                        on_bad_lines="warn", **kw)
        if chunksize is None:
            yield counted(read)
            return
        chunks = counted(lambda: read(chunksize=chunksize))
        while (chunk := counted(lambda: next(chunks, None))) is not None:
            yield chunk


def csv_header(path: str | Path) -> list[str]:
    """The column names of a CSV/TSV file (its first line), or a DataError naming the file."""
    with open_input(path) as source:
        try:
            return list(pd.read_csv(source, sep="\t" if ".tsv" in file_name(path) else ",", dtype=str,
                                    keep_default_na=False, nrows=0).columns)
        except Exception as exc:  # noqa: BLE001 - pandas raises many types; name the file
            raise DataError(f"{path}: cannot read table ({exc})") from None


def require(path: str | Path, what: str) -> str | Path:
    """`path` when it names a file (a local path or a URI), else a DataError naming it."""
    if is_uri(path):
        try:
            found = DataLocation(path).exists()
        except ManifestError as exc:
            raise DataError(str(exc)) from None
    else:
        found = Path(path).is_file()
    if not found:
        raise DataError(f"{path}: {what} not found")
    return path


def numbered_lines(path: Path, encoding: str = "utf-8", progress: bool = True,
                   desc: str | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); blank lines are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding=encoding, newline="") as fh:
            for number, line in enumerate(tqdm(fh, desc=desc or path.name, unit=" lines",
                                               disable=not progress, mininterval=1.0), start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
