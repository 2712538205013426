"""Frozen feature tables (eq. 2-3) as float16 memory-mapped files, and the ID-only item table.

The tables are mapped read-only from .npy files (`hm4sr_dist.data.catalog.map_feature_table`),
held by `ItemEmbedding.features` outside the module's parameters and buffers, and projected block
by block (`hm4sr_dist.model.items._FrozenProjection`).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from hm4sr_dist.data.catalog import load_catalog, map_feature_table
from hm4sr_dist.data.manifest import ManifestError
from hm4sr_dist.model import ItemCatalog
from hm4sr_dist.model.items import FrozenFeatures, ItemEmbedding, project_frozen
from hm4sr_dist.train.evaluation import fp32_model
from hm4sr_tiny import D, N_ITEMS, make_model, randomize_, tiny_batch, tiny_catalog, tiny_model_cfg

REPO = Path(__file__).resolve().parents[2]


def _file_mappings(path: Path, pid: str = "self") -> list[dict]:
    """The /proc/<pid>/smaps entries that map `path`: address range and page counters (kB)."""
    found, current = [], None
    target = str(path.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = None
            if len(head) >= 6 and head[5] == target:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = {"lo": lo, "hi": hi}
                found.append(current)
        elif current is not None and head and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
            current[head[0][:-1]] = int(head[1])
    return found


def _write_prepared(folder: Path, catalog: ItemCatalog, dtype=np.float16,
                    manifest_dtype: bool = True) -> Path:
    """A minimal prepared folder: the manifest fields load_catalog reads and the feature .npy files."""
    folder.mkdir(parents=True, exist_ok=True)
    features = {}
    for m in ("text", "image"):
        table = catalog.feature_table(m).numpy().astype(dtype)
        np.save(folder / f"{m}_features.npy", table)
        features[m] = {"file": f"{m}_features.npy", "width": int(table.shape[1])}
        if manifest_dtype:
            features[m]["dtype"] = np.dtype(dtype).name
    np.save(folder / "categories.npy", catalog.categories.numpy().astype(np.uint8))
    manifest = {"schema_version": 1, "counts": {"items": catalog.n_items}, "shards": [], "max_len": 7,
                "features": features, "categories": {"file": "categories.npy", "n": catalog.n_categories},
                "interval": {"max_train_interval_seconds": 40 * 86400, "mu": 100.0},
                "time": {"min": catalog.time_origin, "n_days": catalog.n_days}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# -- the block-wise projection ---------------------------------------------------------------------

@pytest.mark.parametrize("block_rows", [1, 3, 4, 10, 1000])
def test_blockwise_projection_equals_linear_forward_and_gradients(block_rows):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(N_ITEMS + 1, 6, generator=g).half()
    linear = randomize_(torch.nn.Linear(6, D), seed=1)
    frozen = FrozenFeatures(table, block_rows=block_rows)
    upstream = torch.randn(N_ITEMS + 1, D, generator=g)
    got = project_frozen(frozen, linear)
    (got * upstream).sum().backward()
    grads = linear.weight.grad.clone(), linear.bias.grad.clone()
    linear.zero_grad()
    expected = F.linear(table.float(), linear.weight, linear.bias)     # x = W f + b over fp32 f
    (expected * upstream).sum().backward()
    assert got.dtype == torch.float32
    assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert_close(grads[0], linear.weight.grad, rtol=1e-6, atol=1e-6)
    assert_close(grads[1], linear.bias.grad, rtol=1e-6, atol=1e-6)


def test_blockwise_projection_passes_gradcheck_in_float64():
    table = torch.randn(7, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    frozen = FrozenFeatures(table, block_rows=2)
    from hm4sr_dist.model.items import _FrozenProjection
    assert torch.autograd.gradcheck(lambda w, b: _FrozenProjection.apply(w, b, frozen), (weight, bias))


def test_half_weights_are_computed_in_fp32_and_returned_in_their_dtype():
    # What a bf16 DeepSpeed engine holds: bf16 projection weights over an fp16 table.
    table = torch.randn(N_ITEMS + 1, 6).half()
    linear = randomize_(torch.nn.Linear(6, D), seed=2).to(torch.bfloat16)
    out = project_frozen(FrozenFeatures(table, block_rows=4), linear)
    assert out.dtype == torch.bfloat16
    expected = F.linear(table.float(), linear.weight.float(), linear.bias.float())
    assert_close(out.float(), expected.to(torch.bfloat16).float(), rtol=0, atol=0)
    out.float().sum().backward()
    assert linear.weight.grad.dtype == torch.bfloat16 and linear.bias.grad.dtype == torch.bfloat16


# -- fp16 memory-mapped tables against float32 ---------------------------------------------------

def test_fp16_mapped_tables_give_the_float32_model_outputs_to_fp16_tolerance(tmp_path):
    cat32 = tiny_catalog()
    mapped = load_catalog(_write_prepared(tmp_path / "prep", cat32))
    assert mapped.text_features.dtype == torch.float16 and mapped.image_features.dtype == torch.float16
    model32 = make_model(catalog=cat32)
    model16 = make_model(catalog=mapped)
    model16.load_state_dict(model32.state_dict())
    batch = tiny_batch()
    out32 = model32(batch, augment=False, categories=True)
    out16 = model16(batch, augment=False, categories=True)
    # fp16 rounds the features by at most 2^-11 relative: outputs agree to about 1e-3
    assert_close(out16.item_repr, out32.item_repr, rtol=2e-3, atol=2e-3)
    assert_close(out16.seq_repr, out32.seq_repr, rtol=2e-3, atol=2e-3)
    assert not torch.equal(out16.item_repr, out32.item_repr)          # the tables do differ ...
    # ... by the rounding alone: a float32 model over the rounded features gives the same outputs
    rounded = ItemCatalog(**{**cat32.__dict__, "text_features": cat32.text_features.half().float(),
                             "image_features": cat32.image_features.half().float()})
    model_r = make_model(catalog=rounded)
    model_r.load_state_dict(model32.state_dict())
    out_r = model_r(batch, augment=False, categories=True)
    assert_close(out16.item_repr, out_r.item_repr, rtol=1e-6, atol=1e-6)
    assert_close(out16.seq_repr, out_r.seq_repr, rtol=1e-5, atol=1e-6)


def test_float32_files_of_older_preparations_still_load_and_are_mapped(tmp_path):
    cat32 = tiny_catalog()
    folder = _write_prepared(tmp_path / "old", cat32, dtype=np.float32, manifest_dtype=False)
    old = load_catalog(folder)
    assert old.text_features.dtype == torch.float32
    assert torch.equal(old.text_features, cat32.text_features)
    assert _file_mappings(folder / "text_features.npy")              # mapped, not read into memory
    model_file = make_model(catalog=old)
    model_mem = make_model(catalog=cat32)
    model_file.load_state_dict(model_mem.state_dict())
    batch = tiny_batch()
    assert_close(model_file(batch).seq_repr, model_mem(batch).seq_repr, rtol=0, atol=0)


# -- mapped, shared, never copied ------------------------------------------------------------------

def test_the_model_reads_the_mapped_file_itself_through_to_half_deepcopy_and_state_dict(tmp_path):
    folder = _write_prepared(tmp_path / "prep", tiny_catalog())
    catalog = load_catalog(folder)
    text_file = folder / "text_features.npy"
    maps = _file_mappings(text_file)
    assert maps, "the text table is not a mapping of its file"
    assert catalog.feature_files["text"] == str(text_file)

    def backed_by_file(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        return any(m["lo"] <= ptr < m["hi"] for m in _file_mappings(text_file))

    assert backed_by_file(catalog.text_features)
    model = make_model(catalog=catalog)
    held = model.items.features["text"]
    assert held.source == str(text_file) and backed_by_file(held.table)
    assert held.table.data_ptr() == catalog.text_features.data_ptr()   # no copy at build time
    model.to("cpu")
    model.half()                                  # what a half-precision cast does to buffers
    model.float()
    kept = model.items.features["text"].table
    assert kept.dtype == torch.float16 and backed_by_file(kept)
    twin = copy.deepcopy(model)
    assert twin.items.features["text"] is held                        # the deep copy shares it
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    evaluated = fp32_model(model)                                     # the fp32 evaluation copy
    assert evaluated.items.features["text"].table.data_ptr() == held.table.data_ptr()
    state = model.state_dict()
    assert not any("features" in k for k in state)
    table_ptr = held.table.untyped_storage().data_ptr()
    tensors = list(state.values()) + list(model.parameters()) + list(model.buffers())
    assert all(t.untyped_storage().data_ptr() != table_ptr for t in tensors)


def test_pickling_a_mapped_table_maps_the_file_again(tmp_path):
    folder = _write_prepared(tmp_path / "prep", tiny_catalog())
    frozen = ItemEmbedding(tiny_model_cfg(), load_catalog(folder)).features["image"]
    data = pickle.dumps(frozen)
    assert len(data) < 1000                                           # the path, not the table
    back = pickle.loads(data)
    assert back.source == frozen.source and torch.equal(back.table, frozen.table)
    in_memory = FrozenFeatures(torch.randn(5, 3))
    assert torch.equal(pickle.loads(pickle.dumps(in_memory)).table, in_memory.table)


_MAPPER = textwrap.dedent("""
    import sys, time, torch
    sys.path[:0] = [{model_dir!r}]
    from hm4sr_dist.data.catalog import load_catalog
    from hm4sr_tiny import make_model
    model = make_model(catalog=load_catalog({folder!r}))
    with torch.no_grad():
        model.item_representations()        # reads every row of both tables
    print("ready", flush=True)
    sys.stdin.readline()                    # hold the mapping until the test has looked
