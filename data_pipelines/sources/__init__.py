"""Source adapters: each turns one raw folder format into `CanonicalData` (see `canonical.py`).
A tabular log has no adapter: the engines read it in pieces (`tabular_checks.checked_frames`)."""

from __future__ import annotations

from typing import Callable

from data_pipelines.canonical import CanonicalData, ChunkedRead
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError
from data_pipelines.sources import amazon2014, movielens, sequence_files, tabular

READERS: dict[str, Callable[[PrepConfig], ChunkedRead]] = {
    "amazon2014": amazon2014.read,
    "movielens": movielens.read,
    "sequence": sequence_files.read,
}


def load_source(cfg: PrepConfig) -> CanonicalData:
    """The whole log of a folder source, read by its adapter."""
    return read_source(cfg).whole()


def read_source(cfg: PrepConfig) -> ChunkedRead:
    """A folder source's log in frames of about `canonical.CHUNK_ROWS` rows, then the rest."""
    if cfg.source not in READERS:
        raise DataError(f"source: expected one of {sorted(READERS)}, got {cfg.source!r}")
    return READERS[cfg.source](cfg)


def input_files(cfg: PrepConfig) -> list:
    """The raw files a run reads (for the fingerprint), resolved without parsing them."""
    if cfg.source not in (*READERS, "tabular"):
        raise DataError(f"source: expected one of {sorted([*READERS, 'tabular'])}, got {cfg.source!r}")
    module = {"amazon2014": amazon2014, "movielens": movielens, "sequence": sequence_files,
              "tabular": tabular}[cfg.source]
    return module.files(cfg)
