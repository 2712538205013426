"""Typed configuration: dataclasses, loaded from YAML, overridden from the command line.

One tree (`ExperimentConfig`) feeds the model, the losses, training and Ray Tune. Every field
carries its help text and its allowed range in `metadata`, so loading validates in one place. A
`ConfigError` names the key, where its value came from (the YAML file's path or the command line),
what was expected and what was given, and for a misspelt key the closest known one:

    optim.lr (command line): expected a number > 0, got 'abc'
    unknown key optim.lrr (command line); did you mean optim.lr?

    cfg = load_config("configs/hm4sr_paper.yaml", overrides=["loss.idcl_weight=0.5"])
    cfg, sources = load_tracked("configs/hm4sr_paper.yaml", ["optim.lr=3e-3"])  # + {key: source}

What a config can train on a given data set (PCL needs the Temporal MoE, CP needs categories, ...)
is decided by `hm4sr_dist.feasibility` (`with_variant`: a variant plus what it makes infeasible).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

MODALITIES = ("id", "text", "image")
TIME_EMBEDDINGS = ("interval_absolute", "interval", "absolute", "day", "day_of_year", "cos_interval")
COMMAND_LINE = "command line"      # the source of `key.path=value` overrides in error messages
_UNSET = object()


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type, out of range or infeasible.

    Carries what a command-line tool needs for a one-line message: `key` (a dotted key or a flag),
    `source` ("command line", the YAML file's path, "--param", ...), `expected` and `got`, `why`
    (the reason behind a rule) and `suggestion` (the closest known name). `ConfigError("free text")`
    works as before.
    """

    _FIELDS = ("key", "source", "expected", "got", "why", "suggestion", "unknown")

    def __init__(self, message: str = "", *, key: str = "", source: str = "", expected: str = "",
                 got: Any = _UNSET, why: str = "", suggestion: str = "", unknown: bool = False):
        super().__init__(message)
        self.message, self.key, self.source, self.expected = message, key, source, expected
        self.got, self.why, self.suggestion, self.unknown = got, why, suggestion, unknown

    def __str__(self) -> str:
        where = f"{self.key} ({self.source})" if self.key and self.source else self.key or self.source
        if self.unknown:
            text = f"unknown key {where}" + (f"; {self.message}" if self.message else "")
        elif self.expected:
            got = "" if self.got is _UNSET else f", got {self.got!r}"
            text = (f"{where}: " if where else "") + f"expected {self.expected}{got}" + \
                (f" ({self.why})" if self.why else "")
        else:
            text = f"{where}: {self.message}" if where else self.message
        return text + (f"; did you mean {self.suggestion}?" if self.suggestion else "")

    def __reduce__(self):       # keep the fields through pickling (Ray ships errors between processes)
        state = {k: getattr(self, k) for k in self._FIELDS if getattr(self, k) is not _UNSET}
        return _rebuild_error, (self.message, state)


def _rebuild_error(message: str, state: dict) -> ConfigError:
    return ConfigError(message, **state)


def closest(word: str, candidates: Iterable[str]) -> str:
    """The candidate `word` most likely misspells, '' if none is close (case-insensitive; a dotted
    key also matches on its last part, so `lr` suggests `optim.lr`)."""
    by_lower = {str(c).lower(): str(c) for c in candidates}
    low = word.lower()
    if low in by_lower:
        return by_lower[low]
    tails: dict[str, list[str]] = {}
    for cand in by_lower:
        if "." in cand:
            tails.setdefault(cand.rsplit(".", 1)[1], []).append(by_lower[cand])

    def by_tail() -> str:
        match = difflib.get_close_matches(low.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.75)
        return " or ".join(sorted(tails[match[0]])) if match else ""

    if "." not in low and by_tail():         # a bare name: `batch_size` -> both sections' keys
        return by_tail()
    match = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else by_tail()


