"""Compare finished runs: mean ± std over seeds per setting, and user- and seed-level CIs vs a baseline.

Every training run leaves `outputs/<run>/results.json` (config, variant, dataset, test metrics) and
`per_user_test.npz` (int64 `user`, unique ids in the prepared data set, and `rank`, the 0-based
full-ranking rank of that user's test target, ties counted against it; see `metrics.py`). From the
ranks every metric of spec §1 is recomputed per user:

    NDCG@K = 1/log2(r+2) if r < K else 0      MRR@K = 1/(r+1) if r < K else 0      Hit@K = [r < K]

and their mean must equal the test metric in results.json (to 1e-9), otherwise the two files do not
belong together. Runs whose resolved configs differ only in `optim.seed` and the keys the run
identity ignores (`IGNORED_KEYS`) form one SETTING. Table 1 gives each setting's seed mean ± sample
std. Each setting is compared with the baseline on three intervals, each named by what it resamples
(`interval_unit`):

    users                  Table 2: per-user values averaged over a setting's seeds, users resampled
                           with replacement (paired bootstrap): mean difference, percentile 95% CI,
                           share of resamples <= 0 (a one-sided p) and the two-sided bootstrap p.
                           Seed-to-seed variance does not enter it.
    seeds (t)              Table 3: per seed both settings ran, the difference of the two runs' test
                           means d_i; mean ± t_{0.975,n-1} · sd/√n (n >= 2 paired seeds).
    seeds then users       Table 3: hierarchical bootstrap, seeds then users (n >= 3 paired seeds).
    (hierarchical bootstrap)

Every p-value is Holm-adjusted (`holm_p`) over the family of one compare call: every
setting-vs-baseline comparison on every metric, one family per interval kind (`hm4sr_dist.stats`).

    hm4sr-compare outputs/beauty-hm4sr-s* outputs/beauty-idcl0-s* --csv study.csv --markdown study.md
    python -m hm4sr_dist.compare outputs/study/ --baseline hm4sr --metrics ndcg,hit --ks 10,20
    hm4sr-compare outputs/a-* outputs/b-* --label A='*/a-*' --label B='*/b-*'

For other code (a study runner): `load_run`, `expand_runs`, `group_settings`, `per_user_metrics`,
`paired_bootstrap`, `compare`, then `format_text`, `write_csv`, `write_markdown`, `write_json`.
Needs numpy only (no torch; scipy's t quantile when installed), so the command starts quickly.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import glob
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hm4sr_dist.config import flatten
from hm4sr_dist.run_folder import PER_USER_FILE, RESULTS_FILE, RunFolderError, read_results
from hm4sr_dist.stats import (
    UNIT_HIERARCHICAL,
    UNIT_SEEDS_T,
    UNIT_USERS,
    Interval,
    hierarchical_bootstrap,
    holm,
    paired_differences,
    seed_t_interval,
    two_sided_p,
    user_draws,
)
from hm4sr_dist.train.identity import INERT_WHEN, NOT_IDENTITY, default_identity_config

# Config keys left out when grouping runs into settings: exactly those the run identity ignores
# (train/identity.py: where a run is stored, its name, its epoch cap, logging and checkpointing, how it
# survives failures), so hm4sr-compare never splits runs the identity calls one, plus the seed, which
# is what a setting repeats over. The data set is keyed by `dataset` + its fingerprint instead of
# `data.prepared_dir` (in NOT_IDENTITY). As in the identity, a key a run predates counts at its
# legacy value (`default_identity_config`), and a key inert under the run's config is left out
# (`INERT_WHEN`, e.g. loss.cp_reduction when loss.cp_weight = 0).
IGNORED_KEYS = ("optim.seed",) + tuple(NOT_IDENTITY)
HOLM_ALPHA = 0.05
HIER_TEST_MIN_SEEDS = 8     # fewer paired seeds: the hierarchical interval is shown without p or Holm
DEFAULT_METRICS = ("ndcg", "mrr")
DEFAULT_KS = (5, 10)
METRIC_LABELS = {"ndcg": "NDCG", "mrr": "MRR", "hit": "Hit"}


class CompareError(ValueError):
    """Runs that cannot be read, do not match their own metrics, or cannot be paired."""


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One finished training run: its results.json and its per-user test ranks (sorted by user)."""

    path: Path
    results: dict
    users: np.ndarray                      # (U,) int64, ascending, unique
    ranks: np.ndarray                      # (U,) int64, rank of users[i]'s test target

    @property
    def config(self) -> dict:
        return self.results.get("config") or {}

    @property
    def seed(self) -> Any:
        return (self.config.get("optim") or {}).get("seed")

    @property
    def variant(self) -> str:
        return str(self.results.get("variant") or self.config.get("name") or self.path.name)

    @property
    def data_id(self) -> dict:
        """What identifies the test users: the data set name and its manifest fingerprint."""
        return {"dataset": self.results.get("dataset"),
                "data.fingerprint": (self.results.get("data_manifest") or {}).get("fingerprint")}


def parse_metric(name: str) -> tuple[str, int]:
    """'NDCG@10' -> ('ndcg', 10)."""
    kind, sep, k = name.strip().lower().partition("@")
    if kind not in METRIC_LABELS or not sep or not k.isdigit() or int(k) < 1:
        raise CompareError(f"metric {name!r}: expected ndcg@K, mrr@K or hit@K with K >= 1")
    return kind, int(k)


def metric_label(name: str) -> str:
    kind, k = parse_metric(name)
    return f"{METRIC_LABELS[kind]}@{k}"


