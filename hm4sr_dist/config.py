"""Typed configuration: dataclasses, loaded from YAML, overridden from the command line.

One tree (`ExperimentConfig`) feeds the model, the losses, training and Ray Tune. Every field
carries its help text and its allowed range in `metadata`, so loading validates in one place and
errors name the offending key (``model.hidden_size: expected an int >= 1, got 0``).

    cfg = load_config("configs/hm4sr_paper.yaml", overrides=["loss.idcl_weight=0.5"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

MODALITIES = ("id", "text", "image")
TIME_EMBEDDINGS = ("interval_absolute", "interval", "absolute", "day", "day_of_year", "cos_interval")


class ConfigError(ValueError):
    """A configuration value that is unknown, of the wrong type or out of range."""


def _f(default: Any, help: str, *, min: float | None = None, max: float | None = None,
       choices: Iterable[Any] | None = None, min_exclusive: bool = False) -> Any:
    """A dataclass field with its help text and validation bounds in metadata."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive,
            "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """HM4SR architecture (paper §4; spec §2). Defaults are the paper's / authors' settings."""

    hidden_size: int = _f(64, "d, the width of every item, position and hidden vector", min=1)
    max_seq_len: int = _f(50, "longest input sequence; longer histories keep their last items", min=1)
    modalities: list = _f(["id", "text", "image"], "item modalities used (any non-empty subset)",
                          choices=MODALITIES)
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


@dataclass
class LossConfig:
    """Loss weights and their parameters (eq. 20-27). A weight of 0 removes the term."""

    cp_weight: float = _f(1.0, "lambda_1, category prediction (0 = ablation -CP)", min=0.0)
    idcl_weight: float = _f(1.0, "lambda_2, ID contrastive learning (0 = ablation -IDCL)", min=0.0)
    pcl_weight: float = _f(1.0, "lambda_3, placeholder contrastive learning (0 = ablation -PCL)", min=0.0)
    idcl_temperature: float = _f(0.2, "tau of eq. 23", min=0.0, min_exclusive=True)
    pcl_temperature: float = _f(1.0, "temperature of eq. 25 (the paper's has none, i.e. 1.0)",
                                min=0.0, min_exclusive=True)
    pcl_ratio: float = _f(0.3, "beta: share of real positions replaced by the time placeholder",
                          min=0.0, max=1.0)


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

    ks: list = _f([5, 10], "cut-offs K for NDCG@K, MRR@K and Hit@K")
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
    storage_path: str = _f("outputs/ray_results", "Ray Train storage (shared path or URI on a cluster)")
    run_name: str = _f("", "Ray Train run name; re-running with the same name resumes it ('' = cfg.name)")
    max_failures: int = _f(2, "worker-group restarts from the last checkpoint before giving up", min=-1)
    checkpoints_to_keep: int = _f(2, "most recent checkpoints kept in storage", min=1)
    log_every_steps: int = _f(20, "steps between progress lines and TensorBoard scalars", min=1)
    tensorboard_dir: str = _f("", "TensorBoard event folder ('' = <storage>/<run>/tensorboard)")
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

    def validate(self) -> "ExperimentConfig":
        """Checks that span fields (value ranges are checked on load)."""
        m = self.model
        if not m.modalities:
            raise ConfigError("model.modalities: expected a non-empty subset of "
                              f"{list(MODALITIES)}, got []")
        if len(set(m.modalities)) != len(m.modalities):
            raise ConfigError(f"model.modalities: duplicate entries in {m.modalities}")
        if m.hidden_size % m.n_heads:
            raise ConfigError(f"model.hidden_size: {m.hidden_size} is not divisible by "
                              f"model.n_heads={m.n_heads}")
        if not self.eval.ks or any((not isinstance(k, int)) or k < 1 for k in self.eval.ks):
            raise ConfigError(f"eval.ks: expected a list of ints >= 1, got {self.eval.ks}")
        known = {f"{name}@{k}" for name in ("ndcg", "mrr", "hit") for k in self.eval.ks}
        if self.eval.valid_metric not in known:
            raise ConfigError(f"eval.valid_metric: expected one of {sorted(known)}, "
                              f"got {self.eval.valid_metric!r}")
        per_step = self.train.num_workers * self.train.grad_accum_steps
        if self.optim.batch_size % per_step:
            raise ConfigError(f"optim.batch_size: {self.optim.batch_size} is not divisible by "
                              f"train.num_workers * train.grad_accum_steps = {per_step}")
        return self

    @property
    def micro_batch_size(self) -> int:
        """Sequences per worker per forward pass."""
        return self.optim.batch_size // (self.train.num_workers * self.train.grad_accum_steps)


# ---------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# ---------------------------------------------------------------------------------------------

def _check_value(path: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """Coerce and validate one leaf value; raise ConfigError naming `path`."""
    meta = f.metadata
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an int, got {value!r}")
    elif origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif origin is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
        op = ">" if meta.get("min_exclusive") else ">="
        raise ConfigError(f"{path}: expected a value {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{path}: expected a value <= {hi}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if v not in choices]
        if bad:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {bad[0]!r}")
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad values raise ConfigError."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known keys here: {sorted(fields)})")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(hint, value, path)
        else:
            kwargs[name] = _check_value(path, fields[name], value, hint)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value), the value parsed as YAML (so 0.5, true, [id])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def merge_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                cls: type = ExperimentConfig) -> Any:
    """Load YAML (or defaults when `path` is None), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = merge_overrides(data, overrides)
    try:
        cfg = from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    return cfg.validate() if hasattr(cfg, "validate") else cfg


# ---------------------------------------------------------------------------------------------
# Variants of spec §4: ablations and the SASRec baseline as edits of one config
# ---------------------------------------------------------------------------------------------

def _drop_modality(cfg: ExperimentConfig, modality: str) -> None:
    cfg.model.modalities = [m for m in cfg.model.modalities if m != modality]


VARIANTS = {
    "hm4sr": lambda c: None,
    "-IMoE": lambda c: setattr(c.model, "use_interactive_moe", False),
    "-TMoE": lambda c: (setattr(c.model, "use_temporal_moe", False), setattr(c.loss, "pcl_weight", 0.0)),
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


def apply_variant(cfg: ExperimentConfig, variant: str) -> ExperimentConfig:
    """Return a copy of `cfg` with one named variant of spec §4 applied."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    out = from_dict(type(cfg), to_dict(cfg))
    VARIANTS[variant](out)
    return out.validate()
