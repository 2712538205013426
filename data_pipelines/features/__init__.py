"""Frozen item features as Ray Data actor pools: text (transformers) and images (timm), gathered
into float16 tables (n_items + 1, w) that training memory-maps."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Frozen features are stored in half precision: half the disk and page cache of float32, and
# the model upcasts them per block (hm4sr_dist/model/items.py). Rounding: 2^-11 relative.
FEATURE_DTYPE = "float16"


def _gpus_per_actor() -> float:
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_actor_pool(frame: pd.DataFrame, encoder: type, ctor_kwargs: dict, n_rows: int,
                   batch_size: int, num_actors: int, progress: bool = True,
                   dtype: str = FEATURE_DTYPE) -> dict[str, np.ndarray]:
    """Run `encoder` over `frame` with Ray Data map_batches on an actor pool and gather its output
    columns into an (n_rows, w) table of `dtype`, row = item_id. Rows without output stay zero.

    Each batch is written into the table as it arrives (no concatenated float32 copy). A float16
    table that a value would overflow (|x| > 65504) is widened to float32 once, with a warning;
    the returned `dtype` says which was kept.
    """
    import ray
    from tqdm import tqdm

    ds = ray.data.from_pandas(frame).repartition(max(1, -(-len(frame) // batch_size)))
    out = ds.map_batches(encoder, fn_constructor_kwargs=ctor_kwargs, batch_size=batch_size,
                         batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
                         num_gpus=_gpus_per_actor())
    table, seen = None, np.zeros(n_rows, dtype=np.int64)
    ok = np.zeros(n_rows, dtype=bool)
    with tqdm(total=len(frame), desc=encoder.__name__, unit=" items", disable=not progress) as bar:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            item_id = np.asarray(batch["item_id"]).astype(np.int64)
            feature = np.asarray(batch["feature"], dtype=np.float32)
            if table is None:
                table = np.zeros((n_rows, feature.shape[1]), dtype=dtype)
            table = _fit_dtype(table, feature, encoder.__name__)
            table[item_id] = feature
            np.add.at(seen, item_id, 1)
            ok[item_id] = batch["ok"] if "ok" in batch else True
            bar.update(len(item_id))
    if table is None or int(seen.sum()) != len(frame) or int(seen.max(initial=0)) > 1:
        raise RuntimeError(f"{encoder.__name__}: got {int(seen.sum())} rows for {len(frame)} items")
    return {"table": table, "ok": ok, "dtype": table.dtype.name}


def _fit_dtype(table: np.ndarray, feature: np.ndarray, name: str) -> np.ndarray:
    """`table`, widened to float32 if `feature` does not fit its (float16) range."""
    largest = float(np.abs(feature).max()) if feature.size else 0.0
    if table.dtype == np.float16 and largest > float(np.finfo(np.float16).max):
        log.warning("%s: a feature value exceeds the float16 range (%.3g): keeping float32 features",
                    name, largest)
        return table.astype(np.float32)
    return table
