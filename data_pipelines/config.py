"""`PrepConfig`: every knob of the data preparation, with defaults from the paper (§5.1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hm4sr_dist.data.manifest import is_uri

# Fields that change how the work runs but not what it produces: left out of the fingerprint.
RUNTIME_ONLY = ("force", "num_actors", "num_cpus", "progress", "download_workers", "out_dir",
                "text_batch_size", "image_batch_size", "memory_budget_mb", "spill_dir", "engine")
MIN_MEMORY_BUDGET_MB = 384  # the preparation's interpreter alone is ~170 MB (pandas, pyarrow, ray.data)

PATH_FIELDS = ("input_dir", "interactions", "items", "image_dir", "image_cache_dir", "image_checkpoint")


@dataclass
class PrepConfig:
    """One preparation run. `source` picks the adapter; the input fields it needs are listed there."""

    source: str                               # amazon2014 | movielens | sequence | tabular
    out_dir: str
    name: str = ""                            # data set name for the manifest (default: input name)
    # --- inputs (per source) ---
    input_dir: str = ""                       # amazon2014 / movielens / sequence: the folder
    category: str = ""                        # amazon2014: <Cat> of reviews_<Cat>_5.json.gz
    interactions: str = ""                    # tabular: .parquet or .csv
    items: str = ""                           # tabular: optional item table
    user_col: str = "user"
    item_col: str = "item"
    time_col: str = "timestamp"
    item_id_col: str = "item"
    text_cols: list = field(default_factory=lambda: ["title"])
    category_col: str = ""
    image_col: str = ""
    time_unit: str = "s"                      # tabular: s | ms (the time column's unit)
    # --- validation ---
    strict: bool = False                      # raise on the first bad row instead of a counted drop
    max_future_seconds: int = 86400           # drop timestamps later than now + this
    # --- preprocessing (spec §1) ---
    k_core: int = 5
    max_len: int = 50
    mu: float = 100.0                         # eq. 12, for the interval-bucket statistics
    # --- features ---
    text_model: str = "bert-base-uncased"     # HF name or local folder; "minilm-offline" = bundled
    text_fallback: bool = True                # use the bundled MiniLM when text_model is unreachable
    text_pooling: str = "cls"                 # cls (the paper) | mean
    text_max_tokens: int = 128
    image_model: str = "vit_base_patch16_224"  # timm name
    image_checkpoint: str = ""                # local weights for the timm model
    image_pretrained: bool = True             # False: random init (tests; logged loudly)
    image_dir: str = ""                       # local images named <raw item id>.<ext>
    download_images: bool = False             # fetch imUrl (amazon2014) into image_cache_dir
    image_cache_dir: str = ""
    download_retries: int = 3
    images: bool = True                       # --no-images: skip image features
    text: bool = True                         # --no-text: skip text features
    # --- shards ---
    target_shard_bytes: int = 64 << 20
    min_shards: int = 32                      # >= ranks x loader workers; more = better rank balance
    # --- runtime ---
    num_actors: int = 1
    num_cpus: int = 0                         # for a local ray.init (0 = Ray's default)
    text_batch_size: int = 64
    image_batch_size: int = 32
    download_workers: int = 16
    force: bool = False
    progress: bool = True
    # ray-data: the object store of a Ray this preparation starts (0: Ray's default; it spills to
    # disk past it); streaming: chunks, buckets and ranges are sized to keep peak RSS near this
    # many MB (the O(users + items) ID maps come on top: docs/scaling.md)
    memory_budget_mb: int = 0
    spill_dir: str = ""                       # streaming scratch files (default: beside out_dir)
    # "ray-data": the preparation as one Ray Data pipeline (ray_prep.py), on one machine or a
    # cluster; "streaming": one process, an external sort on local disk (streaming_prep.py), the
    # same output in a fraction of the memory on a single machine; "": streaming when a
    # memory_budget_mb is given, else ray-data
    engine: str = ""

    def resolved_engine(self) -> str:
        return self.engine or ("streaming" if self.memory_budget_mb > 0 else "ray-data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint_fields(self) -> dict[str, Any]:
        """Fields the output depends on; paths made absolute so their spelling does not count."""
        out = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}
        for key in PATH_FIELDS:
            if out.get(key) and not is_uri(out[key]):
                out[key] = str(Path(out[key]).resolve())
        return out


# The least value of each count a preparation cannot work below (`--min-shards 0` once wrote one
# shard that training then refused; `--max-len 0` kept no input at all).
LEAST = {"max_len": 1, "min_shards": 1, "target_shard_bytes": 1, "k_core": 1, "text_max_tokens": 1,
         "text_batch_size": 1, "image_batch_size": 1, "num_actors": 1, "download_workers": 1,
         "download_retries": 0, "max_future_seconds": 0}
FOLDER_SOURCES = ("amazon2014", "movielens", "sequence")     # read from --input-dir
ENGINES = ("", "ray-data", "streaming")


def config_problem(cfg: "PrepConfig") -> str | None:
    """The first setting a preparation cannot run with, named by its key (`--min-shards` on the
    command line, `--prep min_shards=` in the jobs); None if every one is usable. Checked before
    anything is read or Ray starts."""
    for key, least in LEAST.items():
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"{key}: expected a whole number >= {least}, got {value!r}"
    if not cfg.mu > 0:
        return f"mu: expected a number > 0, got {cfg.mu!r}"
    if cfg.source in FOLDER_SOURCES:
        if not cfg.input_dir:
            return f"input_dir: source {cfg.source} reads a folder (--input-dir); none was given"
        if not Path(cfg.input_dir).is_dir():
            return f"input_dir: {cfg.input_dir} is not a folder"
    if cfg.source == "tabular" and not cfg.interactions:
        return "interactions: source tabular reads a .parquet or .csv file (--interactions); none was given"
    if cfg.engine not in ENGINES:
        return f"engine: expected one of {ENGINES}, got {cfg.engine!r}"
    if problem := check_memory_budget(cfg.memory_budget_mb):
        return f"memory_budget_mb: {problem}"
    for key in ("interactions", "items", "out_dir"):
        if is_uri(getattr(cfg, key)) and cfg.resolved_engine() == "streaming":
            return (f"{key}: {getattr(cfg, key)} is a URI; the streaming engine reads and writes local "
                    "files (object storage: --engine ray-data)")
    if cfg.engine == "streaming" and cfg.memory_budget_mb == 0:
        return (f"memory_budget_mb: the streaming engine sizes its passes to a budget; give one "
                f"(>= {MIN_MEMORY_BUDGET_MB} MB)")
    return None


def check_memory_budget(value: object) -> str | None:
    """None when `memory_budget_mb` is usable, else what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected a whole number of MB, got {value!r}"
    if value != 0 and value < MIN_MEMORY_BUDGET_MB:
        return f"expected 0 (no budget: Ray's default object store) or >= {MIN_MEMORY_BUDGET_MB} MB, got {value}"
    return None
