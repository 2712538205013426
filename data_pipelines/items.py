"""Item tables aligned to dense IDs (row 0 = padding): metadata, categories, text and image features
(float16 .npy, memory-mapped by training; the manifest records each table's `dtype`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.canonical import CanonicalData
from data_pipelines.config import PrepConfig
from data_pipelines.features import run_actor_pool
from data_pipelines.preprocess import Prepared, raw_id_column

log = logging.getLogger(__name__)


def align_items(data: CanonicalData, prep: Prepared, stats: dict) -> pd.DataFrame | None:
    """Metadata per dense item (row i-1 = item i); items without metadata get empty fields."""
    if data.items is None:
        return None
    meta = data.items
    dup = meta["item"].duplicated(keep="first")
    stats["duplicate_item_metadata"] = int(dup.sum())
    meta = meta[~dup].set_index("item")
    raw_ids = raw_id_column(prep.item_raw).to_numpy(zero_copy_only=False).astype(str)
    aligned = meta.reindex(pd.Index(raw_ids, name="item"))
    has_meta = aligned["text"].notna().to_numpy()
    stats["items_without_metadata"] = int((~has_meta).sum())
    if (~has_meta).any():
        log.warning("%d of %d kept items have no metadata: their text/image features are zero "
                    "vectors and they have no categories", int((~has_meta).sum()), len(aligned))
    out = pd.DataFrame({
        "item_id": np.arange(1, prep.n_items + 1, dtype=np.int64),
        "raw_id": raw_ids,
        "has_metadata": has_meta,
        "text": aligned["text"].fillna("").astype(str).to_numpy(),
        "categories": pd.Series([c if isinstance(c, list) else [] for c in aligned["categories"]],
                                dtype=object),
        "image": pd.Series([v if isinstance(v, str) and v else None for v in aligned["image"]],
                           dtype=object),  # object: keep None (pandas 3 infers str + NaN)
    })
    return out


def category_table(items: pd.DataFrame, fixed_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Multi-hot uint8 (n_items + 1, C); names in the source's order, else sorted."""
    names = list(fixed_names) or sorted({c for cs in items["categories"] for c in cs})
    index = {n: j for j, n in enumerate(names)}
    table = np.zeros((len(items) + 1, len(names)), dtype=np.uint8)
    for row, cats in zip(items["item_id"], items["categories"]):
        for c in cats:
            table[row, index[c]] = 1
    return table, names


def text_features(items: pd.DataFrame, cfg: PrepConfig, stats: dict) -> tuple[np.ndarray, dict]:
    from data_pipelines.features.text import TextEncoder, resolve_text_model

    model, note = resolve_text_model(cfg.text_model, cfg.text_fallback)
    todo = items[items["has_metadata"] & (items["text"].str.strip() != "")]
    stats["items_without_text"] = int(len(items) - len(todo))
    frame = pd.DataFrame({"item_id": todo["item_id"].to_numpy(), "text": todo["text"].to_numpy()})
    out = run_actor_pool(frame, TextEncoder,
                         {"model": model, "pooling": cfg.text_pooling, "max_tokens": cfg.text_max_tokens},
                         len(items) + 1, cfg.text_batch_size, cfg.num_actors, cfg.progress)
    info = {"model": cfg.text_model, "loaded_from": model, "source": note, "pooling": cfg.text_pooling,
            "missing": stats["items_without_text"], "dtype": out["dtype"]}
    return out["table"], info


def image_features(items: pd.DataFrame, cfg: PrepConfig, stats: dict) -> tuple[np.ndarray, dict]:
    from data_pipelines.features.image import ImageEncoder

    refs = {int(i): (r if isinstance(r, str) and r else None)
            for i, r in zip(items["item_id"], items["image"])}
    download = {}
    if cfg.download_images:
        from data_pipelines.features.download import fetch_images

        urls = {str(i): r for i, r in refs.items() if r and "://" in r}
        cache = cfg.image_cache_dir or str(Path(cfg.out_dir).parent / (Path(cfg.out_dir).name + "-images"))
        paths, download = fetch_images(urls, cache, cfg.download_workers, cfg.download_retries,
                                       cfg.progress)
        refs.update({int(i): p for i, p in paths.items()})
    not_local = [i for i, r in refs.items() if r and "://" in r]
    for i in not_local:  # a URL that was not downloaded: counted as missing, like no image at all
        refs[i] = None
    frame = pd.DataFrame({"item_id": np.array(list(refs), dtype=np.int64),
                          "image": [r or "" for r in refs.values()]})
    out = run_actor_pool(frame, ImageEncoder,
                         {"model": cfg.image_model, "pretrained": cfg.image_pretrained,
                          "checkpoint": cfg.image_checkpoint},
                         len(items) + 1, cfg.image_batch_size, cfg.num_actors, cfg.progress)
    missing = int((~out["ok"][1:]).sum())
    stats["items_without_image"] = missing
    if missing:
        log.warning("%d of %d items have a missing or unreadable image: zero vectors", missing, len(items))
    info = {"model": cfg.image_model, "pretrained": cfg.image_pretrained,
            "checkpoint": cfg.image_checkpoint or None, "missing": missing,
            "random_init": not cfg.image_pretrained and not cfg.image_checkpoint,
            "download": {k: v for k, v in download.items()} or None, "dtype": out["dtype"]}
    return out["table"], info


def has_images(items: pd.DataFrame | None) -> bool:
    return items is not None and any(bool(r) for r in items["image"])


def save_table(out_dir: Path, name: str, table: np.ndarray) -> str:
    """`table` as `<out_dir>/<name>` (.npy, its own dtype, C order: training memory-maps it)."""
    np.save(out_dir / name, np.ascontiguousarray(table), allow_pickle=False)
    return name