def _f(default: Any, help: str, *, min: float | None = None, max: float | None = None,
       choices: Iterable[Any] | None = None, min_exclusive: bool = False, nonempty: bool = False,
       unique: bool = False, item: type | None = None) -> Any:
    """A dataclass field with its help text and validation bounds in metadata. For a list field,
    `choices`, `item` (the element type), `min` and `max` apply to its elements."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive,
            "choices": tuple(choices) if choices is not None else None,
            "nonempty": nonempty, "unique": unique, "item": item}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """HM4SR architecture (paper §4; spec §2). Defaults are the paper's / authors' settings."""

    hidden_size: int = _f(64, "d, the width of every item, position and hidden vector", min=1)
    max_seq_len: int = _f(50, "longest input sequence; longer histories keep their last items", min=1)
    modalities: list = _f(["id", "text", "image"], "item modalities used (any non-empty subset)",
                          choices=MODALITIES, nonempty=True, unique=True)
    n_layers: int = _f(2, "Transformer layers per modality", min=1)
    n_heads: int = _f(2, "attention heads per layer", min=1)
    inner_size: int = _f(256, "feed-forward inner width", min=1)
    hidden_dropout: float = _f(0.5, "dropout on embeddings and hidden states", min=0.0, max=1.0)
    attn_dropout: float = _f(0.5, "dropout on attention probabilities", min=0.0, max=1.0)
    layer_norm_eps: float = _f(1e-12, "LayerNorm epsilon (RecBole's value)", min=0.0, min_exclusive=True)
    initializer_range: float = _f(0.02, "std of the normal init of weights", min=0.0)
    use_interactive_moe: bool = _f(True, "Interactive MoE, eq. 7-10 (False = ablation -IMoE)")
    n_interactive_experts: int = _f(4, "k1, experts per target modality in the Interactive MoE", min=1)
    alpha_init_id: float = _f(0.0, "initial alpha_m of eq. 8 for the ID modality (authors: 0)")
    alpha_init_content: float = _f(1.0, "initial alpha_m of eq. 8 for text and image (authors: 1)")
    use_temporal_moe: bool = _f(True, "Temporal MoE, eq. 11-16 (False = ablation -TMoE)")
    n_temporal_experts: int = _f(4, "k2, experts of the Temporal MoE", min=1)
    temporal_expert_init_std: float = _f(0.02, "std of the noise around 1 in the element-wise experts", min=0.0)
    time_embedding: str = _f("interval_absolute", "time signal fed to the Temporal MoE gate (Fig. 5)",
                             choices=TIME_EMBEDDINGS)
    interval_scale: float = _f(100.0, "mu of eq. 12: bucket = floor(mu * log2(interval_s + 1))",
                               min=0.0, min_exclusive=True)
    time_freq: float = _f(10000.0, "freq of eq. 13", min=1.0)
    time_unit_seconds: float = _f(86400.0, "unit of (t - time_origin) before eq. 13's Linear (1 day)",
                                  min=0.0, min_exclusive=True)
    absolute_time_span_unit: bool = _f(False, "measure eq. 13's t as a fraction of the data set's time "
                                       "span (t in [0, 1]) instead of in time_unit_seconds")


@dataclass
class LossConfig:
    """Loss weights and their parameters (eq. 20-27). A weight of 0 removes the term."""

    cp_weight: float = _f(1.0, "lambda_1, category prediction (0 = ablation -CP)", min=0.0)
    idcl_weight: float = _f(1.0, "lambda_2, ID contrastive learning (0 = ablation -IDCL)", min=0.0)
    pcl_weight: float = _f(1.0, "lambda_3, placeholder contrastive learning (0 = ablation -PCL)", min=0.0)
    idcl_temperature: float = _f(0.2, "tau of eq. 23", min=0.0, min_exclusive=True)
    pcl_temperature: float = _f(1.0, "temperature of eq. 25 (the paper's has none, i.e. 1.0)",
                                min=0.0, min_exclusive=True)
    cp_reduction: str = _f("per_item", "how eq. 22's BCE is reduced: 'per_item' sums it over the categories "
                           "(eq. 22) and averages over the real input items (spec); 'per_element' "
                           "averages over items and categories (versions before 2026-11-24), which "
                           "divides lambda_1's effect by the number of categories; 'per_sequence' "
                           "sums over a sequence's items too and averages over sequences (the "
                           "paper's literal L_CP = sum over v in S), which multiplies it by the mean "
                           "sequence length", choices=("per_item", "per_sequence", "per_element"))
    pcl_ratio: float = _f(0.3, "beta: share of real positions replaced by the time placeholder",
                          min=0.0, max=1.0)
    main_loss: str = _f("full", "eq. 20 over the catalogue (docs/scaling.md): 'full' scores every item "
                        "at once, (B, n_items+1); 'chunked' is exact in (B, item_chunk_size) blocks, "
                        "recomputed in backward; 'sampled' is a logQ-corrected sampled softmax; "
                        "'vocab_parallel' is exact with the item table split over the workers "
                        "(each holds n_items/W rows; needs train.num_workers > 1)",
                        choices=("full", "chunked", "sampled", "vocab_parallel"))
    item_chunk_size: int = _f(0, "items per block of main_loss=chunked, and of each worker's slice under "
                              "main_loss=vocab_parallel (0 = one block: the full matmul)", min=0)
    num_negatives: int = _f(1024, "items drawn per step as negatives of main_loss=sampled (shared by "
                            "the batch, with replacement)", min=0)
    negative_sampler: str = _f("uniform", "how main_loss=sampled draws negatives: 'uniform', or "
                               "'popularity' (needs item counts in the catalogue)",
                               choices=("uniform", "popularity"))
    in_batch_negatives: bool = _f(True, "main_loss=sampled also contrasts the global batch's targets")


@dataclass
class OptimConfig:
    """Optimisation (paper §5.1.4)."""

    lr: float = _f(1e-3, "Adam learning rate", min=0.0, min_exclusive=True)
    weight_decay: float = _f(0.0, "Adam weight decay", min=0.0)
    batch_size: int = _f(1024, "training sequences per optimiser step (global batch)", min=1)
    epochs: int = _f(300, "upper bound on training epochs (early stopping usually ends sooner)", min=1)
    grad_clip: float = _f(0.0, "max gradient norm (0 = no clipping)", min=0.0)
    seed: int = _f(2020, "random seed", min=0)


@dataclass
class EvalConfig:
    """Full-ranking evaluation (spec §1)."""

    ks: list = _f([5, 10], "cut-offs K for NDCG@K, MRR@K and Hit@K", item=int, min=1, nonempty=True)
    batch_size: int = _f(1024, "sequences per evaluation batch", min=1)
    item_chunk_size: int = _f(0, "score items in chunks of this many (0 = all at once)", min=0)
    valid_metric: str = _f("ndcg@5", "validation metric for model selection")
    patience: int = _f(10, "epochs without validation improvement before early stopping", min=1)


@dataclass
class DataConfig:
    """Where the prepared shards are and how workers read them (see docs/data.md)."""

    prepared_dir: str = _f("", "folder with manifest.json, item tables and shards (set by the jobs)")
    shuffle_buffer: int = _f(20000, "samples in each worker's shuffling buffer", min=1)
    equalize: str = _f("pad", "equal steps per rank: 'pad' repeats a few samples, 'drop' skips the tail",
                       choices=("pad", "drop"))
    bucket_pool_batches: int = _f(64, "length bucketing of training batches: pool of this many batches "
                                  "sorted by length (0 or 1 = off)", min=0)
    prefetch_batches: int = _f(4, "batches each worker's reader prepares ahead in a background thread "
                               "(same batches, exact resume; 0 = read on the training thread)", min=0)
    length_widths: list = _f([], "sequence widths a batch is cut or padded to: the smallest that holds "
                             "its longest sequence (a few static shapes for train.compile; outputs "
                             "unchanged, dropout draws differ); [] = its longest sequence, or with "
                             "train.compile on, powers of two and model.max_seq_len",
                             item=int, min=1, unique=True)


@dataclass
class TrainConfig:
    """Distributed training: Ray Train workers, each with a DeepSpeed engine."""

    num_workers: int = _f(2, "Ray Train workers (one GPU each when GPUs are used)", min=1)
    use_gpu: str = _f("auto", "'auto' (GPU if the cluster has one), 'true' or 'false'",
                      choices=("auto", "true", "false"))
    cpus_per_worker: int = _f(1, "CPUs reserved per worker (also its torch thread count on CPU)", min=1)
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage (0-2)", min=0, max=2)
    precision: str = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16' or 'fp16'",
                        choices=("auto", "fp32", "bf16", "fp16"))
    grad_accum_steps: int = _f(1, "micro-batches per optimiser step on each worker", min=1)
    compile: str = _f("auto", "torch.compile the objective's forward (model + losses): 'true', 'false', "
                      "or 'auto' = off (slower on the CPU, docs/scaling.md; on CUDA until a GPU "
                      "run shows it helps)", choices=("auto", "true", "false"))
    storage_path: str = _f("outputs/ray_results", "Ray Train storage (shared path or URI on a cluster)")
    run_name: str = _f("", "Ray Train run name; re-running with the same name resumes it "
                       "('' = <data set>-<run identity hash>)")
    max_failures: int = _f(2, "worker-group restarts from the last checkpoint before giving up", min=-1)
    checkpoints_to_keep: int = _f(2, "most recent checkpoints kept in storage", min=1)
    checkpoint_every_steps: int = _f(200, "optimiser steps between mid-epoch checkpoints (0 = at epoch "
                                     "ends only); a resumed run repeats at most this many steps", min=0)
    allow_config_change: bool = _f(False, "resume a run whose stored config differs (on purpose, e.g. a "
                                   "lower lr); by default a clash stops with the differing keys")
    log_every_steps: int = _f(20, "steps between progress lines and TensorBoard scalars", min=1)
    tensorboard_dir: str = _f("", "TensorBoard event folder ('' = <storage>/<run>/tensorboard); "
                                  "a sweep or study trial writes into <folder>/<run>")
    tracking_uri: str = _f("", "MLflow tracking: '' = a SQLite file <storage>/mlflow.db (off for a URI "
                           "storage path), 'off', or a server / database URI (http://host:5000, "
                           "sqlite:////shared/mlflow.db); docs/tracking.md")
    fail_at_step: int = _f(-1, "fault injection for tests: worker rank 1 dies once at this global step", min=-1)


@dataclass
class ExperimentConfig:
    """The whole tree. Later sections (data, distributed training) hang off the same root."""

    name: str = _f("hm4sr", "experiment name, used for output folders")
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, sources: Mapping[str, str] | None = None) -> "ExperimentConfig":
        """Check every value (the tree may have been edited in code) and the rules that span fields.

        `sources` ({dotted key: where it was set}, from `load_tracked`) names the source in errors
        and picks which of two clashing keys is blamed: the one set most explicitly (command line
        over a YAML file over a default).
        """
        _check_tree(self, sources)
        m, ev, t, bs = self.model, self.eval, self.train, self.optim.batch_size
        if m.hidden_size % m.n_heads:
            if _blame(sources, "model.hidden_size", "model.n_heads") == "model.n_heads":
                raise _error("model.n_heads", sources, f"a divisor of model.hidden_size = {m.hidden_size}",
                             m.n_heads)
            raise _error("model.hidden_size", sources, f"a multiple of model.n_heads = {m.n_heads}",
                         m.hidden_size)
        known = {f"{name}@{k}" for name in ("ndcg", "mrr", "hit") for k in ev.ks}
        if ev.valid_metric not in known:
            name, _, k = ev.valid_metric.partition("@")
            if (_blame(sources, "eval.valid_metric", "eval.ks") == "eval.ks" and
                    name in ("ndcg", "mrr", "hit") and k.isdigit()):
                raise _error("eval.ks", sources, f"a list including {k} (eval.valid_metric = "
                             f"{ev.valid_metric})", ev.ks)
            err = _error("eval.valid_metric", sources, f"one of {sorted(known)}", ev.valid_metric)
            err.suggestion = closest(ev.valid_metric, known)
            raise err
        per_step = t.num_workers * t.grad_accum_steps
        if bs % per_step:
            blamed = _blame(sources, "optim.batch_size", "train.num_workers", "train.grad_accum_steps")
            if blamed == "train.num_workers":
                raise _error(blamed, sources, f"a divisor of optim.batch_size = {bs} (with "
                             f"train.grad_accum_steps = {t.grad_accum_steps})", t.num_workers)
            if blamed == "train.grad_accum_steps":
                raise _error(blamed, sources, f"a divisor of optim.batch_size = {bs} (with "
                             f"train.num_workers = {t.num_workers})", t.grad_accum_steps)
            raise _error(blamed, sources, "a multiple of train.num_workers * train.grad_accum_steps "
                         f"= {per_step}", bs)
        too_wide = [w for w in self.data.length_widths if w > m.max_seq_len]
        if too_wide:
            raise _error("data.length_widths", sources, f"widths <= model.max_seq_len = {m.max_seq_len}",
                         self.data.length_widths)
        if self.loss.main_loss == "vocab_parallel":
            check_vocab_parallel(self, sources)
        return self

    @property
    def micro_batch_size(self) -> int:
        """Sequences per worker per forward pass."""
        return self.optim.batch_size // (self.train.num_workers * self.train.grad_accum_steps)


SAMPLED_KEYS = ("loss.num_negatives", "loss.negative_sampler", "loss.in_batch_negatives")


def check_vocab_parallel(cfg: ExperimentConfig, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError, naming the key, for what ``loss.main_loss=vocab_parallel`` cannot train
    (docs/scaling.md, "Vocabulary-parallel"): the table is split over the workers, so one worker
    has nothing to split; gradient clipping would need a norm over every rank's slice, which the
    engine cannot see; the sampled-softmax keys would silently do nothing; the slice lives outside
    the DeepSpeed engine and is trained in fp32, so the engine must be fp32 too (checked again
    where ``train.precision=auto`` is resolved, `train.engine.check_precision`).
    ``ExperimentConfig.validate`` calls it."""
    def error(key: str, expected: str, got: Any, why: str) -> ConfigError:
        return ConfigError(key=key, source=source_of(key, sources), expected=expected, got=got, why=why)

    if cfg.train.num_workers < 2:
        raise error("train.num_workers", "at least 2 with loss.main_loss=vocab_parallel",
                    cfg.train.num_workers, "the item table is split over the workers; on one worker "
                    "use loss.main_loss=chunked, the same loss")
    if cfg.optim.grad_clip > 0:
        raise error("optim.grad_clip", "0 with loss.main_loss=vocab_parallel", cfg.optim.grad_clip,
                    "clipping needs one norm over the replicated weights and every worker's table "
                    "slice, which is not implemented")
    defaults = LossConfig()
    for key in SAMPLED_KEYS:
        name = key.split(".", 1)[1]
        if getattr(cfg.loss, name) != getattr(defaults, name):
            raise error(key, f"its default ({json.dumps(getattr(defaults, name))}) with "
                        "loss.main_loss=vocab_parallel", getattr(cfg.loss, name),
                        "it configures loss.main_loss=sampled only; vocab_parallel is the exact softmax")
    if cfg.train.precision in ("bf16", "fp16"):
        raise error("train.precision", "fp32 or auto (fp32 on the CPU) with loss.main_loss=vocab_parallel",
                    cfg.train.precision, "each worker's table slice is trained outside the DeepSpeed "
                    "engine in fp32")


