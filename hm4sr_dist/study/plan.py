"""A study = named settings x seeds on one prepared data set, checked and de-duplicated before Ray.

Studies (paper §4): `table1` (HM4SR vs SASRec), `fig3` (the ablations the data supports), `fig4`
(one-at-a-time sweeps of k1, k2, l2, l3, beta over `hm4sr_dist.study.space.PAPER_GRID`), `fig5` (the
five alternative time embeddings and the default), `grid` (the full product of the --param keys'
grids, or of their --values) and `custom` (variants and `key=value` settings).

`plan_study` builds every trial's resolved config (base YAML + command-line overrides, the setting's
variant and overrides fitted to the data by `hm4sr_dist.feasibility`, the seed) and keys it by its
run identity (`hm4sr_dist.train.identity.run_identity`, resolved config + data fingerprint): two
spellings of one setting (a Fig. 4 value equal to the default, an ablation that the data already
implies) give one trial. What the data cannot support is left out with a note; a bad key or value
raises ConfigError (one line, exit 2 in the job). Nothing here imports Ray or torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hm4sr_dist.config import (ConfigError, ExperimentConfig, apply_variant, check_leaf, check_variant,
                               parse_override, to_dict)
from hm4sr_dist.feasibility import DataOffer, resolve
from hm4sr_dist.run_folder import train_run_name
from hm4sr_dist.train.identity import run_identity
from hm4sr_dist.study.space import (FIG4_PARAMS, PAPER_GRID, check_sweep, grid_trials, resolve_param,
                                    run_tensorboard_dir, trial_config)

STUDIES = ("table1", "fig3", "fig4", "fig5", "grid", "custom")
ABLATIONS = ("-IMoE", "-TMoE", "-CP", "-IDCL", "-PCL", "-Text", "-Image")
TIME_EMBEDDINGS = ("interval", "absolute", "day", "day_of_year", "cos_interval")
DEFAULT_MAX_TRIALS = 24          # a larger study needs --yes


@dataclass
class Setting:
    """One row of the study's table: a variant plus dotted overrides (`axis` = (key, value) of a
    one-at-a-time sweep point, for the Fig. 4 plot)."""
    label: str
    variant: str = "hm4sr"
    overrides: dict = field(default_factory=dict)
    axis: tuple | None = None


@dataclass
class Trial:
    key: str                     # run identity hash (16 hex)
    setting: str                 # label of the setting that owns it
    seed: int
    run: str                     # folder name under <study dir>/runs/
    config: dict                 # the resolved config tree (what the Ray Train run trains)


@dataclass
class StudyPlan:
    study: str
    name: str                    # <dataset>-<study>, the study folder's name
    dataset: str
    fingerprint: str
    settings: list[Setting]
    trials: list[Trial]
    aliases: dict[str, str]      # a setting that resolved to another's config -> that setting
    notes: list[str]
    baseline: str

    def experiment_in(self, folder: Path) -> str:
        """The Tune experiment's name for the study in `folder`: changes when the set of trials
        changes (new seeds, settings, labels, epoch cap) or the study folder is another one (its
        `study_id`), so an equal re-run restores the same experiment and any other starts a new one
        (its finished trials are still found in the study's run folders and not re-run). Without the
        folder's id, a study re-run into another --output, or after its folder was deleted, would
        restore an experiment whose trials Tune holds done, and write no result."""
        trials = sorted(f"{t.key}:{t.config['optim']['epochs']}:{t.run}" for t in self.trials)
        text = " ".join([study_id(folder), *trials])
        return f"{self.name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


STUDY_ID_FILE = "study_id"


def study_id(folder: Path) -> str:
    """The study folder's random id, written on first use: a new or re-created folder is a new study."""
    file = Path(folder) / STUDY_ID_FILE
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(uuid.uuid4().hex + "\n")
    return file.read_text().strip()


def slug(text: str) -> str:
    """A setting label as a folder name (and a glob without magic characters)."""
    out = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_")
    return re.sub(r"_{2,}", "_", out)[:80] or "setting"


def _value_label(key: str, value) -> str:
    from hm4sr_dist.study.space import PAPER_KEYS

    short = {v: k for k, v in PAPER_KEYS.items()}.get(key, key.rsplit(".", 1)[-1])
    return f"{short}={json.dumps(value)}"


def parse_setting(text: str) -> Setting:
    """`--setting "loss.idcl_weight=0.5 loss.pcl_weight=0.1"` (or comma separated) -> a Setting;
    `LABEL:key=value ...` names it."""
    label, sep, body = text.partition(":")
    if not sep or "=" in label:
        label, body = "", text
    overrides = {}
    for item in re.split(r"[\s,]+(?=[A-Za-z_][\w.]*=)", body.strip()):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(key="--setting", expected="key.path=value pairs", got=text)
        path, value = parse_override(item, "--setting")
        overrides[".".join(path)] = check_leaf(".".join(path), value, "--setting")
    if not overrides:
        raise ConfigError(key="--setting", expected="key.path=value pairs", got=text)
    return Setting(label or " ".join(_value_label(k, v) for k, v in overrides.items()), overrides=overrides)


def _grid_of(key: str, values: dict) -> list:
    """--values of `key`, else its grid in the paper's study (spec §3)."""
    if key in values:
        return values[key]
    if key not in PAPER_GRID:
        raise ConfigError("not in the paper's study, so it has no grid; give its values with --values "
                          "or use --study custom", key=key, source="--param")
    return list(PAPER_GRID[key])


def study_settings(study: str, variants: list[str] | None = None, params: list[str] | None = None,
                   custom: list[Setting] | None = None, values: dict | None = None) -> list[Setting]:
    """The study's settings before fitting to the data; the first is the baseline. `values`
    ({key: values}, --values) replaces the paper's grid of a fig4 or grid key."""
    for v in variants or []:
        check_variant(v)
    values = {resolve_param(k): list(v) for k, v in (values or {}).items()}
    if study == "table1":
        return [Setting(v, v) for v in (variants or ["hm4sr", "sasrec"])]
    if study == "fig3":
        return [Setting("hm4sr")] + [Setting(v, v) for v in (variants or ABLATIONS) if v != "hm4sr"]
    if study == "fig4":
        keys = [resolve_param(p) for p in params] if params else list(FIG4_PARAMS)
        out = [Setting("default")]
        for key in keys:
            out += [Setting(_value_label(key, v), overrides={key: v}, axis=(key, v))
                    for v in _grid_of(key, values)]
        return out
    if study == "grid":          # the full product of --param keys (default: every key of PAPER_GRID)
        space = {key: _grid_of(key, values) for key in
                 ([resolve_param(p) for p in params] if params else list(values or PAPER_GRID))}
        return [Setting("default")] + [Setting(" ".join(_value_label(k, v) for k, v in combo.items()),
                                               overrides=combo) for combo in grid_trials(space)]
    if study == "fig5":
        return [Setting("default")] + [Setting(f"time={t}", overrides={"model.time_embedding": t},
                                               axis=("model.time_embedding", t)) for t in TIME_EMBEDDINGS]
    if study == "custom":
        out = [Setting(v, v) for v in (variants or [])] + list(custom or [])
        if not out:
            raise ConfigError("a custom study needs --variant-list and/or --setting", key="--study")
        return out
    raise ConfigError(key="--study", expected=f"one of {list(STUDIES)}", got=study)


def _setting_config(base: ExperimentConfig, s: Setting, seed: int, offer: DataOffer | None,
                    explicit: dict) -> ExperimentConfig:
    """base + variant + overrides + seed, validated and fitted to the data (swept keys and the
    command line's keys are requests: an infeasible one is a ConfigError, never silently dropped)."""
    cfg = apply_variant(base, s.variant, explicit=explicit)
    cfg = trial_config(to_dict(cfg), {**s.overrides, "optim.seed": seed}, offer, explicit,
                       source="--param" if s.axis else "--setting")
    if s.variant != "hm4sr":      # what the variant makes infeasible (-TMoE: PCL) goes, as in the jobs
        cfg = resolve(cfg, offer, {**explicit, **{k: "--setting" for k in s.overrides}}).config
    return cfg


def plan_study(study: str, base: ExperimentConfig, seeds: list[int], *, dataset: str, fingerprint: str,
               offer: DataOffer | None, explicit: dict, variants: list[str] | None = None,
               params: list[str] | None = None, custom: list[Setting] | None = None,
               values: dict | None = None) -> StudyPlan:
    if not seeds:
        raise ConfigError(key="--seeds", expected="at least one seed", got="nothing")
    if any(seed < 0 for seed in seeds):
        raise ConfigError(key="--seeds", expected="seeds >= 0", got=" ".join(map(str, seeds)))
    if len(set(seeds)) < len(seeds):
        raise ConfigError(key="--seeds", expected="distinct seeds", got=" ".join(map(str, seeds)))
    settings = study_settings(study, variants, params, custom, values)
    if study == "grid":            # a swept key without effect would train one model over and over
        check_sweep(base, [s.overrides for s in settings if s.overrides], offer=offer, explicit=explicit)
    by_folder: dict[str, Setting] = {}
    for s in settings:             # run folders and table rows are named by the label
        other = by_folder.setdefault(slug(s.label), s)
        if (other.variant, other.overrides) != (s.variant, s.overrides):
            raise ConfigError(f"two settings share the run-folder name {slug(s.label)!r} ({other.label!r} "
                              f"and {s.label!r}); name them apart with LABEL:key=value", key="--setting")
    settings = list(by_folder.values())          # a setting given twice (`hm4sr hm4sr`) is one row
    notes: list[str] = []
    if study in ("fig4", "fig5"):       # drop panels without effect on this config/data, with a note
        keep, dropped = [], set()
        for key in dict.fromkeys(s.axis[0] for s in settings if s.axis):
            trials = [s.overrides for s in settings if s.axis and s.axis[0] == key]
            try:
                check_sweep(base, trials, offer=offer, explicit=explicit)
            except ConfigError as exc:
                if params and study == "fig4":
                    raise                    # asked for by name: an error, not a note
                dropped.add(key)
                notes.append(f"{key} left out of the study: {exc}")
        keep = [s for s in settings if not (s.axis and s.axis[0] in dropped)]
        settings = keep
    trials: list[Trial] = []
    by_key: dict[str, Trial] = {}
    aliases: dict[str, str] = {}
    kept: list[Setting] = []
    for s in settings:
        try:
            cfgs = [_setting_config(base, s, seed, offer, explicit) for seed in seeds]
        except ConfigError as exc:
            if study == "fig3" and not variants:
                notes.append(f"{s.label} left out: the data cannot support it ({exc})")
                continue
            raise
        keys = [run_identity(c, fingerprint)["hash"] for c in cfgs]
        owners = {by_key[k].setting for k in keys if k in by_key}
        if owners:
            owner = sorted(owners)[0]
            if study == "fig3":
                notes.append(f"{s.label} left out: on this data it trains the same model as {owner} "
                             f"(the part it removes is already off)")
            else:
                notes.append(f"{s.label} is the same setting as {owner} (same resolved config): run once")
                aliases[s.label] = owner
            continue
        kept.append(s)
        for seed, cfg, key in zip(seeds, cfgs, keys):
            run = f"{slug(s.label)}__seed{seed}"
            cfg.name = f"{dataset}-{study}-{slug(s.label)}"
            cfg.train.run_name = train_run_name(dataset, key)    # one Train run per identity, across studies
            cfg.train.tensorboard_dir = run_tensorboard_dir(base.train.tensorboard_dir, cfg.train.run_name)
            t = Trial(key, s.label, seed, run, to_dict(cfg))
            trials.append(t)
            by_key[key] = t
    if not kept:
        raise ConfigError("no setting of the study can run on this data", key="--study")
    return StudyPlan(study, f"{dataset}-{study}", dataset, fingerprint, kept, trials, aliases, notes,
                     kept[0].label)


def plan_mismatch(plan: StudyPlan, folder: Path) -> str | None:
    """How `plan` differs from the one the study in `folder` was run with (`study_plan.json`: its
    trials' runs, identities and epoch caps), or None when it is the same."""
    theirs = {t["run"]: t for t in json.loads((folder / "study_plan.json").read_text())["trials"]}
    mine = {t.run: t for t in plan.trials}
    missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))

    def differs(run: str) -> bool:          # a plan written before "epochs" was stored: its key only
        epochs = mine[run].config["optim"]["epochs"]
        return theirs[run]["key"] != mine[run].key or theirs[run].get("epochs", epochs) != epochs

    changed = sorted(r for r in set(mine) & set(theirs) if differs(r))
    if not (missing or extra or changed):
        return None
    parts = [f"{label} {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''}"
             for label, runs in (("not in this command:", missing), ("not in the study:", extra),
                                 ("another config or epoch cap:", changed)) if runs]
    return "; ".join(parts)


def baseline_values(plan: StudyPlan) -> dict:
    """The baseline's value of every swept key (`axis`), so a sweep figure can place the baseline on
    each panel even when that value is not in the grid."""
    base = next(t.config for t in plan.trials if t.setting == plan.baseline)
    return {key: functools.reduce(lambda node, part: node[part], key.split("."), base)
            for key in dict.fromkeys(s.axis[0] for s in plan.settings if s.axis)}


def write_plan(plan: StudyPlan, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"study": plan.study, "name": plan.name, "experiment": plan.experiment_in(folder),
            "dataset": plan.dataset, "baseline": plan.baseline, "baseline_values": baseline_values(plan),
            "notes": plan.notes, "aliases": plan.aliases,
            "settings": [{"label": s.label, "variant": s.variant, "overrides": s.overrides,
                          "axis": list(s.axis) if s.axis else None} for s in plan.settings],
            "trials": [{"key": t.key, "setting": t.setting, "seed": t.seed, "run": t.run,
                        "train_run": t.config["train"]["run_name"], "epochs": t.config["optim"]["epochs"]}
                       for t in plan.trials]}
    (folder / "study_plan.json").write_text(json.dumps(data, indent=2, default=str))
