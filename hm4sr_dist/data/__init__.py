"""Reading prepared data: the item catalogue and per-rank batches (written by `data_pipelines`).

The on-disk format, `records` (shard samples) and `manifest` (the folder's index), imports numpy
and the standard library only: the data pipeline's Ray Data tasks import it without torch or the
model. The names below are therefore resolved lazily, so `import hm4sr_dist.data.records` does
not pull in the reader (torch) or the catalogue (the model).
"""

from importlib import import_module

_WHERE = {
    "load_catalog": "catalog",
    "ManifestError": "manifest", "read_manifest": "manifest", "verify_shards": "manifest",
    "EvalBatch": "reader", "ShardReader": "reader", "assign_shards": "reader", "collate": "reader",
    "ShardError": "records", "split_count": "records", "split_ends": "records",
    "user_samples": "records",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