# ---------------------------------------------------------------------------------------------
# Checking values, naming where they came from
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(meta: Mapping) -> str:
    lo, hi, excl = meta.get("min"), meta.get("max"), meta.get("min_exclusive")
    if lo is not None and hi is not None:
        return f" in {'(' if excl else '['}{_num(lo)}, {_num(hi)}]"
    if lo is not None:
        return f" {'>' if excl else '>='} {_num(lo)}"
    return f" <= {_num(hi)}" if hi is not None else ""


_KINDS = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
_PLURALS = {bool: "true/false values", int: "ints", float: "numbers", str: "strings"}


def describe(f: dataclasses.Field, hint: Any) -> str:
    """What field `f` accepts, in words: "a number > 0", "one of ['pad', 'drop']"."""
    meta, origin = f.metadata, typing.get_origin(hint) or hint
    choices = meta.get("choices")
    if origin is list:
        what = ("a non-empty list" if meta.get("nonempty") else "a list") + \
            (" of distinct" if meta.get("unique") else " of")
        if choices:
            return f"{what} values from {list(choices)}"
        item = meta.get("item")
        return f"{what} {_PLURALS[item]}{_bounds(meta)}" if item else what.rsplit(" of", 1)[0]
    if choices:
        return f"one of {list(choices)}"
    return _KINDS.get(origin, "a value") + ("" if origin is bool else _bounds(meta))