def resolve_metrics(metrics: Iterable[str] | None = None, ks: Iterable[int] | None = None) -> list[str]:
    """Metric names with their cut-off: a bare name ('ndcg') gets every K of `ks`; 'ndcg@20' stays."""
    ks = list(ks or DEFAULT_KS)
    out: list[str] = []
    for m in metrics or DEFAULT_METRICS:
        names = [m] if "@" in m else [f"{m}@{k}" for k in ks]
        for name in names:
            kind, k = parse_metric(name)
            if f"{kind}@{k}" not in out:
                out.append(f"{kind}@{k}")
    if not out:
        raise CompareError("no metrics selected")
    return out


def per_user_metrics(ranks: np.ndarray, metrics: Iterable[str]) -> dict[str, np.ndarray]:
    """Per-user metric values, {name: (U,) float64}, from 0-based full-ranking ranks (spec §1)."""
    r = np.asarray(ranks)
    if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
        raise CompareError(f"ranks: expected a 1-d integer array, got {r.dtype} of shape {r.shape}")
    if r.size and r.min() < 0:
        raise CompareError(f"ranks: expected ranks >= 0, got {int(r.min())}")
    r = r.astype(np.float64)
    out = {}
    for name in metrics:
        kind, k = parse_metric(name)
        inside = r < k
        value = {"ndcg": lambda: 1.0 / np.log2(r + 2.0), "mrr": lambda: 1.0 / (r + 1.0),
                 "hit": lambda: np.ones_like(r)}[kind]()
        out[f"{kind}@{k}"] = np.where(inside, value, 0.0)
    return out


def check_run(run: Run, tol: float = 1e-9) -> None:
    """The per-user ranks must reproduce every test metric in results.json (and its row count)."""
    test = run.results.get("test")
    if not isinstance(test, dict):
        raise CompareError(f"{run.path / RESULTS_FILE}: no 'test' metric dict to check "
                           f"{PER_USER_FILE} against")
    checked = [key for key in test if _is_metric(key)]
    if not checked:
        raise CompareError(f"{run.path / RESULTS_FILE}: 'test' holds no ndcg/mrr/hit@K metric to check "
                           f"{PER_USER_FILE} against (keys: {sorted(test)})")
    if "count" in test and int(test["count"]) != run.users.size:
        raise CompareError(f"run {run.path}: {PER_USER_FILE} has {run.users.size} users but results.json "
                           f"counts {test['count']} test rows; the two files do not belong together")
    values = per_user_metrics(run.ranks, checked)
    for key in checked:
        mean, stored = float(values[_canon(key)].mean()), float(test[key])
        if not abs(mean - stored) <= tol:
            raise CompareError(f"run {run.path}: test {key} is {stored!r} in results.json but {mean!r} "
                               f"from {PER_USER_FILE} (|diff| {abs(mean - stored):.3g} > {tol:g}); "
                               f"the two files do not belong together")


def _is_metric(key: str) -> bool:
    try:
        parse_metric(key)
        return True
    except CompareError:
        return False


def _canon(key: str) -> str:
    kind, k = parse_metric(key)
    return f"{kind}@{k}"


def load_run(path: str | Path, check: bool = True, tol: float = 1e-9) -> Run:
    """Read one run folder (or its results.json); `check` verifies the ranks against the metrics."""
    path = Path(path)
    folder = path.parent if path.name == RESULTS_FILE else path
    res_file, npz_file = folder / RESULTS_FILE, folder / PER_USER_FILE
    for f in (res_file, npz_file):
        if not f.is_file():
            raise CompareError(f"{f}: no such file (a run folder holds {RESULTS_FILE} and {PER_USER_FILE})")
    try:                        # the run folder's one reader; hand-made folders need config + test
        results = read_results(folder, strict=False)
    except RunFolderError as exc:
        raise CompareError(str(exc)) from None
    try:
        with np.load(npz_file) as z:
            missing = [k for k in ("user", "rank") if k not in z.files]
            if missing:
                raise CompareError(f"{npz_file}: missing array(s) {missing} (has {z.files})")
            users, ranks = z["user"], z["rank"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, CompareError):
            raise
        raise CompareError(f"{npz_file}: not a readable .npz file: {exc}") from None
    for key, a in (("user", users), ("rank", ranks)):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise CompareError(f"{npz_file}: '{key}' must be a 1-d integer array, got {a.dtype} {a.shape}")
    if users.shape != ranks.shape:
        raise CompareError(f"{npz_file}: 'user' has {users.size} entries but 'rank' has {ranks.size}")
    if users.size == 0:
        raise CompareError(f"{npz_file}: no users")
    if ranks.min() < 0:
        raise CompareError(f"{npz_file}: negative rank {int(ranks.min())}")
    order = np.argsort(users, kind="stable")
    users, ranks = users[order].astype(np.int64), ranks[order].astype(np.int64)
    dup = users[1:][users[1:] == users[:-1]]
    if dup.size:
        raise CompareError(f"{npz_file}: user ids are not unique ({dup.size} repeats, e.g. {int(dup[0])})")
    run = Run(folder, results, users, ranks)
    if check:
        check_run(run, tol)
    return run


