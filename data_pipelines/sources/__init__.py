"""Source adapters: each turns one raw folder format into `CanonicalData` (see `canonical.py`).
A tabular log has no adapter: the engines read it in pieces (`tabular_checks.checked_frames`)."""

from __future__ import annotations

from typing import Callable

from data_pipelines.canonical import CanonicalData
from data_pipelines.config import PrepConfig
from data_pipelines.report import DataError
from data_pipelines.sources import amazon2014, movielens, sequence_files, tabular

SOURCES: dict[str, Callable[[PrepConfig], CanonicalData]] = {
    "amazon2014": amazon2014.load,
    "movielens": movielens.load,
    "sequence": sequence_files.load,
}


def load_source(cfg: PrepConfig) -> CanonicalData:
    """The whole log of a folder source, read by its adapter."""
    if cfg.source not in SOURCES:
        raise DataError(f"source: expected one of {sorted(SOURCES)}, got {cfg.source!r}")
    return SOURCES[cfg.source](cfg)


def input_files(cfg: PrepConfig) -> list:
    """The raw files a run reads (for the fingerprint), resolved without parsing them."""
    if cfg.source not in (*SOURCES, "tabular"):
        raise DataError(f"source: expected one of {sorted([*SOURCES, 'tabular'])}, got {cfg.source!r}")
    module = {"amazon2014": amazon2014, "movielens": movielens, "sequence": sequence_files,
              "tabular": tabular}[cfg.source]
    return module.files(cfg)
