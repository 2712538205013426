"""The one way an entry point turns its command line into the config it trains: YAML file +
`key.path=value` overrides + a variant of spec §4 + what the data cannot support
(`hm4sr_dist.feasibility`), with the keys the user set kept as requests (switching one off is an
error, never a silent change). Used by the training jobs (jobs/common.py), the study
(jobs/study.py) and the benchmarks that train a real config; no Ray, no torch.

Two phases, because a job checks its whole command line before it prepares any data:

    job = resolve_job_config("configs/hm4sr_paper.yaml", ["optim.lr=0.001"], "-TMoE", offer=None)
    ...                                       # prepare the data, read its manifest
    job = resolve_job_config(..., offer=DataOffer.from_manifest(manifest), fit=True,
                             prepared_dir="outputs/prepared/beauty")

With `fit=False` what the offer cannot give is only checked (`feasibility.check`: a request it
cannot honour raises ConfigError); with `fit=True` the rest is switched off, one note each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from hm4sr_dist.config import (ExperimentConfig, apply_variant, check_repeats, command_line_keys,
                               load_tracked)
from hm4sr_dist.feasibility import DataOffer, check, resolve
from hm4sr_dist.tracking import absolute_tracking_uri


@dataclass
class JobConfig:
    config: ExperimentConfig
    explicit: dict[str, str]                  # keys set on the command line -> their source
    notes: list[str] = field(default_factory=list)     # what `fit` switched off, and why


def resolve_job_config(config_path: str | Path | None, overrides: Iterable[str] = (),
                       variant: str = "hm4sr", offer: DataOffer | None = None, *, fit: bool = False,
                       prepared_dir: str | Path | None = None) -> JobConfig:
    """The checked (and, with `fit`, fitted) config of a job; raises ConfigError naming the key and
    where it came from. `prepared_dir` is stored absolute, as are local storage and TensorBoard
    paths: Ray workers and Tune trials run in folders of their own."""
    overrides = list(overrides)
    check_repeats(overrides)
    cfg, sources = load_tracked(config_path, overrides)
    explicit = command_line_keys(sources)
    cfg = apply_variant(cfg, variant, explicit=explicit)
    notes: list[str] = []
    if fit:
        cfg, notes = resolve(cfg, offer, explicit)
    else:
        check(cfg, offer, explicit)
    if prepared_dir is not None:
        cfg.data.prepared_dir = str(Path(prepared_dir).resolve())
    for key in ("storage_path", "tensorboard_dir"):
        value = getattr(cfg.train, key)
        if value and "://" not in value:
            setattr(cfg.train, key, str(Path(value).resolve()))
    cfg.train.tracking_uri = absolute_tracking_uri(cfg.train.tracking_uri)
    return JobConfig(cfg.validate(explicit), explicit, notes)