def expand_runs(patterns: Iterable[str | Path]) -> list[Path]:
    """Run folders from folders, globs or results.json paths, in the order given, without repeats.

    A folder without results.json stands for its direct subfolders that have one (a study folder),
    except hidden ones (`.<run>.tmp`: a run folder the study runner had not finished writing).
    """
    out: list[Path] = []
    patterns = [str(p) for p in patterns]
    if not patterns:
        raise CompareError("no runs given")
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CompareError(f"{pattern}: matches nothing")
        found = []
        for m in map(Path, matches):
            if m.name == RESULTS_FILE and m.is_file():
                found.append(m.parent)
            elif (m / RESULTS_FILE).is_file():
                found.append(m)
            elif m.is_dir():
                found += sorted(d for d in m.iterdir()
                                if not d.name.startswith(".") and (d / RESULTS_FILE).is_file())
            elif not glob.has_magic(pattern):
                raise CompareError(f"{m}: no such run folder")
        if not found:
            raise CompareError(f"{pattern}: no {RESULTS_FILE} there or in its direct subfolders")
        out += [p for p in found if p not in out]
    return out


# ---------------------------------------------------------------------------------------------
# Settings: runs that differ only by seed
# ---------------------------------------------------------------------------------------------

@dataclass
class Setting:
    name: str
    runs: list[Run]
    config: dict                                          # flat, without IGNORED_KEYS, plus data_id
    diff: dict = field(default_factory=dict)              # keys differing from the first setting
    labelled: bool = False

    @property
    def variant(self) -> str:
        return self.runs[0].variant

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]



def _setting_config(run: Run, ignore: Iterable[str], defaults: dict) -> dict:
    """The run's flat config as the run identity sees it (a key the run predates at its legacy or
    default value, inert keys left out), without IGNORED_KEYS and `ignore`, plus its data id."""
    flat = defaults | flatten(run.config)
    inert = {k for k, is_inert in INERT_WHEN.items() if k in flat and is_inert(flat)}
    skip = set(IGNORED_KEYS) | set(ignore) | inert
    data_id = {k: v for k, v in run.data_id.items() if v is not None}
    return {k: v for k, v in flat.items() if k not in skip} | data_id


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


_MISSING = "<unset>"


def _diff(config: dict, base: dict) -> dict:
    """Keys whose values differ; a key inert on one side (left out there) is no difference."""
    inert = {k for k in INERT_WHEN if (k in config) != (k in base)}
    return {k: config.get(k, _MISSING) for k in sorted(set(config) | set(base))
            if k not in inert and _key(config.get(k, _MISSING)) != _key(base.get(k, _MISSING))}


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _diff_name(diff: dict, most: int = 3) -> str:
    parts = [f"{k}={_fmt_value(v)}" for k, v in diff.items()]
    return ",".join(parts[:most]) + (f",+{len(parts) - most} more" if len(parts) > most else "")


def group_settings(runs: Sequence[Run], labels: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                   ignore: Iterable[str] = ()) -> list[Setting]:
    """Group runs into settings, in order of first appearance.

    Runs matching a label's glob (on the folder path as given, its absolute path or its name) form
    the setting of that label; the rest group by config, ignoring IGNORED_KEYS and `ignore`. An
    automatic setting is named by its variant when that differs from the first setting's, else by
    the config keys that differ from the first setting (the first setting by its variant).
    """
    if not runs:
        raise CompareError("no runs selected")
    labels = list(labels.items() if isinstance(labels, Mapping) else labels or [])
    ignore = list(ignore)
    defaults = default_identity_config()
    groups: dict[str, Setting] = {}
    used = set()
    for run in runs:
        forms = (str(run.path), str(run.path.resolve()), run.path.name)
        label = next((n for n, g in labels if any(fnmatch.fnmatch(f, g) for f in forms)), None)
        cfg = _setting_config(run, ignore, defaults)
        gkey = f"label:{label}" if label is not None else "config:" + _key(cfg)
        if gkey not in groups:
            groups[gkey] = Setting(label or "", [], cfg, labelled=label is not None)
        groups[gkey].runs.append(run)
        used.add(label)
    unused = [f"{n}={g}" for n, g in labels if n not in used]
    if unused:
        raise CompareError(f"--label {unused[0]} matches no run")
    settings = list(groups.values())
    first = settings[0]
    for s in settings:
        s.diff = _diff(s.config, first.config)
        if s.labelled:
            continue
        if s is first or not s.diff:
            s.name = s.variant
        elif s.variant != first.variant:
            s.name = s.variant
        else:
            s.name = _diff_name(s.diff)
    names = [s.name for s in settings]
    for i, s in enumerate(settings):
        if names.count(s.name) > 1 and not s.labelled and s.diff:
            s.name = f"{s.variant}:{_diff_name(s.diff)}"
    seen: dict[str, int] = {}
    for s in settings:                    # still equal (truncated names, clashing labels): number them
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"
    return settings


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class BootstrapResult:
    diff: float                 # mean per-user difference b - a
    ci_low: float
    ci_high: float
    p_le_0: float               # share of resamples with mean difference <= 0
    p_ge_0: float = math.nan    # share of resamples with mean difference >= 0

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    @property
    def p_two_sided(self) -> float:
        """min(1, 2 · min(p_le_0, p_ge_0)): `stats.bootstrap_p_value` of the resamples."""
        return two_sided_p(self.p_le_0, self.p_ge_0)