""")


def test_two_processes_mapping_one_file_share_its_pages(tmp_path):
    # 5000 x 256 float16 = 2.5 MB, so page counts are far from rounding noise.
    g = torch.Generator().manual_seed(0)
    base = tiny_catalog()
    n = 5000
    text = torch.randn(n + 1, 256, generator=g)
    text[0] = 0
    big = ItemCatalog(n_items=n, text_features=text, image_features=torch.zeros(n + 1, 5),
                      categories=torch.zeros(n + 1, 2), time_origin=base.time_origin, n_days=base.n_days)
    folder = _write_prepared(tmp_path / "big", big)
    text_file = folder / "text_features.npy"
    file_kb = text_file.stat().st_size // 1024
    script = _MAPPER.format(model_dir=str(Path(__file__).parent), folder=str(folder))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=REPO) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            maps = _file_mappings(text_file, str(p.pid))
            assert maps, f"process {p.pid} does not map {text_file}"
            # Shared_* counts pages other processes map too (dirty = page cache not yet written
            # back, as the file is new); Pss halves them: each process is charged half the table.
            shared = sum(m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0) for m in maps)
            rss, pss = sum(m.get("Rss", 0) for m in maps), sum(m.get("Pss", 0) for m in maps)
            private_dirty = sum(m.get("Private_Dirty", 0) for m in maps)
            anon = sum(m.get("Anonymous", 0) for m in maps)
            assert shared >= 0.9 * file_kb, (shared, file_kb)          # pages counted as shared
            assert pss <= 0.55 * rss, (pss, rss)
            assert private_dirty == 0 and anon == 0                    # nobody copied them
    finally:
        for p in procs:
            p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


_DEEPSPEED = textwrap.dedent("""
    import json, os, sys, tempfile
    sys.path[:0] = [{model_dir!r}]
    import torch, torch.distributed as dist
    import deepspeed, deepspeed.comm as ds_comm
    from hm4sr_dist.data.catalog import load_catalog
    from hm4sr_tiny import make_model
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    catalog = load_catalog({folder!r})
    model = make_model(catalog=catalog).train()
    table = catalog.text_features
    sent = []
    broadcast = ds_comm.broadcast
    def spy(tensor, *args, **kwargs):
        sent.append(tensor.untyped_storage().data_ptr())
        return broadcast(tensor, *args, **kwargs)
    ds_comm.broadcast = spy
    cfg = {{"train_batch_size": 5, "train_micro_batch_size_per_gpu": 5, "zero_optimization": {{"stage": 1}},
           "bf16": {{"enabled": {bf16}}}, "steps_per_print": 1 << 30}}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    held = engine.module.items.features["text"].table
    from hm4sr_tiny import tiny_batch
    batch = tiny_batch()
    before = engine.module.items.projections["text"].weight.detach().float().clone()
    result = engine(batch)                                  # one training step through the engine
    loss = torch.nn.functional.cross_entropy(engine.module.scores(result.seq_repr, result.item_repr).float(),
                                             batch.target)
    engine.backward(loss)
    engine.step()
    moved = float((engine.module.items.projections["text"].weight.detach().float() - before).abs().max())
    out = tempfile.mkdtemp()
    engine.save_checkpoint(out, tag="t")
    names = []
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".pt"):
                state = torch.load(os.path.join(root, f), map_location="cpu", weights_only=False)
                names += [k for k in (state.get("module") or {{}})]
    print(json.dumps({{"same": held.data_ptr() == table.data_ptr(), "dtype": str(held.dtype), "moved": moved,
                      "finite": bool(torch.isfinite(loss).item()),
                      "broadcast_table": table.untyped_storage().data_ptr() in sent, "n_broadcast": len(sent),
                      "feature_keys": [k for k in names if "features" in k], "n_keys": len(names)}}))
    dist.destroy_process_group()
