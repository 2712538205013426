"""Reading prepared data: the item catalogue and per-rank batches (written by `data_pipelines`)."""

from hm4sr_dist.data.catalog import load_catalog
from hm4sr_dist.data.manifest import ManifestError, read_manifest, verify_shards
from hm4sr_dist.data.reader import EvalBatch, ShardReader, assign_shards, collate
from hm4sr_dist.data.records import ShardError, split_count, split_ends

__all__ = ["load_catalog", "read_manifest", "verify_shards", "ManifestError", "ShardError",
           "ShardReader", "EvalBatch", "assign_shards", "collate", "split_count", "split_ends"]
