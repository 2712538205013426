"""`hm4sr-prepare --verify DIR`: read a prepared folder the way training will, and say whether it
is intact: the manifest, every shard's size and sha256, every sample decoded with its item IDs
and timestamps range-checked, and the users and samples of every shard counted against the
manifest. One line either way; the first problem names the shard (and the sample)."""

from __future__ import annotations

from hm4sr_dist.data.manifest import SHARD_DIR, DataLocation, ManifestError, read_manifest, verify_shards
from hm4sr_dist.data.records import SPLITS, Bounds, iter_shard_tarfile, split_count


def verify_folder(prepared_dir: str) -> str:
    """A one-line summary of an intact folder; raises ManifestError or ShardError otherwise."""
    where = DataLocation(prepared_dir)
    manifest = read_manifest(where)
    verify_shards(where, manifest, check="size")              # missing or cut shards, before reading
    bounds = Bounds.from_manifest(manifest)
    users = actions = 0
    for entry in manifest["shards"]:
        shard = where.child(SHARD_DIR, entry["file"])
        counts = dict.fromkeys(("users",) + SPLITS, 0)
        for _key, items, _times in iter_shard_tarfile(shard, entry["sha256"], bounds):
            counts["users"] += 1
            actions += len(items)
            for split in SPLITS:
                counts[split] += split_count(len(items), split)
        wrong = {k: (v, entry[k]) for k, v in counts.items() if v != entry[k]}
        if wrong:
            raise ManifestError(f"shard {shard.name()}: holds " + ", ".join(
                f"{k} {got} (the manifest says {want})" for k, (got, want) in wrong.items()))
        users += counts["users"]
    checked = "item IDs and timestamps range-checked" if bounds else "no item/time range in the manifest"
    return (f"ok: {where.name()}: {len(manifest['shards'])} shards, {users:,} users, {actions:,} actions; "
            f"sizes and sha256 match the manifest; {checked}")