def _coerce(kind: Any, value: Any) -> Any:
    """`value` as `kind`, or _UNSET when it is not one."""
    if kind is bool:
        return value if isinstance(value, bool) else _UNSET
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _UNSET
    if kind is float:
        if isinstance(value, str):           # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return _UNSET
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _UNSET
    if kind is str:
        if isinstance(value, bool):         # YAML reads train.compile=true as a bool
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)               # run_name=2024
        return value if isinstance(value, str) else _UNSET
    return value


def _in_range(meta: Mapping, value: Any) -> bool:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
        return False
    return hi is None or value <= hi


def _check_value(path: str, f: dataclasses.Field, value: Any, hint: Any, source: str = "") -> Any:
    """Coerce and validate one leaf value; raise ConfigError naming `path` and `source`."""
    meta, origin = f.metadata, typing.get_origin(hint) or hint
    choices = meta.get("choices")
    bad = ConfigError(key=path, source=source, expected=describe(f, hint), got=value)
    if origin is list:
        items = list(value) if isinstance(value, (list, tuple)) else None
        if items is None or (meta.get("nonempty") and not items) or \
                (meta.get("unique") and len({repr(v) for v in items}) != len(items)):
            raise bad
        out = []
        for v in items:
            if choices is not None and v not in choices:
                bad.suggestion = closest(v, map(str, choices)) if isinstance(v, str) else ""
                raise bad
            if meta.get("item") is not None:
                v = _coerce(meta["item"], v)
                if v is _UNSET or not _in_range(meta, v):
                    raise bad
            out.append(v)
        return out
    checked = _coerce(origin, value)
    if checked is _UNSET or (origin in (int, float) and not _in_range(meta, checked)):
        raise bad
    if choices is not None and checked not in choices:
        bad.suggestion = closest(checked, map(str, choices)) if isinstance(checked, str) else ""
        raise bad
    return checked