def paired_bootstrap(a: Mapping[str, np.ndarray] | np.ndarray, b: Mapping[str, np.ndarray] | np.ndarray,
                     n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                     ) -> dict[str, BootstrapResult] | BootstrapResult:
    """Paired bootstrap over users of mean(b - a); a and b are aligned per-user values.

    Given dicts (of metrics, or of any keys), every entry is evaluated on the same resamples. Users
    are drawn with replacement from `np.random.default_rng(seed)`, as a (B, U) index matrix drawn in
    chunks of at most `stats.CHUNK_VALUES` entries (`stats.user_draws`), so memory stays bounded whatever U
    and B are. The draws depend only on (seed, U, B): a comparison gives the same numbers whatever
    else is in the dict, and the hierarchical bootstrap draws the same users.
    """
    single, names, d = paired_differences(a, b, n_boot, "paired_bootstrap", CompareError)   # d: (M, U)
    n = d.shape[1]
    if n == 0:
        raise CompareError("paired_bootstrap: no users")
    boot = np.empty((len(names), n_boot))
    for start, stop, idx in user_draws(n, n_boot, seed):                        # idx: (c, U)
        for i in range(len(names)):
            boot[i, start:stop] = np.take(d[i], idx).sum(-1) / n                 # (c,)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail], axis=1)
    out = {m: BootstrapResult(float(d[i].mean()), float(lo[i]), float(hi[i]), float((boot[i] <= 0).mean()),
                              float((boot[i] >= 0).mean()))
           for i, m in enumerate(names)}
    return out["value"] if single else out


def setting_run_values(setting: Setting, metrics: Sequence[str],
                       ) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """(users, per run in `setting.runs` order {metric: (U,) per-user values}); every run must have
    the same test users."""
    users = setting.runs[0].users
    for run in setting.runs:
        if not np.array_equal(run.users, users):
            raise CompareError(f"setting {setting.name}: run {run.path} has a different test user set from "
                               f"run {setting.runs[0].path} ({_user_diff(run.users, users)}); its seeds "
                               f"cannot be averaged per user")
    return users, [per_user_metrics(run.ranks, metrics) for run in setting.runs]


def setting_values(setting: Setting, metrics: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                                       dict[str, list[float]]]:
    """(users, per-user values averaged over the setting's seeds, per-run means) of one setting."""
    users, runs = setting_run_values(setting, metrics)
    return users, *_averaged(runs, metrics)


def _averaged(runs: list[dict[str, np.ndarray]], metrics: Sequence[str]) -> tuple[dict, dict]:
    """(per-user values averaged over runs, per-run means) from `setting_run_values`' runs."""
    return ({m: np.mean([r[m] for r in runs], axis=0) for m in metrics},
            {m: [float(r[m].mean()) for r in runs] for m in metrics})


def _user_diff(a: np.ndarray, b: np.ndarray) -> str:
    only_a, only_b = np.setdiff1d(a, b).size, np.setdiff1d(b, a).size
    return f"{only_a + only_b} users differ: {only_a} only in the first, {only_b} only in the second"


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

@dataclass
class MetricSummary:
    mean: float                 # mean over seeds of the run means
    std: float                  # sample std over seeds (nan when n = 1)
    n: int
    per_seed: list[float]


@dataclass
class SettingSummary:
    name: str
    runs: list[str]
    seeds: list
    variant: str
    n_users: int
    config_diff: dict           # keys that differ from the first setting
    metrics: dict[str, MetricSummary]


@dataclass
class MetricDifference:
    baseline_mean: float
    mean: float
    rel_change: float           # (mean - baseline_mean) / baseline_mean, nan if the baseline is 0
    diff: float                 # mean per-user difference (= mean - baseline_mean)
    ci_low: float
    ci_high: float
    p_le_0: float
    excludes_zero: bool
    # Seed level: the seeds both settings ran, and per seed (setting - baseline) of the run means.
    # The bootstrap above resamples users only; these say whether the gap holds seed by seed.
    paired_seeds: list = field(default_factory=list)
    seed_diffs: list = field(default_factory=list)
    # The interval above resampled users; its two-sided bootstrap p (`stats.bootstrap_p_value`) and
    # that p Holm-adjusted over the compare call's family (`Comparison.holm_family`).
    interval_unit: str = UNIT_USERS
    p_ge_0: float = math.nan
    p_two_sided: float = math.nan
    holm_p: float = math.nan
    holm_excludes_0: bool = False             # Holm-adjusted p <= Comparison.holm_alpha
    # Seed-level intervals over the paired seeds: Student t (>= 2 seeds) and the hierarchical
    # bootstrap (>= 3 seeds); None where too few seeds, the note saying so.
    seed_t: Interval | None = None
    seed_t_note: str = ""
    seed_hier: Interval | None = None
    seed_hier_note: str = ""

    @property
    def seeds_ahead(self) -> str:
        """'3/3': seeds (run by both) on which the setting is above the baseline; '' if none shared."""
        return f"{sum(d > 0 for d in self.seed_diffs)}/{len(self.seed_diffs)}" if self.seed_diffs else ""


@dataclass
class PairedComparison:
    setting: str
    baseline: str
    n_users: int
    metrics: dict[str, MetricDifference]


@dataclass
class Comparison:
    metrics: list[str]
    baseline: str
    settings: list[SettingSummary]
    comparisons: list[PairedComparison]     # one per non-baseline setting, in settings order
    n_boot: int
    seed: int
    notes: list[str] = field(default_factory=list)
    holm_alpha: float = HOLM_ALPHA
    holm_family: str = ""                       # what each Holm family holds, in words
    holm_family_sizes: dict = field(default_factory=dict)   # {interval unit: comparisons in its family}

    def to_dict(self) -> dict:
        return finite_or_null(dataclasses.asdict(self))

    def comparison_for(self, setting: str) -> PairedComparison | None:
        return next((c for c in self.comparisons if c.setting == setting), None)