""")


def test_deepspeed_neither_casts_nor_broadcasts_nor_checkpoints_the_mapped_table(tmp_path):
    # bf16 (as on GPUs): the engine casts parameters, and buffers it is told to; ZeRO 1 shards state.
    import socket

    folder = _write_prepared(tmp_path / "prep", tiny_catalog())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = _DEEPSPEED.format(model_dir=str(Path(__file__).parent), folder=str(folder), port=port, bf16=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "RANK": "0",
           "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["same"] and got["dtype"] == "torch.float16"           # the engine's model reads the file
    assert got["finite"] and got["moved"] > 0                        # and trains W_txt over it
    assert got["n_broadcast"] > 0 and not got["broadcast_table"]     # parameters were, the table not
    assert got["n_keys"] > 0 and got["feature_keys"] == []           # checkpoint without the table


# -- errors name the file -------------------------------------------------------------------------

def test_shape_and_dtype_mismatches_are_errors_naming_the_file(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.zeros((N_ITEMS + 1, 6), np.float16))
    assert map_feature_table(path, N_ITEMS + 1, 6).shape == (N_ITEMS + 1, 6)
    with pytest.raises(ManifestError, match=r"t\.npy: shape \(10, 6\), expected \(11, 6\)"):
        map_feature_table(path, N_ITEMS + 2, 6)
    with pytest.raises(ManifestError, match=r"t\.npy: shape .* expected \(10, 8\)"):
        map_feature_table(path, N_ITEMS + 1, 8)
    with pytest.raises(ManifestError, match=r"t\.npy: dtype float16, the manifest says float32"):
        map_feature_table(path, N_ITEMS + 1, 6, "float32")
    for bad in (np.float64, np.int32):
        np.save(path, np.zeros((N_ITEMS + 1, 6), bad))
        with pytest.raises(ManifestError, match=r"t\.npy: dtype .* expected native float16 or float32"):
            map_feature_table(path, N_ITEMS + 1, 6)
    np.save(path, np.zeros((N_ITEMS + 1, 6), np.float16).T.copy().T)  # Fortran order
    with pytest.raises(ManifestError, match="t.npy: Fortran"):
        map_feature_table(path, N_ITEMS + 1, 6)
    path.write_bytes(b"not an npy file")
    with pytest.raises(ManifestError, match="t.npy: not a readable .npy table"):
        map_feature_table(path, N_ITEMS + 1, 6)
    with pytest.raises(ManifestError, match="missing.npy: listed in the manifest but missing"):
        map_feature_table(tmp_path / "missing.npy", N_ITEMS + 1)


def test_a_prepared_folder_whose_table_disagrees_with_its_manifest_names_the_file(tmp_path):
    folder = _write_prepared(tmp_path / "prep", tiny_catalog())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["features"]["image"]["width"] = 7
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="image_features.npy: shape"):
        load_catalog(folder)


def test_the_table_is_mapped_read_only_and_shared_with_the_page_cache(tmp_path):
    folder = _write_prepared(tmp_path / "prep", tiny_catalog())
    catalog = load_catalog(folder)
    ptr = catalog.text_features.untyped_storage().data_ptr()
    target = str((folder / "text_features.npy").resolve())
    perms = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if line.endswith(target) and lo <= ptr < hi:
            perms.append(line.split()[1])
    assert perms == ["r--s"]            # read-only (a write faults), MAP_SHARED: no private copy


# -- preparation writes float16 ---------------------------------------------------------------------

def test_preparation_keeps_float16_unless_a_value_overflows_it(caplog):
    from data_pipelines.features import FEATURE_DTYPE, _fit_dtype

    assert FEATURE_DTYPE == "float16"
    table = np.zeros((4, 3), np.float16)
    assert _fit_dtype(table, np.ones((2, 3), np.float32), "Enc") is table
    wide = _fit_dtype(table, np.full((2, 3), 7e4, np.float32), "Enc")
    assert wide.dtype == np.float32 and "float16 range" in caplog.text


def test_save_table_writes_a_c_ordered_table_of_its_dtype(tmp_path):
    from data_pipelines.items import save_table

    table = np.asfortranarray(np.arange(12, dtype=np.float16).reshape(4, 3))
    save_table(tmp_path, "f.npy", table)
    mapped = map_feature_table(tmp_path / "f.npy", 4, 3, "float16")
    assert torch.equal(mapped, torch.from_numpy(np.ascontiguousarray(table)))


# -- ID only: no concatenated copy ---------------------------------------------------------------------

def test_a_single_id_modality_returns_the_id_table_itself_with_equal_gradients():
    emb = randomize_(ItemEmbedding(tiny_model_cfg(modalities=["id"]), tiny_catalog()), seed=3)
    out = emb()
    assert out is emb.id_table.weight                                 # no (n + 1, d) copy
    upstream = torch.randn(N_ITEMS + 1, D)
    (out * upstream).sum().backward()
    direct = emb.id_table.weight.grad.clone()
    emb.zero_grad()
    (torch.cat([emb.id_table.weight], dim=-1) * upstream).sum().backward()   # the former path
    assert torch.equal(direct, emb.id_table.weight.grad)
    assert torch.equal(direct, upstream)


def test_sasrec_setting_trains_the_same_through_the_returned_table():
    cfg = tiny_model_cfg(modalities=["id"], use_interactive_moe=False, use_temporal_moe=False)
    model = make_model(cfg, category_head=False, pcl_ratio=None).train()
    batch = tiny_batch()
    torch.manual_seed(0)
    out = model(batch)
    assert out.item_repr is model.items.id_table.weight
    F.cross_entropy(model.scores(out.seq_repr, out.item_repr), batch.target).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(0)                                              # same dropout masks
    items = torch.cat([model.items.id_table.weight], dim=-1)          # the former copy
    out2 = model(batch, item_repr=items)
    F.cross_entropy(model.scores(out2.seq_repr, items), batch.target).backward()
    assert_close(out2.seq_repr, out.seq_repr, rtol=0, atol=0)
    for name, p in model.named_parameters():
        if name in grads:
            assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-7)