def source_of(key: str, sources: Mapping[str, str] | None) -> str:
    """Where `key` was set: its own entry, a section given whole, or a key set inside it."""
    if not sources:
        return ""
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return next((s for k, s in sources.items() if k.startswith(key + ".")), "")


def _rank(source: str) -> int:
    return 0 if not source else 2 if source == COMMAND_LINE or source.startswith("-") else 1


def _blame(sources: Mapping[str, str] | None, *keys: str) -> str:
    """Of keys that clash, the one set most explicitly (the first on a tie)."""
    return max(keys, key=lambda k: _rank(source_of(k, sources)))


def _error(key: str, sources: Mapping[str, str] | None, expected: str, got: Any) -> ConfigError:
    return ConfigError(key=key, source=source_of(key, sources), expected=expected, got=got)


def _check_tree(node: Any, sources: Mapping[str, str] | None, prefix: str = "") -> None:
    hints = _hints(type(node))
    for f in dataclasses.fields(node):
        path = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _check_tree(value, sources, path)
        else:
            setattr(node, f.name, _check_value(path, f, value, hints[f.name], source_of(path, sources)))


def known_keys(cls: type = ExperimentConfig, prefix: str = "", sections: bool = False) -> list[str]:
    """Every dotted leaf key of `cls`'s tree (and its sections with `sections=True`)."""
    out = []
    for name, hint in _hints(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hint):
            out += ([path] if sections else []) + known_keys(hint, path, sections)
        else:
            out.append(path)
    return out


