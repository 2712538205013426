"""Export a run and recommend from it (hm4sr_dist.serving), without Ray.

One tiny run is made by hand, the way a finished job leaves it: a prepared folder (manifest,
items.parquet with shuffled raw IDs, fp16 text and fp32 image features, categories), an HM4SR
with CP and PCL heads built by `build_objective` and given random weights, a checkpoint folder
with `model.pt`, and a run folder written by `run_folder.write_run_folder`. It is exported once
per module; the tests compare the export's model and the scorer with that original model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ExperimentConfig, to_dict
from hm4sr_dist.data import load_catalog
from hm4sr_dist.data.reader import collate
from hm4sr_dist.metrics import target_ranks
from hm4sr_dist.objective import build_objective
from hm4sr_dist.run_folder import write_run_folder
from hm4sr_dist.serving.export import ExportError, ItemIdMap, export_run, load_export, main
from hm4sr_dist.serving.scorer import MAX_UNIX_SECONDS, Scorer, ScoringError, chunked_topk

REPO = Path(__file__).resolve().parents[2]
N_ITEMS, MAX_LEN, T0, DAY = 23, 7, 1_700_000_000, 86400
FINGERPRINT = "f0" * 32
CODE = {"code": {"fingerprint": "c0ffee123456", "git": "9133ff6a2b41", "dirty": False}, "code_history": []}


def write_feature_tables(folder: Path, n_items: int, rng) -> dict:
    """Random text (fp16, width 6), image (fp32, width 5) and category (4) tables for items 1..n
    (row 0, the padding item, zero) in `folder`; returns their manifest entries."""
    text = rng.standard_normal((n_items + 1, 6)).astype(np.float16)
    image = rng.standard_normal((n_items + 1, 5)).astype(np.float32)
    cats = (rng.random((n_items + 1, 4)) < 0.4).astype(np.float32)
    text[0] = image[0] = cats[0] = 0
    np.save(folder / "text_features.npy", text)
    np.save(folder / "image_features.npy", image)
    np.save(folder / "categories.npy", cats)
    return {"features": {"text": {"file": "text_features.npy", "width": 6, "dtype": "float16"},
                         "image": {"file": "image_features.npy", "width": 5, "dtype": "float32"}},
            "categories": {"file": "categories.npy", "n": 4}, "n_categories": 4}


def write_prepared(root: Path) -> Path:
    """A prepared folder's item side, by hand: what export and load_catalog read (no shards)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    raw = [f"it-{x}" for x in rng.permutation(900)[:N_ITEMS] + 100]
    rows = rng.permutation(N_ITEMS)                      # the parquet's rows out of dense order
    pq.write_table(pa.table({"item_id": pa.array(rows + 1, pa.int64()),
                             "raw_id": pa.array([raw[r] for r in rows], pa.large_string())}),
                   root / "items.parquet")
    manifest = {
        "schema_version": 1, "dataset": "toy", "fingerprint": FINGERPRINT, "max_len": 50, "shards": [],
        **write_feature_tables(root, N_ITEMS, rng),
        "counts": {"items": N_ITEMS, "users": 0, "actions": 0},
        "interval": {"mu": 100.0, "max_train_interval_seconds": 40 * DAY},
        "time": {"min": T0, "max": T0 + 90 * DAY, "n_days": 91},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def tiny_config(prepared: Path) -> ExperimentConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.hidden_size, m.inner_size, m.max_seq_len, m.n_layers, m.n_heads = 8, 16, MAX_LEN, 2, 2
    m.n_interactive_experts, m.n_temporal_experts = 3, 3
    cfg.data.prepared_dir, cfg.train.run_name = str(prepared), "toy-0123456789ab"
    cfg.train.storage_path = str(prepared.parent / "storage")      # its MLflow store, if any, is here
    return cfg.validate()


def randomize_(model: torch.nn.Module) -> None:
    """Generic random weights (no zero biases or unit norms to hide a wiring mistake)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
            if name.endswith("id_table.weight"):
                p[0].zero_()
        model.temporal_moe.expert_weight.add_(1.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, original eval-mode model, export folder)."""
    root = tmp_path_factory.mktemp("serving")
    prepared = write_prepared(root / "prepared")
    cfg = tiny_config(prepared)
    model = build_objective(cfg.model, cfg.loss, load_catalog(prepared, mu=cfg.model.interval_scale)).model
    randomize_(model)
    model.eval()
    assert model.cp_head is not None and model.placeholders      # training-only heads are exported too
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    torch.save({k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}, ckpt / "model.pt")
    (ckpt / "final_metrics.json").write_text(json.dumps({"test/ndcg@5": 0.1, "best_epoch": 3,
                                                         "best_valid": 0.2, "epochs_run": 5}))
    np.savez(ckpt / "per_user_test.npz", user=np.arange(3), rank=np.arange(3))
    run_dir = root / "run"
    write_run_folder(run_dir, ckpt, config=to_dict(cfg), dataset="toy", identity="0123456789abcdef",
                     fingerprint=FINGERPRINT, wall_seconds=1.0, checkpoint_uri=str(ckpt), code=CODE)
    export = root / "export"
    export_run(run_dir, export)
    return run_dir, model, export


@pytest.fixture(scope="module")
def scorer(run):
    return Scorer.from_export(run[2], item_chunk_size=5, batch_size=4)


def histories(id_map: ItemIdMap, n: int = 11, seed: int = 1) -> list[list[tuple[str, int]]]:
    """Lengths 1..15 (some longer than max_len), gaps from 0 s to 60 days (beyond the longest
    trained interval), repeated items."""
    rng = np.random.default_rng(seed)
    out = []
    for length in [1, 2, 15, 7, 8, 3] + list(rng.integers(1, 16, n - 6)):
        gaps = rng.choice([0, 1, 60, 3600, DAY, 60 * DAY], size=length)
        times = T0 + 5 * DAY + np.cumsum(gaps)
        items = rng.integers(1, N_ITEMS + 1, size=length)
        out.append([(id_map.raw(int(i)), int(t)) for i, t in zip(items, times)])
    return out


def reference_scores(model, scorer: Scorer, hists) -> torch.Tensor:
    """Eq. 19 for every item from the ORIGINAL model, on the reader's own batch of the histories
    (collate: the last max_len items), (B, n_items + 1), padding -inf."""
    dense = scorer.dense_histories(hists)
    samples = [(np.append(i, 1), np.append(t, 0), len(i)) for i, t in dense]
    batch = collate(samples, MAX_LEN)
    with torch.no_grad():
        item_repr = model.item_representations()
        return model.scores(model(batch, item_repr=item_repr).seq_repr, item_repr)


def brute_force(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per row: dense IDs by (score desc, id asc), padding left out, the first k."""
    out = []
    for row in scores.numpy():
        ids = np.arange(1, len(row))
        order = np.lexsort((ids, -row[1:]))
        out.append(ids[order][:k].tolist())
    return out


# -- export -------------------------------------------------------------------------------------

def test_export_holds_what_scoring_needs(run):
    _, model, export = run
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["format"] == "hm4sr-export" and manifest["format_version"] == 1
    assert manifest["identity"] == "0123456789abcdef" and manifest["code"] == CODE["code"]
    assert manifest["data"]["fingerprint"] == FINGERPRINT
    assert (manifest["max_len"], manifest["n_items"], manifest["interval"]["mu"]) == (MAX_LEN, N_ITEMS, 100.0)
    assert manifest["interval"]["max_bucket"] == model.time_embedding.max_bucket
    assert sorted(manifest["files"]) == ["config.json", "image_features.npy", "item_vectors.npy",
                                         "items.parquet", "model.safetensors", "text_features.npy",
                                         "user_side.pt2"]   # no categories
    assert manifest["program"]["inputs"] == ["item_seq", "time_seq", "seq_len", "item_vectors"]
    for name, entry in manifest["files"].items():
        data = (export / name).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((export / "config.json").read_text())["model"]["max_seq_len"] == MAX_LEN
    from safetensors.torch import load_file
    weights = load_file(str(export / "model.safetensors"))
    assert set(weights) == set(model.state_dict())              # cp_head / placeholders kept in the file
    assert not list(export.parent.glob(".export*"))             # no temp folder left


def test_round_trip_gives_the_same_representations(run, scorer):
    """float32, bit for bit: the same weights and feature bytes through the same code."""
    _, model, export = run
    loaded = load_export(export)
    assert not loaded.model.training and loaded.model.cp_head is None
    with torch.no_grad():
        assert torch.equal(loaded.model.item_representations(), model.item_representations())
    hists = histories(loaded.id_map)
    dense = scorer.dense_histories(hists)
    batch = collate([(np.append(i, 1), np.append(t, 0), len(i)) for i, t in dense], MAX_LEN)
    with torch.no_grad():
        assert torch.equal(loaded.model(batch).seq_repr, model(batch).seq_repr)
        assert torch.equal(scorer.encode(hists), model(batch).seq_repr)   # trimmed batch: same vectors


def test_tampered_or_truncated_files_are_named(run, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(run[2], copy)
    feature = copy / "text_features.npy"
    data = bytearray(feature.read_bytes())
    data[-1] ^= 0xFF
    feature.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"text_features\.npy: sha256 differs"):
        load_export(copy)
    load_export(copy, verify=False)                              # sizes only: loads
    items = copy / "items.parquet"
    items.write_bytes(items.read_bytes()[:-3])
    with pytest.raises(ExportError, match=r"items\.parquet: \d+ bytes, manifest\.json says"):
        load_export(copy, verify=False)
    (copy / "manifest.json").unlink()
    with pytest.raises(ExportError, match=r"manifest\.json: missing"):
        load_export(copy)


def _run_copy(run_dir: Path, dest: Path, **changes) -> Path:
    dest.mkdir()
    results = json.loads((run_dir / "results.json").read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            results[section][name] = value
        else:
            results[section] = value
    (dest / "results.json").write_text(json.dumps(results))
    return dest


def test_export_errors_name_the_file(run, tmp_path):
    run_dir = run[0]
    with pytest.raises(ExportError, match=r"results\.json"):
        export_run(tmp_path / "nowhere", tmp_path / "a")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "stopped.json").write_text("{}")
    with pytest.raises(ExportError, match=r"results\.json: missing; the run was stopped early"):
        export_run(stopped, tmp_path / "a")
    empty_ckpt = tmp_path / "ckpt"
    empty_ckpt.mkdir()
    bad = _run_copy(run_dir, tmp_path / "no_weights", checkpoint=str(empty_ckpt))
    with pytest.raises(ExportError, match=r"ckpt/model\.pt: missing"):
        export_run(bad, tmp_path / "a")
    prepared = tmp_path / "prepared"
    shutil.copytree(json.loads((run_dir / "results.json").read_text())["data_manifest"]["path"], prepared)
    (prepared / "image_features.npy").unlink()
    bad = _run_copy(run_dir, tmp_path / "no_features", data_manifest__path=str(prepared))
    with pytest.raises(ExportError, match=r"prepared/image_features\.npy: missing"):
        export_run(bad, tmp_path / "a")
    bad = _run_copy(run_dir, tmp_path / "reprepared", data_manifest__fingerprint="ab" * 32)
    with pytest.raises(ExportError, match=r"manifest\.json: fingerprint f0f0.*prepared again"):
        export_run(bad, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing to replace it"):
        export_run(run_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli(run, tmp_path, capsys):
    assert main([str(run[0]), "--out", str(tmp_path / "exp")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([str(run[0]), "--out", str(tmp_path / "exp")]) == 0     # an earlier export: replaced
    load_export(tmp_path / "exp")
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results.json" in err and "Traceback" not in err


def test_loading_needs_neither_ray_nor_deepspeed(run):
    script = (
        "import sys, json\n"
        "from hm4sr_dist.serving.export import load_export\nfrom hm4sr_dist.serving.scorer import Scorer\n"
        f"export = load_export({str(run[2])!r})\n"
        "scorer = Scorer.from_export(export)\n"
        "hist = [(export.id_map.raw(3), 1700000000), (export.id_map.raw(5), 1700003600)]\n"
        "items, scores = scorer.recommend([hist], k=3)[0]\n"
        "print(json.dumps({'n': len(items), 'loaded': sorted(m for m in ('ray', 'deepspeed') "
        "if m in sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"n": 3, "loaded": []}


# -- the user-side program ----------------------------------------------------------------------

def program_inputs(scorer: Scorer, hists) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = scorer.batch(scorer.dense_histories(hists))        # last max_len items, trimmed
    return batch.item_seq, batch.time_seq, batch.seq_len


def test_user_program_equals_the_eager_model_at_every_batch_and_width(run, scorer):
    """The torch.export program (dynamic batch and width), loaded from the export with torch only,
    gives the original model's sequence vectors bit for bit on this CPU, at widths 1..max_len and
    batch sizes 1..17; its item_vectors.npy is the model's item table."""
    from hm4sr_dist.serving.user_program import load_user_program

    _, model, export = run
    program, vectors = load_user_program(export)
    with torch.no_grad():
        assert torch.equal(vectors, model.item_representations())
    hists = histories(scorer.id_map, n=17, seed=5)
    widths = set()
    for start, stop in ((0, 1), (1, 3), (0, 17), (3, 9)):
        part = hists[start:stop]
        item_seq, time_seq, seq_len = program_inputs(scorer, part)
        widths.add(item_seq.shape[1])
        with torch.no_grad():
            eager = model(Batch(item_seq, time_seq, seq_len, seq_len), item_repr=vectors).seq_repr
            got = program(item_seq, time_seq, seq_len, vectors)
        assert got.shape == (len(part), 3 * 8)
        assert torch.equal(got, eager), (start, stop)
        # the scorer encodes 4 histories at a time, each group trimmed to its own width: the same
        # vectors up to fp32 rounding of differently sized products
        torch.testing.assert_close(got, scorer.encode(part), rtol=0, atol=1e-5)
    one = [[(scorer.id_map.raw(4), T0)]]                       # width 1
    with torch.no_grad():
        assert torch.equal(program(*program_inputs(scorer, one), vectors), scorer.encode(one))
    assert 1 in widths | {1} and MAX_LEN in widths              # both ends of the dynamic width


def test_user_program_top_k_equals_the_scorer(run):
    """Eq. 19 on the program's vectors and the exported item vectors gives the scorer's top-K
    (the scorer encoding the same histories in one batch: the same width, the same numbers)."""
    from hm4sr_dist.serving.user_program import load_user_program

    scorer = Scorer.from_export(run[2], item_chunk_size=5, batch_size=64)
    program, vectors = load_user_program(run[2])
    hists = histories(scorer.id_map, n=9, seed=3)
    with torch.no_grad():
        seq = program(*program_inputs(scorer, hists), vectors)
    scores, ids = chunked_topk(seq, vectors, k=5, chunk_size=7)
    for row, (items, item_scores) in enumerate(scorer.recommend(hists, k=5)):
        assert items == [scorer.id_map.raw(i) for i in ids[row].tolist()]
        assert item_scores == scores[row].tolist()


def test_user_program_runs_without_this_package_and_refuses_a_width_past_max_len(run):
    script = (
        "import sys, json, numpy as np, torch\n"
        f"folder = {str(run[2])!r}\n"
        "program = torch.export.load(folder + '/user_side.pt2').module()\n"
        "vectors = torch.from_numpy(np.load(folder + '/item_vectors.npy'))\n"
        "seq = torch.tensor([[3, 5, 0], [7, 0, 0]]); t = torch.tensor([[1700000000, 1700003600, 0]] * 2)\n"
        "out = program(seq, t, torch.tensor([2, 1]), vectors)\n"
        f"wide = torch.ones(1, {MAX_LEN + 1}, dtype=torch.long)\n"
        "try:\n    program(wide, wide * 1700000000, torch.tensor([1]), vectors); refused = False\n"
        "except Exception as exc:\n    refused = True\n"
        "print(json.dumps({'shape': list(out.shape), 'refused': refused, "
        "'imported': sorted(m for m in sys.modules if m.startswith(('hm4sr_dist', 'ray', 'deepspeed')))}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"shape": [2, 24], "refused": True,
                                                                "imported": []}


@pytest.mark.parametrize("change", [
    {"time_embedding": "day"}, {"time_embedding": "day_of_year"}, {"time_embedding": "cos_interval"},
    {"time_embedding": "absolute", "use_interactive_moe": False},
    {"modalities": ["id"], "use_temporal_moe": False, "use_interactive_moe": False},   # SASRec
])
def test_user_program_of_other_settings_matches_eager(run, change):
    from hm4sr_dist.serving.user_program import build_user_program

    cfg = tiny_config(Path(json.loads((run[0] / "results.json").read_text())["config"]["data"]["prepared_dir"]))
    for key, value in change.items():
        setattr(cfg.model, key, value)
    if not cfg.model.use_temporal_moe:             # PCL's placeholder needs the Temporal MoE (eq. 24)
        cfg.loss.pcl_weight = 0.0
    model = build_objective(cfg.model, cfg.loss, load_catalog(cfg.data.prepared_dir, mu=100.0)).model.eval()
    with torch.no_grad():
        vectors = model.item_representations()
    program = build_user_program(model, vectors).module()
    rng = np.random.default_rng(0)
    for b, width in ((1, 1), (5, MAX_LEN), (3, 4)):
        seq_len = torch.from_numpy(rng.integers(1, width + 1, b)).long()
        seq_len[0] = width
        item_seq = torch.from_numpy(rng.integers(1, N_ITEMS + 1, (b, width))).long()
        item_seq[torch.arange(width)[None, :] >= seq_len[:, None]] = 0
        time_seq = torch.from_numpy(np.sort(rng.integers(T0, T0 + 90 * DAY, (b, width)), axis=1)).long()
        with torch.no_grad():
            eager = model(Batch(item_seq, time_seq, seq_len, seq_len), item_repr=vectors).seq_repr
            assert torch.equal(program(item_seq, time_seq, seq_len, vectors), eager), (change, b, width)


# -- scorer -------------------------------------------------------------------------------------

def test_top_k_equals_a_brute_force_ranking(run, scorer):
    _, model, _ = run
    hists = histories(scorer.id_map)
    full = reference_scores(model, scorer, hists)
    for k in (1, 10):
        recs = scorer.recommend(hists, k=k)
        expected = brute_force(full, k)
        for row, (items, scores) in enumerate(recs):
            assert items == [scorer.id_map.raw(i) for i in expected[row]]
            # the block product is the evaluator's: equal up to fp32 matmul rounding (0 on this CPU)
            torch.testing.assert_close(torch.tensor(scores), full[row, expected[row]], rtol=0, atol=1e-6)


def test_the_evaluators_rank_is_the_position_in_the_list(run, scorer):
    """k = n_items, whole catalogue and blocks of 5: the target's 0-based position is its
    `metrics.target_ranks` rank (no exact ties among these random scores)."""
    _, model, _ = run
    hists = histories(scorer.id_map, n=16, seed=4)
    inputs, targets = [h[:-1] or h for h in hists], [h[-1][0] for h in hists]
    full = reference_scores(model, scorer, inputs)
    assert all(len(set(row[1:].tolist())) == N_ITEMS for row in full)      # no ties
    dense_targets = torch.tensor([scorer.id_map.dense(t) for t in targets])
    with torch.no_grad():
        item_repr = model.item_representations()
        seq = scorer.encode(inputs)
    ranks = target_ranks(seq, item_repr, dense_targets).tolist()
    for chunk in (0, 5):
        whole = Scorer.from_export(load_export(run[2], verify=False), item_chunk_size=chunk)
        recs = whole.recommend(inputs, k=N_ITEMS)
        assert [items.index(t) for (items, _), t in zip(recs, targets)] == ranks


def test_ties_go_to_the_lower_dense_id():
    """Integer-valued vectors make many exact ties, across block edges too."""
    g = torch.Generator().manual_seed(3)
    item_repr = torch.randint(-2, 3, (40, 2), generator=g).float()
    seq = torch.randint(-2, 3, (6, 2), generator=g).float()
    scores = seq @ item_repr.T
    scores[:, 0] = float("-inf")
    exclude = (torch.tensor([0, 0, 3]), torch.tensor([5, 17, 1]))
    masked = scores.clone()
    masked[exclude] = float("-inf")
    for k in (1, 7, 39):
        for chunk in (0, 1, 3, 4, 16):
            got_scores, got_ids = chunked_topk(seq, item_repr, k, chunk)
            assert got_ids.tolist() == brute_force(scores, k)
            assert torch.equal(got_scores, scores.gather(1, got_ids))
            if k <= 37:
                assert chunked_topk(seq, item_repr, k, chunk, exclude)[1].tolist() == brute_force(masked, k)
    # the evaluator's rank counts ties against the target: position <= rank, equal for the tie's
    # highest dense ID
    order = chunked_topk(seq, item_repr, 39, 4)[1]
    for row in range(seq.shape[0]):
        for pos, item in enumerate(order[row].tolist()):
            rank = int(target_ranks(seq[row:row + 1], item_repr, torch.tensor([item]))[0])
            tied = (scores[row, 1:] == scores[row, item]).nonzero().squeeze(1) + 1
            assert pos <= rank and (pos == rank) == (item == int(tied.max()) or len(tied) == 1)


def test_rows_with_and_without_ties_in_one_block():
    """The fast path (topk's set) and the tie-ordered path mixed in one block, per row."""
    g = torch.Generator().manual_seed(4)
    item_repr = torch.cat([torch.randn(300, 3, generator=g), torch.randint(-1, 2, (300, 3), generator=g).float()], 1)
    seq = torch.zeros(8, 6)
    seq[::2, :3] = torch.randn(4, 3, generator=g)               # even rows: no ties
    seq[1::2, 3:] = torch.randint(1, 3, (4, 3), generator=g).float()   # odd rows: ties everywhere
    scores = seq @ item_repr.T
    scores[:, 0] = float("-inf")
    for k in (1, 5, 50):
        for chunk in (0, 64):
            assert chunked_topk(seq, item_repr, k, chunk)[1].tolist() == brute_force(scores, k)


def test_exclude_history(run, scorer):
    _, model, _ = run
    hists = histories(scorer.id_map, seed=2)
    full = reference_scores(model, scorer, hists)
    for row, (items, scores) in enumerate(scorer.recommend(hists, k=6, exclude_history=True)):
        seen = {raw for raw, _ in hists[row]}
        assert not seen & set(items)
        ranked = brute_force(full[row:row + 1], N_ITEMS)[0]
        expected = [i for i in ranked if scorer.id_map.raw(i) not in seen]
        assert items == [scorer.id_map.raw(i) for i in expected[:6]]


def test_a_long_history_keeps_its_last_max_len_items(scorer):
    long = histories(scorer.id_map)[2]
    assert len(long) > MAX_LEN
    assert scorer.recommend([long], k=5) == scorer.recommend([long[-MAX_LEN:]], k=5)


def test_raw_ids_may_be_given_as_ints():
    ids = ItemIdMap(["242", "abc", "7"])
    assert (ids.dense(242), ids.dense("242"), ids.dense(np.int64(7)), ids.dense(True), ids.dense(2.0)) == \
        (1, 1, 3, None, None)
    with pytest.raises(ExportError, match="'abc' appears more than once"):
        ItemIdMap(["abc", "x", "abc"])


def _bad_requests(ids: ItemIdMap):
    a, b = ids.raw(1), ids.raw(2)
    ok = [(a, T0), (b, T0 + 60)]
    return [
        ([[("nope", T0)]], 3, {}, "histories[0][0].item = 'nope'"),
        ([ok, [(a, T0), (999, T0)]], 3, {}, "histories[1][1].item = 999"),
        ([ok, []], 3, {}, "histories[1] = []: empty history"),
        ([[(a, T0 + 10), (b, T0)]], 3, {}, f"histories[0][1].time = {T0}: earlier than the item before it"),
        ([[(a, -5)]], 3, {}, "histories[0][0].time = -5: outside"),
        ([[(a, MAX_UNIX_SECONDS + 1)]], 3, {}, f"histories[0][0].time = {MAX_UNIX_SECONDS + 1}: outside"),
        ([[(a, 1.7e9)]], 3, {}, "histories[0][0].time = 1700000000.0: expected whole unix seconds"),
        ([[(a,)]], 3, {}, "histories[0][0] = ('"),
        ([], 3, {}, "histories = []"),
        ("abc", 3, {}, "histories = 'abc'"),
        ([ok], 0, {}, "k = 0: expected an int >= 1"),
        ([ok], -2, {}, "k = -2"),
        ([ok], True, {}, "k = True"),
        ([ok], "3", {}, "k = '3'"),
        ([ok], N_ITEMS + 1, {}, f"k = {N_ITEMS + 1}: more than the {N_ITEMS} items"),
        ([ok], N_ITEMS - 1, {"exclude_history": True},
         f"k = {N_ITEMS - 1}: more than the {N_ITEMS - 2} candidate items of histories[0]"),
    ]


def test_bad_requests_name_the_field_and_value(scorer):
    for hists, k, kwargs, message in _bad_requests(scorer.id_map):
        with pytest.raises(ScoringError) as caught:
            scorer.recommend(hists, k, **kwargs)
        assert str(caught.value).startswith(message), (message, str(caught.value))
        assert isinstance(caught.value, ValueError)
    assert len(scorer.recommend([[(scorer.id_map.raw(1), T0)]], N_ITEMS)[0][0]) == N_ITEMS   # the edge


def test_an_export_is_attached_to_its_runs_mlflow_run(run, tmp_path, capsys):
    """Issue 22: the export among the MLflow run's artifacts, found by the run identity."""
    from hm4sr_dist.tracking import Tracker, tracking_uri_for
    from hm4sr_dist.train.tracking_run import experiment_name
    from hm4sr_test_utils import mlflow_runs

    results = json.loads((run[0] / "results.json").read_text())
    storage = Path(results["config"]["train"]["storage_path"])
    assert main([str(run[0]), "--out", str(tmp_path / "untracked")]) == 0
    assert "attached to MLflow run" not in capsys.readouterr().out   # no MLflow run yet: nothing attached
    uri = tracking_uri_for("", str(storage))
    Tracker.open(uri, experiment_name("toy"), results["identity"], "toy-0123456789ab").finish()
    assert main([str(run[0]), "--out", str(tmp_path / "tracked")]) == 0
    assert "attached to MLflow run" in capsys.readouterr().out
    client, [tracked] = mlflow_runs(storage / "mlflow.db", experiment_name("toy"))
    files = {a.path for a in client.list_artifacts(tracked.info.run_id, "export")}
    assert {"export/model.safetensors", "export/manifest.json"} <= files
