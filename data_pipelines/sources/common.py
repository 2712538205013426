"""Helpers shared by the source adapters: opening text (plain or gzip) with progress, and the
per-line loop that turns any parse failure into a counted drop naming file and line."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from data_pipelines.report import DataError


def require(path: Path, what: str) -> Path:
    if not path.is_file():
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