def _unknown(key: str, cls: type, prefix: str, source: str) -> ConfigError:
    suggestion = closest(key, known_keys(cls, prefix, sections=True))
    names = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    return ConfigError("" if suggestion else f"the keys {'of ' + prefix if prefix else 'at the top'} "
                       f"are {names}", key=key, source=source, unknown=True, suggestion=suggestion)


def check_key(key: str, cls: type = ExperimentConfig, source: str = "") -> None:
    """Raise ConfigError, with the closest known key, unless `key` names a field or section."""
    node, parts = cls, key.split(".")
    for i, part in enumerate(parts):
        hint = _hints(node).get(part)
        if hint is None:
            raise _unknown(key, node, ".".join(parts[:i]), source)
        if i < len(parts) - 1 and not dataclasses.is_dataclass(hint):
            raise _unknown(key, cls, "", source)
        node = hint


def check_leaf(key: str, value: Any, source: str = "", cls: type = ExperimentConfig) -> Any:
    """`value` coerced and checked for leaf `key` on its own (unknown keys raise too)."""
    check_key(key, cls, source)
    *sections, name = key.split(".")
    node = cls
    for part in sections:
        node = _hints(node)[part]
    f = {f.name: f for f in dataclasses.fields(node)}[name]
    if dataclasses.is_dataclass(_hints(node)[name]):
        raise ConfigError(key=key, source=source, expected="a single value, not a section", got=value)
    return _check_value(key, f, value, _hints(node)[name], source)


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_key(cfg: Any, key: str, value: Any) -> None:
    *sections, name = key.split(".")
    setattr(get_key(cfg, ".".join(sections)) if sections else cfg, name, value)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# ---------------------------------------------------------------------------------------------

