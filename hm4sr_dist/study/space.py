"""Search spaces of the paper's hyper-parameter study (spec §3, paper Fig. 4), as dotted config keys.

Every trial is a dict of `key.path -> value` overrides, the same keys `hm4sr_dist.config` takes on the
command line (`loss.idcl_weight=0.5`). Two kinds of sweep:

- **fig4** (one at a time, like the paper's Fig. 4): each chosen hyper-parameter runs over its grid
  while every other key keeps the base config's value. `fig4_trials(["l2", "k1"])` is 6 + 5 trials.
- **grid** (the full product): `grid_space(params)` maps each key to its values, `grid_trials` spells
  out the product (`grid_size` trials — 27,000 for all six of them, so pick a few).

`trial_config` builds one trial's config (base + overrides, fitted by `hm4sr_dist.feasibility`
with the swept keys as explicit requests) and `check_sweep` runs it over every trial in the driver,
so that an unknown key, a bad value, a swept request the model cannot honour (l3 without the
Temporal MoE) or a swept key without effect stops the sweep before Ray starts.

The study runs them (`--study fig4`, `--study grid`, `hm4sr_dist.study.plan`). Nothing here imports
Ray: the spaces are plain Python and unit-tested without a cluster.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Iterable, Mapping, Sequence

from hm4sr_dist.config import (ConfigError, ExperimentConfig, check_key, check_leaf, closest, from_dict,
                               known_keys, merge_overrides, to_dict)
from hm4sr_dist.feasibility import DataOffer, inert_keys, resolve

SWEEP_SOURCE = "--param"        # the source named in errors about a swept key

# The paper's names (eq. 27, §4.2, §4.3) -> config keys and the grids of spec §3.
PAPER_KEYS: dict[str, str] = {
    "l2": "loss.idcl_weight",          # lambda_2, IDCL weight
    "l3": "loss.pcl_weight",           # lambda_3, PCL weight
    "tau": "loss.idcl_temperature",    # temperature of eq. 23
    "k1": "model.n_interactive_experts",
    "k2": "model.n_temporal_experts",
    "beta": "loss.pcl_ratio",          # share of positions replaced by the time placeholder
}
PAPER_GRID: dict[str, tuple] = {
    "loss.idcl_weight": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
    "loss.pcl_weight": (0.1, 0.3, 0.5, 0.7, 1.0, 1.5),
    "loss.idcl_temperature": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
    "model.n_interactive_experts": (2, 4, 6, 8, 12),
    "model.n_temporal_experts": (2, 4, 6, 8, 12),
    "loss.pcl_ratio": (0.1, 0.2, 0.3, 0.4, 0.5),
}
# The panels of the paper's Fig. 4 (tau is swept in spec §3 too; it is in PAPER_GRID).
FIG4_PARAMS: tuple[str, ...] = ("model.n_interactive_experts", "model.n_temporal_experts",
                                "loss.idcl_weight", "loss.pcl_weight", "loss.pcl_ratio")


def resolve_param(name: str) -> str:
    """A paper name (`l2`, `k1`, `beta`, ...) or a dotted config key -> the dotted config key.
    Anything else raises ConfigError with the closest known name."""
    key = PAPER_KEYS.get(name.strip(), name.strip())
    if "." not in key:
        raise ConfigError(key=name, source=SWEEP_SOURCE, expected=f"one of {sorted(PAPER_KEYS)} or a "
                          "dotted config key such as loss.idcl_weight", got=name,
                          suggestion=closest(key, [*PAPER_KEYS, *known_keys()]))
    check_key(key, ExperimentConfig, SWEEP_SOURCE)
    return key


def parse_values(text: str) -> list:
    """`0.5,1.0` or `[0.5, 1.0]` -> [0.5, 1.0] (each item parsed as YAML, like an override value)."""
    import yaml

    try:
        value = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list) or not value:
        raise ConfigError(key="--values", expected="a comma-separated list of values", got=text)
    return value


def _space(params: Iterable[str] | None, values: Mapping[str, Sequence] | None) -> dict[str, list]:
    """Chosen params (default: all of PAPER_GRID) -> {dotted key: values}; `values` overrides grids."""
    values = {resolve_param(k): list(v) for k, v in (values or {}).items()}
    keys = [resolve_param(p) for p in params] if params else list(values or PAPER_GRID)
    out = {}
    for key in keys:
        grid = values.get(key, PAPER_GRID.get(key))
        if not grid:
            raise ConfigError("not in the paper's study, so it has no default grid; give its values "
                              "with --values", key=key, source=SWEEP_SOURCE)
        out[key] = list(grid)
    return out


def fig4_trials(params: Iterable[str] | None = None,
                values: Mapping[str, Sequence] | None = None) -> list[dict]:
    """One-at-a-time trials: for each param in turn, one trial per value, the rest at the base config.

    Default params: the five panels of Fig. 4. The base-config point recurs once per param (each
    curve of the figure is complete on its own).
    """
    space = _space(params or (None if values else FIG4_PARAMS), values)
    return [{key: value} for key, grid in space.items() for value in grid]


def grid_space(params: Iterable[str] | None = None,
               values: Mapping[str, Sequence] | None = None) -> dict[str, list]:
    """The full-product space {dotted key: values} (default: all of PAPER_GRID)."""
    return _space(params, values)


def grid_size(space: Mapping[str, Sequence]) -> int:
    return math.prod(len(v) for v in space.values())


def grid_trials(space: Mapping[str, Sequence]) -> list[dict]:
    """The product spelled out (in the order Tune's grid_search visits it is not guaranteed)."""
    import itertools

    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def override_strings(overrides: Mapping[str, object]) -> list[str]:
    """{key: value} -> ["key=value", ...] in the loader's syntax (JSON values are valid YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def trial_config(base: dict, overrides: Mapping, offer: DataOffer | None = None,
                 explicit: Mapping[str, str] | None = None, source: str = SWEEP_SOURCE) -> ExperimentConfig:
    """The base config tree (a dict) + `key.path=value` overrides, validated and fitted to the data
    (`hm4sr_dist.feasibility.resolve`, with the swept keys and the base's command-line keys
    `explicit` as requests that may not be switched off). The study names the trial's Train run
    (`run_folder.train_run_name`). `source` is the flag an error names for an override (a study's
    `--setting`)."""
    sources = dict(explicit or {})
    data = merge_overrides(copy.deepcopy(base), override_strings(overrides), cls=ExperimentConfig,
                           source=source, sources=sources)
    cfg = from_dict(ExperimentConfig, data, sources=sources).validate(sources)
    return resolve(cfg, offer, sources).config


def run_tensorboard_dir(root: str, run_name: str) -> str:
    """A trial's event folder under a user-given `train.tensorboard_dir` (a path or a URI): one per
    run, else every trial writes into one folder and the HParams tab cannot tell the runs apart.
    '' stays '' (the worker's default, `<storage>/<run>/tensorboard`, is per run already)."""
    return f"{root.rstrip('/')}/{run_name}" if root else ""


MAX_CHECKED_COMBOS = 2000       # a larger full grid is checked one key at a time


def check_sweep(base: ExperimentConfig, trials: Sequence[Mapping] | None = None,
                grid: Mapping[str, Sequence] | None = None, *, offer: DataOffer | None = None,
                explicit: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError unless every trial's config builds (`trial_config`) and every swept key
    takes effect in some trial (sweeping `loss.pcl_ratio` while PCL is off would train one model
    over and over). Runs in the driver, before Ray starts."""
    if grid is not None:
        trials = (grid_trials(grid) if grid_size(grid) <= MAX_CHECKED_COMBOS else
                  [{key: value} for key, values in grid.items() for value in values])
    base_dict = to_dict(base)
    effective: dict[str, bool] = {}
    why: dict[str, str] = {}
    for trial in trials or []:
        for key, value in trial.items():
            check_leaf(key, value, "--values")
        dead = inert_keys(trial_config(base_dict, trial, offer, explicit))
        for key in trial:
            effective[key] = effective.get(key, False) or key not in dead
            why.setdefault(key, dead.get(key, ""))
    for key, ok in effective.items():
        if not ok:
            raise ConfigError(f"has no effect, as {why[key]}; every trial would train the same model",
                              key=key, source=SWEEP_SOURCE)
