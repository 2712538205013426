"""Frozen item features as Ray Data actor pools: text (transformers) and images (timm)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def _gpus_per_actor() -> float:
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_actor_pool(frame: pd.DataFrame, encoder: type, ctor_kwargs: dict, n_rows: int,
                   batch_size: int, num_actors: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Run `encoder` over `frame` with Ray Data map_batches on an actor pool and gather its output
    columns, ordered by item_id. Rows of the table without output stay zero."""
    import ray
    from tqdm import tqdm

    ds = ray.data.from_pandas(frame).repartition(max(1, -(-len(frame) // batch_size)))
    out = ds.map_batches(encoder, fn_constructor_kwargs=ctor_kwargs, batch_size=batch_size,
                         batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
                         num_gpus=_gpus_per_actor())
    ids, feats, oks = [], [], []
    with tqdm(total=len(frame), desc=encoder.__name__, unit=" items", disable=not progress) as bar:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            ids.append(batch["item_id"])
            feats.append(batch["feature"])
            if "ok" in batch:
                oks.append(batch["ok"])
            bar.update(len(batch["item_id"]))
    item_id = np.concatenate(ids).astype(np.int64)
    feature = np.concatenate(feats).astype(np.float32)
    if len(np.unique(item_id)) != len(item_id) or len(item_id) != len(frame):
        raise RuntimeError(f"{encoder.__name__}: got {len(item_id)} rows for {len(frame)} items")
    table = np.zeros((n_rows, feature.shape[1]), dtype=np.float32)
    table[item_id] = feature
    ok = np.zeros(n_rows, dtype=bool)
    ok[item_id] = np.concatenate(oks) if oks else True
    return {"table": table, "ok": ok}