def _first_leaf(key: str, value: Any) -> str:
    while isinstance(value, dict) and value:
        name, value = next(iter(value.items()))
        key = f"{key}.{name}"
    return key


def from_dict(cls: type, data: dict | None, prefix: str = "", *,
              sources: Mapping[str, str] | None = None) -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad values raise ConfigError,
    naming the source of the key when `sources` ({dotted key: source}) has it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(key=prefix or "<root>", source=source_of(prefix, sources),
                          expected="a mapping of keys to values", got=data)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in fields:
            key = _first_leaf(f"{prefix}.{name}" if prefix else str(name), value)
            raise _unknown(key, cls, prefix, source_of(key, sources))
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, path, sources=sources)
        else:
            kwargs[name] = _check_value(path, fields[name], value, hint, source_of(path, sources))
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'optim': {'seed': 1}} -> {'optim.seed': 1} (an empty section stays a value)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out |= flatten(value, path) if isinstance(value, dict) and value else {path: value}
    return out


def parse_override(text: str, source: str = COMMAND_LINE) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value), the value parsed as YAML (so 0.5, true, [id])."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(key=f"override {text!r}", source=source, expected="key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(key=key, source=source, expected="a YAML value (0.5, true, [id, text], ...)",
                          got=raw) from None
    return key.split("."), value


def _record(sources: dict, key: str, value: Any, source: str) -> None:
    """Note `source` for `key` and, when `value` is a mapping, for every key inside it."""
    for old in [k for k in sources if k == key or k.startswith(key + ".")] if key else []:
        del sources[old]
    if isinstance(value, dict) and value:
        for name, sub in value.items():
            _record(sources, f"{key}.{name}" if key else str(name), sub, source)
    elif key:
        sources[key] = source


def merge_overrides(data: dict, overrides: Iterable[str], *, cls: type | None = None,
                    source: str = COMMAND_LINE, sources: dict | None = None) -> dict:
    """Apply `key.path=value` overrides to the nested dict `data`. With `cls`, a key that is not in
    its tree raises ConfigError at once; `sources` gets `source` for every key set. A later value
    of a key replaces an earlier one (code composes lists so); a person's command line is checked
    for repeats first (`check_repeats`)."""
    for text in overrides:
        path, value = parse_override(text, source)
        key = ".".join(path)
        if cls is not None:
            check_key(key, cls, source)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{part} is not a section", key=key, source=source, unknown=True)
        node[path[-1]] = value
        if sources is not None:
            _record(sources, key, value, source)
    return data