def finite_or_null(x: Any) -> Any:
    """`x` with every NaN or ±inf float (in dicts and lists too) as None, for strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_null(v) for v in x]
    return x


def _seed_pairs(base_seeds: list, other_seeds: list) -> list[tuple[Any, int, int]]:
    """(seed, its run's index in base, in other) for each seed both settings ran exactly once, in
    other's order."""
    def once(seeds):
        keys = [_key(x) for x in seeds]
        return {k: i for i, k in enumerate(keys) if keys.count(k) == 1}
    mine, theirs = once(base_seeds), once(other_seeds)
    return [(seed, mine[k], theirs[k]) for seed in other_seeds if (k := _key(seed)) in mine and k in theirs]


def _paired_seeds(base: SettingSummary, other: SettingSummary, metric: str) -> list[tuple[Any, float]]:
    """(seed, other - base) of the run means, for each seed that both settings ran exactly once."""
    a, b = base.metrics[metric].per_seed, other.metrics[metric].per_seed
    return [(seed, b[j] - a[i]) for seed, i, j in _seed_pairs(base.seeds, other.seeds)]


def _seed_notes(n: int) -> tuple[str, str]:
    """Why the (t, hierarchical) seed-level intervals are absent with n paired seeds ('' if present)."""
    none = "no seed run by both settings" if n == 0 else f"{n} seed"
    t_note = "" if n >= 2 else f"{none}: no seed-level interval"
    if n < 3:
        return t_note, t_note or f"{n} seeds: no hierarchical bootstrap (needs >= 3 seeds)"
    return "", ""


def seed_level(base_runs: list[dict[str, np.ndarray]], other_runs: list[dict[str, np.ndarray]],
               pairs: list[tuple[Any, int, int]], metrics: Sequence[str], n_boot: int, seed: int,
               ) -> dict[str, Interval]:
    """{metric: hierarchical-bootstrap Interval} over the paired runs (`_seed_pairs`); {} under 3 pairs.

    Row s of both (S, U) matrices is seed s's run, so seeds and users stay paired between settings.
    """
    if len(pairs) < 3:
        return {}
    a = {m: np.stack([base_runs[i][m] for _, i, _ in pairs]) for m in metrics}
    b = {m: np.stack([other_runs[j][m] for _, _, j in pairs]) for m in metrics}
    out = {m: r.interval for m, r in hierarchical_bootstrap(a, b, n_boot=n_boot, seed=seed).items()}
    if len(pairs) < HIER_TEST_MIN_SEEDS:
        # a resample of a few seeds never falls below the smallest seed difference: with 3 seeds
        # all ahead the interval excludes 0 whatever their spread. Shown, but not a test.
        out = {m: replace(iv, p_value=math.nan) for m, iv in out.items()}
    return out


def apply_holm(comparisons: Sequence[PairedComparison], alpha: float = HOLM_ALPHA) -> dict[str, int]:
    """Set holm_p / holm_excludes_0 (adjusted p <= alpha) on every interval of `comparisons`.

    One family per interval kind: all its setting-vs-baseline comparisons on all metrics (the same
    difference tested two ways is not two hypotheses). Returns {interval unit: family size}.
    """
    diffs = [d for c in comparisons for d in c.metrics.values()]
    families = {UNIT_USERS: [(d, d.p_two_sided) for d in diffs],
                UNIT_SEEDS_T: [(d.seed_t, d.seed_t.p_value) for d in diffs if d.seed_t],
                UNIT_HIERARCHICAL: [(d.seed_hier, d.seed_hier.p_value) for d in diffs
                                    if d.seed_hier and not math.isnan(d.seed_hier.p_value)]}
    for family in families.values():
        for (member, _), p in zip(family, holm([p for _, p in family])):
            member.holm_p, member.holm_excludes_0 = p, bool(p <= alpha)
    return {unit: len(family) for unit, family in families.items()}


def _holm_family(n_settings: int, n_metrics: int, sizes: dict[str, int], alpha: float) -> str:
    kinds = ", ".join(f"{unit}: {n}" for unit, n in sizes.items())
    return (f"Holm-Bonferroni step-down over every setting-vs-baseline comparison on every metric of this "
            f"compare call ({n_settings} settings x {n_metrics} metrics), one family per interval kind "
            f"({kinds} comparisons); excludes 0 after Holm = adjusted p <= {alpha:g}")


def compare(runs: Sequence[Run | str | Path], metrics: Iterable[str] | None = None,
            ks: Iterable[int] | None = None, labels: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
            baseline: str | None = None, n_boot: int = 10000, seed: int = 0,
            ignore: Iterable[str] = (), check: bool = True) -> Comparison:
    """Tables 1 and 2 for `runs` (Run objects, run folders or globs). The baseline is the setting of
    the first run unless `baseline` names another."""
    metrics = resolve_metrics(metrics, ks)
    loaded: list[Run] = []
    for r in runs:
        for run in [r] if isinstance(r, Run) else [load_run(p, check) for p in expand_runs([r])]:
            if all(run.path.resolve() != x.path.resolve() for x in loaded):
                loaded.append(run)
    settings = group_settings(loaded, labels, ignore)
    names = [s.name for s in settings]
    if baseline is not None and baseline not in names:
        raise CompareError(f"--baseline {baseline!r}: no such setting (settings: {names})")
    base = settings[names.index(baseline)] if baseline is not None else settings[0]

    notes, summaries, values, run_values = [], [], {}, {}
    for s in settings:
        seeds = s.seeds
        if len(set(map(_key, seeds))) < len(seeds):
            notes.append(f"setting {s.name}: repeated seeds {seeds} (re-runs are averaged like seeds)")
        caps = sorted({(r.config.get("optim") or {}).get("epochs") for r in s.runs}, key=str)
        if len(caps) > 1:     # one setting for the run identity (a run taken further is the same run)
            notes.append(f"setting {s.name}: runs with different epoch caps {caps} are averaged as one "
                         "setting; give them --label globs to compare them")
        users, run_values[s.name] = setting_run_values(s, metrics)
        per_user, per_run = _averaged(run_values[s.name], metrics)
        values[s.name] = (users, per_user)
        summaries.append(SettingSummary(
            s.name, [str(r.path) for r in s.runs], seeds, s.variant, int(users.size),
            dict(s.diff),
            {m: MetricSummary(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
                              len(v), v) for m, v in per_run.items()}))

    base_users, base_values = values[base.name]
    others = [(s, summary) for s, summary in zip(settings, summaries) if s is not base]
    for s, _ in others:
        other = {k: v for k, v in s.runs[0].data_id.items() if v is not None}
        mine = {k: v for k, v in base.runs[0].data_id.items() if v is not None}
        clash = [k for k in set(other) & set(mine) if other[k] != mine[k]]
        if clash:
            raise CompareError(f"setting {s.name} and baseline {base.name} are on different data ({clash[0]} "
                               f"{other[clash[0]]!r} vs {mine[clash[0]]!r}); users cannot be paired")
        users, per_user = values[s.name]
        if not np.array_equal(users, base_users):
            raise CompareError(f"setting {s.name} and baseline {base.name} do not have the same test users "
                               f"({_user_diff(users, base_users)}); a paired comparison needs the same users")
    # One pass over the resamples for every (setting, metric): the index matrix is drawn once.
    boot = paired_bootstrap({(s.name, m): base_values[m] for s, _ in others for m in metrics},
                            {(s.name, m): values[s.name][1][m] for s, _ in others for m in metrics},
                            n_boot=n_boot, seed=seed) if others else {}
    base_summary = summaries[names.index(base.name)]
    comparisons = []
    for s, summary in others:
        pairs = _seed_pairs(base.seeds, s.seeds)
        hier = seed_level(run_values[base.name], run_values[s.name], pairs, metrics, n_boot, seed)
        t_note, hier_note = _seed_notes(len(pairs))
        diffs = {}
        for m in metrics:
            b0, b1 = base_summary.metrics[m].mean, summary.metrics[m].mean
            r = boot[(s.name, m)]
            paired = _paired_seeds(base_summary, summary, m)
            seed_diffs = [d for _, d in paired]
            diffs[m] = MetricDifference(b0, b1, (b1 - b0) / b0 if b0 else math.nan, r.diff, r.ci_low,
                                        r.ci_high, r.p_le_0, r.excludes_zero,
                                        [seed for seed, _ in paired], seed_diffs,
                                        p_ge_0=r.p_ge_0, p_two_sided=r.p_two_sided,
                                        seed_t=seed_t_interval(seed_diffs), seed_t_note=t_note,
                                        seed_hier=hier.get(m), seed_hier_note=hier_note)
        comparisons.append(PairedComparison(s.name, base.name, int(base_users.size), diffs))
    sizes = apply_holm(comparisons)
    return Comparison(metrics, base.name, summaries, comparisons, n_boot, seed, notes, HOLM_ALPHA,
                      _holm_family(len(others), len(metrics), sizes, HOLM_ALPHA), sizes)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def _num(x: float, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.2f}%"


def _aligned(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to width; the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = []
    for row in [headers, *rows]:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mean_std(s: MetricSummary, digits: int) -> str:
    return _num(s.mean, digits) if s.n == 1 else f"{_num(s.mean, digits)} ± {_num(s.std, digits)}"


def _seeds(seeds: list) -> str:
    return ",".join(str(x) for x in seeds)


def table1_rows(result: Comparison, digits: int = 4) -> tuple[list[str], list[list[str]]]:
    headers = ["setting", "n", "seeds"] + [metric_label(m) for m in result.metrics]
    rows = [[s.name, f"n={len(s.runs)}", _seeds(s.seeds)] + [_mean_std(s.metrics[m], digits) for m in result.metrics]
            for s in result.settings]
    return headers, rows


def _p(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def _dagger(excludes: bool) -> str:
    return "†" if excludes else ""


def _interval(iv: Interval | None, note: str, digits: int) -> list[str]:
    """[95% CI, p, Holm p, †] cells of a seed-level interval, or [its absence note, '', '', '']."""
    if iv is None:
        return [note, "", "", ""]
    return [f"[{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]", _p(iv.p_value), _p(iv.holm_p),
            _dagger(iv.holm_excludes_0)]


def table3_rows(result: Comparison, digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """Seed level: per setting and metric, the paired seeds, their mean difference, the t interval and
    the hierarchical bootstrap (each with its p, Holm p and † marker), or why one is absent."""
    headers = ["setting", "metric", "seeds", "mean seed diff", f"{UNIT_SEEDS_T} 95% CI", "p", "Holm p", "",
               "seeds then users 95% CI", "p", "Holm p", ""]
    rows = []
    for c in result.comparisons:
        for m, d in c.metrics.items():
            mean = f"{np.mean(d.seed_diffs):+.{digits}f}" if d.seed_diffs else "-"
            rows.append([c.setting, metric_label(m), str(len(d.paired_seeds)), mean,
                         *_interval(d.seed_t, d.seed_t_note, digits),
                         *_interval(d.seed_hier, d.seed_hier_note, digits)])
    return headers, rows


def format_text(result: Comparison, digits: int = 4) -> str:
    """Table 1 (mean ± std over seeds), Table 2 (vs baseline by user) and Table 3 (vs baseline by seed),
    one line per setting and metric in Tables 2 and 3, then the Holm family."""
    out = ["Table 1: test metrics per setting, mean ± sample std over seeds (n = runs)",
           _aligned(*table1_rows(result, digits)), ""]
    if not result.comparisons:
        out.append(f"Table 2: only one setting ({result.baseline}): nothing to compare")
        return "\n".join(out)
    n_users = result.comparisons[0].n_users
    out.append(f"Table 2: vs baseline {result.baseline}; interval unit: {UNIT_USERS} (paired bootstrap over "
               f"{n_users} users of the seed-averaged values, B={result.n_boot}, seed {result.seed}); "
               f"* = 95% CI excludes 0; † = excludes 0 after Holm at {result.holm_alpha:g}")
    headers = ["setting", "metric", "baseline", "setting", "rel.change", "diff", "95% CI", "", "P(diff<=0)",
               "p(2-sided)", "Holm p", "", "seeds ahead"]
    rows = []
    for c in result.comparisons:
        for m, d in c.metrics.items():
            rows.append([c.setting, metric_label(m), _num(d.baseline_mean, digits), _num(d.mean, digits),
                         _pct(d.rel_change), f"{d.diff:+.{digits}f}",
                         f"[{d.ci_low:+.{digits}f}, {d.ci_high:+.{digits}f}]", "*" if d.excludes_zero else "",
                         f"{d.p_le_0:.4f}", _p(d.p_two_sided), _p(d.holm_p), _dagger(d.holm_excludes_0),
                         d.seeds_ahead or "-"])
    out.append(_aligned(headers, rows, left=2))
    out.append("seeds ahead = seeds (run by both settings) on which the setting's run beats the baseline's "
               "run of the same seed; p(2-sided) = min(1, 2 min(P(diff<=0), P(diff>=0))) over the resamples")
    out += ["", (f"Table 3: vs baseline {result.baseline} by seed: per seed both settings ran, the "
                 f"difference of the two runs' test means; {UNIT_SEEDS_T} = mean ± t(0.975, n-1) sd/sqrt(n) "
                 f"(n >= 2 seeds); seeds then users = hierarchical bootstrap (n >= 3 seeds, "
                 f"B={result.n_boot}, seed {result.seed}; its p and Holm only from "
                 f"{HIER_TEST_MIN_SEEDS} seeds: a resample of fewer never falls below the smallest seed "
                 f"difference); † = excludes 0 after Holm at "
                 f"{result.holm_alpha:g}"),
            _aligned(*table3_rows(result, digits), left=2), "", f"Holm: {result.holm_family}"]
    return "\n".join(out)


def csv_rows(result: Comparison) -> list[dict]:
    """One row per setting: Table 1 and Table 2 columns side by side (empty for the baseline)."""
    rows = []
    for s in result.settings:
        c = result.comparison_for(s.name)
        row = {"setting": s.name, "is_baseline": s.name == result.baseline, "n": len(s.runs),
               "seeds": " ".join(map(str, s.seeds)), "variant": s.variant, "n_users": s.n_users,
               "config_diff": "; ".join(f"{k}={_fmt_value(v)}" for k, v in s.config_diff.items()),
               "runs": " ".join(s.runs)}
        for m in result.metrics:
            ms = s.metrics[m]
            row |= {f"{m}_mean": ms.mean, f"{m}_std": "" if math.isnan(ms.std) else ms.std}
            d = c.metrics[m] if c else None
            row |= {f"{m}_rel_change": "" if d is None or math.isnan(d.rel_change) else d.rel_change,
                    f"{m}_diff": "" if d is None else d.diff, f"{m}_ci_low": "" if d is None else d.ci_low,
                    f"{m}_ci_high": "" if d is None else d.ci_high, f"{m}_p_le_0": "" if d is None else d.p_le_0,
                    f"{m}_ci_excludes_0": "" if d is None else d.excludes_zero,
                    f"{m}_seeds_ahead": "" if d is None else d.seeds_ahead}
            row |= _csv_stats(m, d)
        rows.append(row | {"holm_family": result.holm_family})
    return rows


def _blank(x: Any) -> Any:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _csv_stats(m: str, d: MetricDifference | None) -> dict:
    """The interval units, two-sided and Holm p-values and seed-level intervals of one metric ('' for
    the baseline row, or where an interval is absent: its note says why)."""
    row = {f"{m}_interval_unit": d.interval_unit if d else "",
           f"{m}_p_two_sided": _blank(d.p_two_sided) if d else "",
           f"{m}_holm_p": _blank(d.holm_p) if d else "",
           f"{m}_holm_excludes_0": d.holm_excludes_0 if d else "",
           f"{m}_seed_n": len(d.paired_seeds) if d else ""}
    for key, unit in (("seed_t", UNIT_SEEDS_T), ("seed_hier", UNIT_HIERARCHICAL)):
        iv = getattr(d, key) if d else None
        row |= {f"{m}_{key}_unit": unit if d else "", f"{m}_{key}_diff": iv.diff if iv else "",
                f"{m}_{key}_low": iv.low if iv else "", f"{m}_{key}_high": iv.high if iv else "",
                f"{m}_{key}_p": iv.p_value if iv else "",
                f"{m}_{key}_holm_p": _blank(iv.holm_p) if iv else "",
                f"{m}_{key}_holm_excludes_0": iv.holm_excludes_0 if iv else "",
                f"{m}_{key}_note": getattr(d, f"{key}_note") if d else ""}
    return row


def write_csv(result: Comparison, path: str | Path) -> None:
    rows = csv_rows(result)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_markdown(result: Comparison, digits: int = 4) -> str:
    """Two pipe tables, one row per setting each (the baseline's Table 2 row says 'baseline')."""
    def table(headers, rows):
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    h1, r1 = table1_rows(result, digits)
    rows2 = []
    for s in result.settings:
        c = result.comparison_for(s.name)
        cells = []
        for m in result.metrics:
            if c is None:
                cells.append("baseline")
                continue
            d = c.metrics[m]
            star = " *" if d.excludes_zero else ""
            ahead = f", ahead in {d.seeds_ahead} seeds" if d.seeds_ahead else ""
            cells.append(f"{_pct(d.rel_change)} ({d.diff:+.{digits}f} [{d.ci_low:+.{digits}f}, "
                         f"{d.ci_high:+.{digits}f}], p={d.p_le_0:.3f}, 2-sided p={d.p_two_sided:.3f}, "
                         f"Holm p={d.holm_p:.3f}{ahead}){star}{' †' if d.holm_excludes_0 else ''}")
        rows2.append([s.name] + cells)
    rows3 = [[s.name] + [_md_seed_cell(c.metrics[m], digits) if c else "baseline" for m in result.metrics]
             for s in result.settings for c in [result.comparison_for(s.name)]]
    n_users = result.settings[0].n_users
    heads = ["setting"] + [metric_label(m) for m in result.metrics]
    return "\n".join([
        "**Table 1.** Test metrics per setting, mean ± sample std over seeds.", "", table(h1, r1), "",
        (f"**Table 2.** Relative change of the seed mean vs `{result.baseline}`, with the mean per-user "
         f"difference and its 95% CI, interval unit: {UNIT_USERS} (paired bootstrap over {n_users} users of "
         f"the seed-averaged values, B={result.n_boot}, seed {result.seed}), P(diff <= 0), the two-sided "
         f"bootstrap p and its Holm-adjusted p; * = CI excludes 0; † = excludes 0 after Holm at "
         f"{result.holm_alpha:g}."), "", table(heads, rows2), "",
        (f"**Table 3.** Seed level vs `{result.baseline}`: per seed both settings ran, the difference of the "
         f"two runs' test means; {UNIT_SEEDS_T}: mean ± t(0.975, n-1)·sd/√n (n >= 2 seeds); seeds then "
         f"users: hierarchical bootstrap (n >= 3 seeds, B={result.n_boot}, seed {result.seed}; tested only "
         f"from {HIER_TEST_MIN_SEEDS} seeds: a resample of fewer never falls below the smallest seed "
         f"difference); each with its Holm-adjusted p; † = excludes 0 after Holm at "
         f"{result.holm_alpha:g}."), "",
        table(heads, rows3), "", f"Holm: {result.holm_family}.", ""])


def _md_seed_cell(d: MetricDifference, digits: int) -> str:
    if d.seed_t is None:
        return d.seed_t_note
    parts = []
    for iv, note in ((d.seed_t, d.seed_t_note), (d.seed_hier, d.seed_hier_note)):
        parts.append(note if iv is None else
                     f"{iv.unit}: [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}], "
                     + (f"not tested (< {HIER_TEST_MIN_SEEDS} seeds)" if math.isnan(iv.p_value) else
                        f"Holm p={iv.holm_p:.3f}{' †' if iv.holm_excludes_0 else ''}"))
    return f"{d.seed_t.diff:+.{digits}f} over {d.seed_t.n_seeds} seeds; " + "; ".join(parts)


def write_markdown(result: Comparison, path: str | Path, digits: int = 4) -> None:
    Path(path).write_text(format_markdown(result, digits))


def write_json(result: Comparison, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _csv_list(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hm4sr-compare", description="Compare finished runs: mean ± std over seeds per setting, and "
        "each setting against a baseline: paired-bootstrap CIs over users, seed-level t intervals (>= 2 "
        "seeds) and hierarchical-bootstrap CIs over seeds then users (>= 3 seeds), with Holm-adjusted "
        "p-values, from results.json + per_user_test.npz.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folder, glob, or a folder whose subfolders are runs")
    p.add_argument("--metrics", type=_csv_list, default=list(DEFAULT_METRICS),
                   help="comma list of ndcg, mrr, hit (each at every --ks) or NAME@K (default ndcg,mrr)")
    p.add_argument("--ks", type=lambda t: [int(x) for x in _csv_list(t)], default=list(DEFAULT_KS),
                   help="comma list of cut-offs (default 5,10)")
    p.add_argument("--label", action="append", default=[], metavar="NAME=GLOB",
                   help="runs whose folder matches GLOB form setting NAME; repeatable")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help=f"also ignore this config key when grouping (always ignored: {', '.join(IGNORED_KEYS)})")
    p.add_argument("--baseline", help="setting to compare against (default: the first RUN's)")
    p.add_argument("--bootstrap", type=int, default=10000, metavar="B",
                   help="bootstrap resamples, user-level and hierarchical (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--digits", type=int, default=4, help="decimals in the tables (default 4)")
    p.add_argument("--csv", metavar="FILE", help="also write one row per setting as CSV")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown")
    p.add_argument("--json", metavar="FILE", help="also write everything as JSON")
    p.add_argument("--no-check", action="store_true",
                   help="skip checking the per-user ranks against the test metrics in results.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        labels = []
        for pair in args.label:
            name, sep, pattern = pair.partition("=")
            if not sep or not name or not pattern:
                raise CompareError(f"--label {pair!r}: expected NAME=GLOB")
            labels.append((name, pattern))
        result = compare(args.runs, metrics=args.metrics, ks=args.ks, labels=labels, baseline=args.baseline,
                         n_boot=args.bootstrap, seed=args.seed, ignore=args.ignore, check=not args.no_check)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(format_text(result, args.digits))
    for path, write in ((args.csv, write_csv), (args.markdown, write_markdown), (args.json, write_json)):
        if path:
            write(result, path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
