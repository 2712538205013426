"""Search spaces of the paper's hyper-parameter study (spec §3, paper Fig. 4), as dotted config keys.

Every trial is a dict of `key.path -> value` overrides, the same keys `hm4sr_dist.config` takes on the
command line (`loss.idcl_weight=0.5`). Two kinds of sweep:

- **fig4** (one at a time, like the paper's Fig. 4): each chosen hyper-parameter runs over its grid
  while every other key keeps the base config's value. `fig4_trials(["l2", "k1"])` is 6 + 5 trials.
- **grid** (the full product): `grid_space(params)` maps each key to its values; Tune expands the
  product (`grid_size` trials — 162,000 for all seven of them, so pick a few).

Nothing here imports Ray: the spaces are plain Python and unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Iterable, Mapping, Sequence

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
    """A paper name (`l2`, `k1`, `beta`, ...) or a dotted config key -> the dotted config key."""
    key = PAPER_KEYS.get(name.strip(), name.strip())
    if "." not in key:
        raise ValueError(f"unknown hyper-parameter {name!r}: use one of {sorted(PAPER_KEYS)} "
                         f"or a dotted config key such as loss.idcl_weight")
    return key


def parse_values(text: str) -> list:
    """`0.5,1.0` or `[0.5, 1.0]` -> [0.5, 1.0] (each item parsed as YAML, like an override value)."""
    import yaml

    value = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a comma-separated list of values, got {text!r}")
    return value


def _space(params: Iterable[str] | None, values: Mapping[str, Sequence] | None) -> dict[str, list]:
    """Chosen params (default: all of PAPER_GRID) -> {dotted key: values}; `values` overrides grids."""
    values = {resolve_param(k): list(v) for k, v in (values or {}).items()}
    keys = [resolve_param(p) for p in params] if params else list(values or PAPER_GRID)
    out = {}
    for key in keys:
        grid = values.get(key, PAPER_GRID.get(key))
        if not grid:
            raise ValueError(f"{key}: no grid in the paper's study; give its values explicitly")
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


def trial_run_name(sweep: str, overrides: Mapping[str, object]) -> str:
    """A Ray Train run name unique to (sweep, overrides) and stable across re-submissions, so that
    re-running a sweep resumes (or, when finished, returns at once) each trial's training run."""
    canon = json.dumps(dict(sorted(overrides.items())), sort_keys=True)
    digest = hashlib.sha1(canon.encode()).hexdigest()[:8]
    slug = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(overrides.items()))
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "", slug)[:80]
    return f"{sweep}-{slug}-{digest}" if slug else f"{sweep}-{digest}"