def check_repeats(overrides: Iterable[str], source: str = COMMAND_LINE) -> None:
    """A key given twice on a command line (or a key and the section holding it) is a ConfigError
    naming both, instead of the last one winning without a word."""
    given: dict[str, str] = {}
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        clash = next((k for k in given if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            raise ConfigError(f"given twice ({given[clash]!r} and {text!r}); keep one", key=key, source=source)
        given[key] = text


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    text = problem or (str(exc).splitlines() or ["?"])[0]
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text


def load_tracked(path: str | Path | None = None, overrides: Iterable[str] = (),
                 cls: type = ExperimentConfig, *, override_source: str = COMMAND_LINE
                 ) -> tuple[Any, dict[str, str]]:
    """`load_config`, also returning {dotted key: source} for every key the YAML file (its path)
    or the overrides (`override_source`) set; errors name that source."""
    data: Any = {}
    sources: dict[str, str] = {}
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the config file ({exc.strerror or exc})", source=where) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {_yaml_problem(exc)}", source=where) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError("expected a mapping of keys to values at the top level", source=where)
        _record(sources, "", data, where)
    data = merge_overrides(data, overrides, cls=cls, source=override_source, sources=sources)
    cfg = from_dict(cls, data, sources=sources)
    if isinstance(cfg, ExperimentConfig):
        cfg.validate(sources)
    elif hasattr(cfg, "validate"):
        cfg.validate()
    return cfg, sources


def command_line_keys(sources: Mapping[str, str]) -> dict[str, str]:
    """The keys of `load_tracked`'s sources set by the overrides: the user's explicit requests."""
    return {key: src for key, src in sources.items() if src == COMMAND_LINE}


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                cls: type = ExperimentConfig) -> Any:
    """Load YAML (or defaults when `path` is None), apply `key=value` overrides, validate."""
    return load_tracked(path, overrides, cls)[0]


# ---------------------------------------------------------------------------------------------
# Variants of spec §4: ablations and the SASRec baseline as edits of one config
# ---------------------------------------------------------------------------------------------

def _drop_modality(cfg: ExperimentConfig, modality: str) -> None:
    cfg.model.modalities = [m for m in cfg.model.modalities if m != modality]


# Each variant flips its own switch; what that makes infeasible (-TMoE: PCL) is switched off by
# hm4sr_dist.feasibility.with_variant.
VARIANTS = {
    "hm4sr": lambda c: None,
    "-IMoE": lambda c: setattr(c.model, "use_interactive_moe", False),
    "-TMoE": lambda c: setattr(c.model, "use_temporal_moe", False),
    "-CP": lambda c: setattr(c.loss, "cp_weight", 0.0),
    "-IDCL": lambda c: setattr(c.loss, "idcl_weight", 0.0),
    "-PCL": lambda c: setattr(c.loss, "pcl_weight", 0.0),
    "-Text": lambda c: _drop_modality(c, "text"),
    "-Image": lambda c: _drop_modality(c, "image"),
    "sasrec": lambda c: (setattr(c.model, "modalities", ["id"]),
                         setattr(c.model, "use_interactive_moe", False),
                         setattr(c.model, "use_temporal_moe", False),
                         setattr(c.loss, "cp_weight", 0.0), setattr(c.loss, "idcl_weight", 0.0),
                         setattr(c.loss, "pcl_weight", 0.0)),
}


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(key="--variant", expected=f"one of {list(VARIANTS)}", got=variant,
                          suggestion=closest(variant, VARIANTS))


def apply_variant(cfg: ExperimentConfig, variant: str, *,
                  explicit: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Return a copy of `cfg` with one named variant of spec §4 applied (its own switch only; what
    that makes infeasible, -TMoE: PCL, is switched off by `hm4sr_dist.feasibility.with_variant`).

    `explicit` ({key: source}, the keys the user set) turns a key the variant would change into a
    ConfigError.
    """
    check_variant(variant)
    out = from_dict(type(cfg), to_dict(cfg))
    VARIANTS[variant](out)
    for key, source in (explicit or {}).items():
        if get_key(out, key) != get_key(cfg, key):
            raise ConfigError(f"conflicts with --variant={variant}, which sets it to "
                              f"{json.dumps(get_key(out, key))}", key=key, source=source)
    out.validate(explicit)
    return out
