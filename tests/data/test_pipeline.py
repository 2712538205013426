"""End to end: raw Amazon-format files (text + drawn images) -> prepare (Ray Data actor pools,
WebDataset shards) -> reader / catalogue, checked against a brute-force reference."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_pipelines.config import PrepConfig
from data_pipelines.prepare import prepare
from hm4sr_dist.data import ShardReader, load_catalog, read_manifest
from tests.data.fixtures import expected_sequences, make_log, write_amazon

K = 3
VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def amazon(tmp_path_factory, local_ray):
    """One prepared Amazon-format data set with MiniLM text and tiny-ViT image features."""
    root = tmp_path_factory.mktemp("amazon")
    log = make_log(seed=1, n_users=40, n_items=9)
    write_amazon(root / "raw", log, image_dir=root / "images")
    import timm  # a fixed random ViT saved as a local checkpoint: the test can recompute features
    torch.manual_seed(0)
    torch.save(timm.create_model(VIT, pretrained=False, num_classes=0).state_dict(), root / "vit.pt")
    cfg = PrepConfig("amazon2014", str(root / "prepared"), input_dir=str(root / "raw"), k_core=K,
                     image_dir=str(root / "images"), text_model="minilm-offline",
                     image_model=VIT, image_pretrained=False, image_checkpoint=str(root / "vit.pt"),
                     min_shards=5, progress=False)
    manifest = prepare(cfg)
    return {"root": root, "log": log, "cfg": cfg, "manifest": manifest, "dir": root / "prepared"}


def raw_maps(prepared: Path):
    items = pd.read_parquet(prepared / "items.parquet")
    return dict(zip(items["item_id"], items["raw_id"])), items


def test_round_trip_preserves_every_interaction(amazon):
    expected = expected_sequences(amazon["log"], k=K)
    assert len({i for s in expected.values() for i, _ in s}) == 9  # all items survive (precondition)
    m = amazon["manifest"]
    assert m["status"] == "written"
    assert m["counts"]["users"] == len(expected)
    assert m["counts"]["actions"] == sum(len(s) for s in expected.values())
    to_raw, _ = raw_maps(amazon["dir"])

    def rows(split, **kw):
        out = []
        for eb in ShardReader(amazon["dir"], split, batch_size=7, **kw):
            b, mask = (eb.batch, eb.mask) if split != "train" else (eb, torch.ones(len(eb), dtype=bool))
            assert b.item_seq.dtype == torch.int64 and b.time_seq.dtype == torch.int64
            for r in torch.nonzero(mask).flatten().tolist():
                n = int(b.seq_len[r])
                assert (b.item_seq[r, n:] == 0).all()                       # right padding
                seq = tuple((to_raw[int(i)], int(t)) for i, t in zip(b.item_seq[r, :n], b.time_seq[r, :n]))
                out.append((seq, to_raw[int(b.target[r])]))
        return out

    # test input + target = the whole kept history, items and timestamps exactly
    test = rows("test")
    full = Counter(seq + ((tgt, None),) for seq, tgt in test)
    want = Counter(tuple(s[:-1]) + ((s[-1][0], None),) for s in expected.values())
    assert full == want
    valid = Counter(rows("valid"))
    assert valid == Counter((tuple(s[:-2]), s[-2][0]) for s in expected.values())
    train = rows("train", shuffle=True, equalize="drop", seed=3)
    prefixes = Counter((tuple(s[:e]), s[e][0]) for s in expected.values() for e in range(1, len(s) - 2))
    assert len(train) == 7 * (sum(prefixes.values()) // 7)
    assert not Counter(train) - prefixes                             # every sample is a real prefix
    pad = rows("train", shuffle=True, equalize="pad", seed=3)
    assert set(pad) == set(prefixes)                                 # pad mode loses no sample


def test_features_land_on_the_right_rows(amazon):
    from data_pipelines.features.image import ImageEncoder
    from data_pipelines.features.text import TextEncoder, bundled_minilm_dir

    to_raw, items = raw_maps(amazon["dir"])
    cat = load_catalog(amazon["dir"])
    assert cat.n_items == 9 and cat.text_features.shape == (10, 384) and cat.image_features.shape == (10, 192)
    # stored in float16 (memory-mapped by training): compared at fp16 rounding, rtol 2^-11 < 1e-3
    assert cat.text_features.dtype == cat.image_features.dtype == torch.float16
    assert amazon["manifest"]["features"]["text"]["dtype"] == "float16"
    direct = TextEncoder(str(bundled_minilm_dir()))(
        {"item_id": items["item_id"].to_numpy(), "text": items["text"].to_numpy()})["feature"]
    for row, iid, has_meta in zip(direct, items["item_id"], items["has_metadata"]):
        got = cat.text_features[iid].numpy()
        if has_meta:
            np.testing.assert_allclose(got, row, rtol=1e-3, atol=1e-4)
        else:                                          # I8 has no metadata: zero vector, counted
            assert to_raw[iid] == "I8" and not got.any()
    enc = ImageEncoder(VIT, pretrained=False, checkpoint=str(amazon["root"] / "vit.pt"))
    refs = items["image"].fillna("").to_numpy()
    direct = enc({"item_id": items["item_id"].to_numpy(), "image": refs})
    for iid, row, ok in zip(items["item_id"], direct["feature"], direct["ok"]):
        np.testing.assert_allclose(cat.image_features[iid].numpy(), row, rtol=1e-3, atol=1e-4)
        assert ok == (to_raw[iid] not in ("I0", "I7", "I8"))           # unreadable / no file / no meta
    stats = amazon["manifest"]["counts"]["items_stats"]
    assert stats["items_without_image"] == 3 and stats["items_without_metadata"] == 1
    assert amazon["manifest"]["features"]["image"]["random_init"] is False  # weights from checkpoint
    assert (cat.text_features[0] == 0).all() and (cat.categories[0] == 0).all()
    names = (amazon["dir"] / "category_names.json").read_text()
    i1 = items.set_index("raw_id").loc["I1", "item_id"]
    import json
    on = {json.loads(names)[j] for j in torch.nonzero(cat.categories[i1]).flatten().tolist()}
    assert on == {"Toys", "Cat1", "Extra"}


def test_catalog_time_axis(amazon):
    expected = expected_sequences(amazon["log"], k=K)
    cat = load_catalog(amazon["dir"])
    stamps = [t for s in expected.values() for _, t in s]
    assert cat.time_origin == min(stamps)
    assert cat.n_days == (max(stamps) - min(stamps)) // 86400 + 1
    gaps = [b[1] - a[1] for s in expected.values() for a, b in zip(s[: len(s) - 3], s[1: len(s) - 2])]
    from hm4sr_dist.model.time import max_bucket_for
    assert cat.max_interval_bucket == max_bucket_for(max(gaps), 100.0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_steps_and_eval_sees_each_user_once(amazon, world_size):
    d = amazon["dir"]
    for equalize in ("pad", "drop"):
        readers = [ShardReader(d, "train", 4, r, world_size, seed=1, epoch=2, equalize=equalize)
                   for r in range(world_size)]
        steps = [sum(1 for _ in rd) for rd in readers]
        assert steps == [len(rd) for rd in readers] and len(set(steps)) == 1
        assert all(len(b) == 4 for b in readers[0])
    seen = Counter()
    for r in range(world_size):
        rd = ShardReader(d, "test", 8, r, world_size)
        batches = list(rd)
        assert len(batches) == len(rd) == len(ShardReader(d, "test", 8, 0, world_size))
        for eb in batches:
            assert len(eb.batch) == 8 and (eb.batch.seq_len >= 1).all()
            for row in torch.nonzero(eb.mask).flatten().tolist():
                seen[tuple(eb.batch.item_seq[row, : int(eb.batch.seq_len[row])].tolist())
                     + (int(eb.batch.target[row]),)] += 1
    assert sum(seen.values()) == amazon["manifest"]["counts"]["users"]
    # same epoch + seed -> same order; another epoch -> another order
    a = [b.target.tolist() for b in ShardReader(d, "train", 4, 0, 1, seed=1, epoch=0)]
    b = [b.target.tolist() for b in ShardReader(d, "train", 4, 0, 1, seed=1, epoch=0)]
    c = [b.target.tolist() for b in ShardReader(d, "train", 4, 0, 1, seed=1, epoch=1)]
    assert a == b and a != c


def test_webdataset_backend_reads_the_same(amazon):
    d = amazon["dir"]
    a = [eb.batch.item_seq for eb in ShardReader(d, "valid", 16, backend="tarfile")]
    b = [eb.batch.item_seq for eb in ShardReader(d, "valid", 16, backend="webdataset")]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_corrupt_and_mismatched_shards_are_named(amazon, tmp_path):
    from hm4sr_dist.data import ManifestError, ShardError, verify_shards

    d = tmp_path / "copy"
    shutil.copytree(amazon["dir"], d)
    shard = sorted((d / "shards").glob("*.tar"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])                  # truncated
    with pytest.raises(ManifestError, match=rf"shard .*{shard.name}: .* bytes"):
        ShardReader(d, "valid", 4, verify="size")
    with pytest.raises(ShardError, match=rf"shard .*{shard.name}"):
        list(ShardReader(d, "valid", 4, verify="none"))
    flipped = bytearray(data)
    flipped[700] ^= 0xFF                                             # same size, other bytes
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ManifestError, match=rf"{shard.name}: sha256 differs"):
        verify_shards(d, check="sha256")
    shard.write_bytes(data)
    manifest = read_manifest(d)
    manifest["shards"][1]["users"] += 1                              # a manifest that lies
    import json
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=rf"{shard.name}: holds"):
        list(ShardReader(d, "valid", 4, verify="sha256"))
