"""Batch top-K (`hm4sr-recommend`, hm4sr_dist.serving.batch) on the embedded Ray.

A generated log (raw user IDs `user-<n>`, raw item IDs numbers that are not the dense IDs) is
prepared by the real pipeline (tabular source, k-core 2), given
hand-made text and image feature tables as in test_export_scorer, a tiny HM4SR with random weights,
a run folder and an export. The split's written top-K must give the evaluator's metrics exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hm4sr_dist.config import to_dict
from hm4sr_dist.data import ShardReader, load_catalog
from hm4sr_dist.evaluate import evaluate_sums
from hm4sr_dist.metrics import finalize, metric_sums
from hm4sr_dist.objective import build_objective
from hm4sr_dist.run_folder import write_run_folder
from hm4sr_dist.serving import batch
from hm4sr_dist.serving.batch import BatchError, main, read_record, recommend_file, recommend_split
from hm4sr_dist.serving.export import export_run, load_export
from hm4sr_dist.serving.scorer import Scorer
from hm4sr_dist.synthetic import generate_log

# the hand-made run's helpers (a random-weight model, the run folder's code record, max_len 7)
from test_export_scorer import CODE, MAX_LEN, randomize_, tiny_config, write_feature_tables

K, KS = 10, [5, 10]


def _prepare(root: Path) -> Path:
    from data_pipelines.config import PrepConfig
    from data_pipelines.prepare import prepare

    log = generate_log(n_users=36, n_clusters=4, items_per_cluster=6, min_len=3, max_len=14, seed=5)
    rows = [(f"user-{u * 37 % 101}", str(int(i) * 13 + 500), int(t))
            for u, (seq, ts) in enumerate(zip(log.sequences, log.timestamps)) for i, t in zip(seq, ts)]
    raw = root / "raw"
    raw.mkdir()
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(raw / "log.csv", index=False)
    items = sorted({r[1] for r in rows})
    pd.DataFrame({"item": items, "title": items}).to_csv(raw / "items.csv", index=False)
    out = root / "prepared"
    prepare(PrepConfig("tabular", str(out), name="toy", interactions=str(raw / "log.csv"),
                       items=str(raw / "items.csv"), text=False, images=False, k_core=2, min_shards=3,
                       progress=False))
    # feature and category tables by hand (no text model or ViT in a unit test), as test_export_scorer
    # writes them
    manifest = json.loads((out / "manifest.json").read_text())
    n = int(manifest["counts"]["items"])
    manifest |= write_feature_tables(out, n, np.random.default_rng(0))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory, local_ray):
    """(prepared folder, export folder, the export's eval-mode model)."""
    root = tmp_path_factory.mktemp("batch")
    prepared = _prepare(root)
    cfg = tiny_config(prepared)
    model = build_objective(cfg.model, cfg.loss, load_catalog(prepared, mu=cfg.model.interval_scale)).model
    randomize_(model)
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    torch.save({k: v.detach().float().clone() for k, v in model.state_dict().items()}, ckpt / "model.pt")
    final = {"best_epoch": 1, "best_valid": 0.1, "epochs_run": 1}
    (ckpt / "final_metrics.json").write_text(json.dumps(final))
    np.savez(ckpt / "per_user_test.npz", user=np.arange(2), rank=np.arange(2))
    fingerprint = json.loads((prepared / "manifest.json").read_text())["fingerprint"]
    write_run_folder(root / "run", ckpt, config=to_dict(cfg), dataset="toy", identity="ab" * 8,
                     fingerprint=fingerprint, wall_seconds=1.0, checkpoint_uri=str(ckpt), code=CODE)
    export_run(root / "run", root / "export")
    return prepared, root / "export", load_export(root / "export").model


@pytest.fixture(scope="module")
def split_run(toy, tmp_path_factory):
    """The test split's top-K written once: (output file, summary, log lines)."""
    prepared, export, _ = toy
    out = tmp_path_factory.mktemp("recs") / "test.parquet"
    lines: list[str] = []
    summary = recommend_split(export, prepared, "test", K, out=out, batch_size=8, actors=1,
                              progress_every=1, log=lines.append)
    return out, summary, lines


def evaluator_rows(prepared: Path, model) -> tuple[dict, dict[str, tuple[str, int]]]:
    """The evaluator on the reader's own test batches (max_len = the model's, as the Train worker
    builds them): its metrics, and per raw user (target raw item, rank)."""
    reader = ShardReader(prepared, "test", 16, max_len=MAX_LEN, prefetch_batches=0)
    rows: list = []
    metrics = finalize(evaluate_sums(model, reader, KS, rows_out=rows), KS)
    users = pq.read_table(prepared / "users.parquet").to_pydict()
    raw_user = dict(zip(users["user_id"], users["raw_id"]))
    items = pq.read_table(prepared / "items.parquet").to_pydict()
    raw_item = dict(zip(items["item_id"], items["raw_id"]))
    target = {}
    for entry in reader:
        for uid, t, real in zip(entry.users.tolist(), entry.batch.target.tolist(), entry.mask.tolist()):
            if real:
                target[uid] = t
    ranks = {raw_user[u]: (raw_item[target[u]], r)
             for part_users, part_ranks in rows for u, r in zip(part_users.tolist(), part_ranks.tolist())}
    return metrics, ranks


def lists(table: pa.Table) -> dict[str, list[str]]:
    """Per user its items in rank order (checking ranks 0..k-1 and non-increasing scores)."""
    out: dict[str, list[tuple[int, str, float]]] = {}
    for u, r, i, s in zip(*(table.column(c).to_pylist() for c in ("user", "rank", "item", "score"))):
        out.setdefault(u, []).append((r, i, s))
    for rows in out.values():
        assert [r for r, _, _ in rows] == list(range(len(rows)))
        assert all(a[2] >= b[2] for a, b in zip(rows, rows[1:]))
    return {u: [i for _, i, _ in rows] for u, rows in out.items()}


# -- the split -------------------------------------------------------------------------------------

def test_the_split_top_k_gives_the_evaluators_metrics_exactly(toy, split_run):
    prepared, _, model = toy
    out, summary, lines = split_run
    table = pq.read_table(out)
    assert table.schema.names == ["user", "rank", "item", "score"]
    assert [str(t) for t in table.schema.types] == ["string", "int32", "string", "float"]
    expected, reference = evaluator_rows(prepared, model)
    recs = lists(table)
    assert set(recs) == set(reference) and all(len(v) == K for v in recs.values())
    assert summary["status"] == "written" and summary["users"] == len(reference) == expected["count"]
    assert len(reference) == json.loads((prepared / "manifest.json").read_text())["counts"]["users"]
    # the target's 0-based position in the written list; absent: rank >= K
    ranks = {u: recs[u].index(t) if t in recs[u] else K for u, (t, _) in reference.items()}
    got = finalize(metric_sums(torch.tensor(list(ranks.values())), KS), KS)
    assert got == expected                                   # exactly, every metric and the count
    assert {u: min(r, K) for u, (_, r) in reference.items()} == ranks      # and user by user
    assert any(r < K for r in ranks.values()) and any(r == K for r in ranks.values())
    progress = [line for line in lines if "users/s" in line and line.startswith("  ")]
    assert progress and progress[-1].startswith(f"  {len(reference)}/{len(reference)} users (100.0%)")


def test_a_rerun_is_idempotent_and_another_request_needs_force(toy, split_run, monkeypatch):
    prepared, export, _ = toy
    out, _, _ = split_run
    stamp = out.stat().st_mtime_ns
    monkeypatch.setattr(batch, "_run", lambda *a, **kw: pytest.fail("recomputed"))
    lines: list[str] = []
    again = recommend_split(export, prepared, "test", K, out=out, actors=1, batch_size=3, log=lines.append)
    assert again["status"] == "complete" and again["users"] == read_record(out)["result"]["users"]
    assert "already complete" in lines[0] and out.stat().st_mtime_ns == stamp
    # the prepared folder defaults to the one the export names: the same request
    assert recommend_split(export, None, out=out, log=None)["status"] == "complete"
    with pytest.raises(BatchError, match=r"another request \(k 10 -> 3\); pass --force"):
        recommend_split(export, prepared, "test", 3, out=out)
    with pytest.raises(BatchError, match=r"exclude_history False -> True"):
        recommend_split(export, prepared, "test", K, out=out, exclude_history=True)
    assert out.stat().st_mtime_ns == stamp
    foreign = out.with_name("foreign.parquet")
    pq.write_table(pa.table({"x": [1]}), foreign)
    with pytest.raises(BatchError, match=r"foreign\.parquet: exists and is not an hm4sr-recommend "
                                         r"output .*refusing to replace it"):
        recommend_split(export, prepared, "test", K, out=foreign, force=True)
    assert main([str(export), "--out", str(out), "--prepared", str(prepared)]) == 0   # the CLI too


def test_force_replaces_another_requests_output(toy, split_run, tmp_path):
    prepared, export, _ = toy
    out = tmp_path / "copy.parquet"
    out.write_bytes(split_run[0].read_bytes())
    done = recommend_split(export, prepared, "test", 3, out=out, force=True, log=None)
    assert done["status"] == "written" and pq.read_table(out).num_rows == 3 * done["users"]
    assert read_record(out)["request"]["k"] == 3 and not list(tmp_path.glob(".copy*"))


# -- histories files -------------------------------------------------------------------------------

def split_inputs(prepared: Path) -> pd.DataFrame:
    """The evaluator's test inputs as (user, item, time) events: the reader's batches (already cut
    to max_len: the scorer keeps the same last max_len items), raw IDs, all users interleaved by
    time (each user's own rows stay oldest first)."""
    users = pq.read_table(prepared / "users.parquet").to_pydict()
    raw_user = dict(zip(users["user_id"], users["raw_id"]))
    items = pq.read_table(prepared / "items.parquet").to_pydict()
    raw_item = dict(zip(items["item_id"], items["raw_id"]))
    rows = []
    for entry in ShardReader(prepared, "test", 16, max_len=MAX_LEN, prefetch_batches=0):
        b = entry.batch
        for r in np.flatnonzero(entry.mask.numpy()):
            n = int(b.seq_len[r])
            rows += [(raw_user[int(entry.users[r])], raw_item[int(i)], int(t))
                     for i, t in zip(b.item_seq[r, :n].tolist(), b.time_seq[r, :n].tolist())]
    frame = pd.DataFrame(rows, columns=["user", "item", "time"])
    return frame.sort_values("time", kind="stable").reset_index(drop=True)


def test_a_csv_of_the_split_inputs_gives_the_split_output(toy, split_run, tmp_path, capsys):
    prepared, export, _ = toy
    events = split_inputs(prepared)
    assert len(events.groupby("user").size().unique()) > 1          # not all users contiguous or equal
    events.insert(1, "extra", "ignored")
    events.to_csv(tmp_path / "histories.csv", index=False)
    out = tmp_path / "from_csv.parquet"
    assert main([str(export), "--histories", str(tmp_path / "histories.csv"), "--out", str(out),
                 "--k", str(K), "--batch-size", "5", "--actors", "1", "--progress-every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "users/s" in printed and f"wrote {out}" in printed
    mine = pq.read_table(out).sort_by([("user", "ascending"), ("rank", "ascending")])
    split = pq.read_table(split_run[0]).sort_by([("user", "ascending"), ("rank", "ascending")])
    for column in ("user", "rank", "item"):
        assert mine.column(column).to_pylist() == split.column(column).to_pylist()
    # other batches (other users together, another trimmed width): fp32 rounding apart at most
    np.testing.assert_allclose(mine.column("score").to_numpy(), split.column("score").to_numpy(),
                               rtol=0, atol=1e-5)
    first = pq.read_table(out).column("user").to_pylist()[::K]
    assert first == list(dict.fromkeys(events["user"]))             # users in order of first row


def test_a_folder_output_stopped_midway_resumes_after_its_last_closed_part(toy, split_run, tmp_path,
                                                                        monkeypatch):
    """Parts of 2 users; the run fails while writing its 4th part (as a killed node would leave it:
    3 closed parts, one open); the same request again scores only the users after the closed
    parts and gives the uninterrupted output, row for row."""
    prepared, export, _ = toy
    monkeypatch.setattr(batch, "ROWS_PER_FILE", 2 * K + 1)       # rounded down to whole users: 2
    real_write = batch._Writer.write

    def failing_write(self, table):
        real_write(self, table)
        if len(self.closed) >= 3:
            raise RuntimeError("node lost")

    monkeypatch.setattr(batch._Writer, "write", failing_write)
    out = tmp_path / "recs"
    with pytest.raises(RuntimeError, match="node lost"):
        recommend_split(export, prepared, "test", K, out=out, batch_size=3, actors=1, log=None)
    partial = tmp_path / ".recs.partial"
    progress = json.loads((partial / "_progress.json").read_text())
    assert not out.exists() and sorted(progress["parts"]) == ["part-00000.parquet", "part-00001.parquet",
                                                              "part-00002.parquet"]
    assert progress["users"] == 6
    monkeypatch.setattr(batch._Writer, "write", real_write)
    lines: list[str] = []
    summary = recommend_split(export, prepared, "test", K, out=out, batch_size=3, actors=1, log=lines.append)
    assert summary["resumed_at_user"] == 6 and any(line.startswith("resuming: 6 of ") for line in lines)
    assert not partial.exists() and not (out / "_progress.json").exists()
    whole = pq.read_table(split_run[0])
    mine = pq.read_table(out)                    # the parts in order: the users in input order
    for column in ("user", "rank", "item"):
        assert mine.column(column).to_pylist() == whole.column(column).to_pylist()
    np.testing.assert_allclose(mine.column("score").to_numpy(), whole.column("score").to_numpy(),
                               rtol=0, atol=1e-5)       # other batches: fp32 rounding apart at most
    assert all(pq.read_metadata(f).num_rows == 2 * K for f in sorted(out.glob("part-*"))[:-1])
    assert read_record(out)["request"]["k"] == K
    # another request finds the partial of this one useless: it is discarded, never mixed in
    monkeypatch.setattr(batch._Writer, "write", failing_write)
    with pytest.raises(RuntimeError, match="node lost"):
        recommend_split(export, prepared, "test", K, out=tmp_path / "other", batch_size=3, actors=1, log=None)
    monkeypatch.setattr(batch._Writer, "write", real_write)
    lines.clear()
    recommend_split(export, prepared, "test", K - 1, out=tmp_path / "other", batch_size=3, actors=1,
                    log=lines.append)
    assert any("discarded" in line for line in lines) and not any("resuming" in line for line in lines)
    assert pq.read_table(tmp_path / "other").num_rows == whole.num_rows // K * (K - 1)


def test_a_parquet_file_with_integer_ids_into_a_folder(toy, tmp_path):
    """Integer item IDs (their decimal spelling), histories longer than max_len, repeated items,
    --exclude-history, a folder output: equal to `Scorer.recommend` on the same histories."""
    _, export, _ = toy
    scorer = Scorer.from_export(export)
    raw = [int(r) for r in scorer.id_map.raw_ids]
    t0 = 1_700_100_000
    hists = {"a": [(raw[3], t0)], "b": [(raw[i % 5], t0 + 60 * i) for i in range(12)],
             "c": [(raw[7], t0), (raw[7], t0), (raw[2], t0 + 10**7)]}
    frame = pd.DataFrame([(u, i, t) for u, h in hists.items() for i, t in h],
                         columns=["user", "item", "time"])
    frame.to_parquet(tmp_path / "h.parquet", index=False)
    assert pa.types.is_integer(pq.read_schema(tmp_path / "h.parquet").field("item").type)
    out = tmp_path / "recs"
    done = recommend_file(export, tmp_path / "h.parquet", 6, out=out, exclude_history=True, batch_size=2,
                          log=None)
    assert done["users"] == 3
    assert (out / "_recommend.json").is_file() and (out / "part-00000.parquet").is_file()
    got = lists(pq.read_table(out))
    expected = scorer.recommend(list(hists.values()), 6, exclude_history=True)
    assert got == {u: items for u, (items, _) in zip(hists, expected)}
    assert recommend_file(export, tmp_path / "h.parquet", 6, out=out, exclude_history=True,
                          log=None)["status"] == "complete"


def _bad_files(a: str):
    """(file name, content: CSV text or an Arrow table, the error it must give); `a` a known raw item."""
    ok = "user,item,time\n"
    yield "time.csv", ok + f"u1,{a},100\nu1,{a},abc\n", \
        r"time\.csv: row 2 \(line 3\), column 'time' = 'abc': expected whole unix seconds"
    yield "item.csv", ok + f"u1,{a},100\nu2,nope,5\n", \
        r"row 2 \(line 3\), column 'item' = 'nope': unknown raw item ID"
    yield "order.csv", ok + f"u1,{a},100\nu2,{a},5\nu1,{a},99\n", \
        (r"row 3 \(line 4\), column 'time' = 99: earlier than this user's previous event "
         r"\(row 1 \(line 2\), 100\)")
    yield "range.csv", ok + f"u1,{a},1000000000000\n", \
        r"row 1 \(line 2\), column 'time' = '1000000000000': outside"
    yield "range12.csv", ok + f"u1,{a},100\nu1,{a},300000000000\n", \
        r"row 2 \(line 3\), column 'time' = '300000000000': outside"        # 12 digits, past 9999
    yield "empty.csv", ok + f"u1,{a},1\n,{a},2\n", r"row 2 \(line 3\), column 'user' = '': empty ID"
    yield "columns.csv", f"user,item,timestamp\nu1,{a},1\n", r"columns\.csv: missing column\(s\) 'time'"
    yield "float.parquet", pa.table({"user": ["u"], "item": [a], "time": [1.5]}), \
        r"float\.parquet: column 'time' has type double; expected whole unix seconds"
    yield "null.parquet", pa.table({"user": ["u", "v"], "item": [a, None], "time": [1, 2]}), \
        r"null\.parquet: row 2, column 'item' = None: missing value"
    yield "negative.parquet", pa.table({"user": ["u"], "item": [a], "time": [-4]}), \
        r"row 1, column 'time' = -4: outside"
    yield "histories.json", "[]", r"histories\.json: expected a \.parquet or \.csv histories file"


def test_bad_histories_rows_are_named_before_any_computation(toy, tmp_path, monkeypatch, capsys):
    _, export, _ = toy
    a = load_export(export, verify=False).id_map.raw(1)
    monkeypatch.setattr(batch, "_resources", lambda *a, **kw: pytest.fail("Ray was asked for actors"))
    for name, content, message in _bad_files(a):
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            pq.write_table(content, path)
        out = tmp_path / f"{name}.out.parquet"
        with pytest.raises(BatchError, match=message):
            recommend_file(export, path, 3, out=out, log=None)
        assert main([str(export), "--histories", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}") and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]      # no temporaries left
