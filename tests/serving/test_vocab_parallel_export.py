"""A `loss.main_loss=vocab_parallel` run (each Ray Train worker holds a slice of the ID table)
exports its whole table, and the export recommends as the sharded run evaluated.

The production path end to end: Ray Train + DeepSpeed on 2 CPU workers with the table sharded
over them, the run folder, `hm4sr-export`, `hm4sr-recommend --split test` on Ray Data. The run's
own per-user test ranks (computed over the slices) must be the targets' positions in the written
top-K lists of the whole-table export, user by user, and give the run's test metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hm4sr_dist.config import load_config, to_dict
from hm4sr_dist.data import ShardReader
from hm4sr_dist.metrics import finalize, metric_sums
from hm4sr_dist.run_folder import PER_USER_FILE, read_results, write_run_folder
from hm4sr_dist.serving.batch import recommend_split
from hm4sr_dist.serving.export import export_run, load_export
from hm4sr_dist.train.launcher import run_training

# the written lists, checked (ranks 0..k-1, scores non-increasing)
from test_batch import lists

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
K, KS = 10, [5, 10]
SMALL = ["model.hidden_size=16", "model.inner_size=32", "model.modalities=[id]", "loss.cp_weight=0",
         "loss.pcl_weight=0", "optim.batch_size=64", "train.num_workers=2", "train.log_every_steps=3",
         "loss.main_loss=vocab_parallel", "loss.item_chunk_size=8", "train.tracking_uri=off"]


def test_a_vocab_parallel_run_exports_its_whole_table_and_recommends_as_it_evaluated(prepared_sequences,
                                                                                      tmp_path):
    prepared = prepared_sequences
    manifest = json.loads((prepared / "manifest.json").read_text())
    n_items = manifest["counts"]["items"]
    cfg = load_config(str(REPO / "configs/hm4sr_paper.yaml"), SMALL + [
        f"data.prepared_dir={prepared}", f"train.storage_path={tmp_path / 'runs'}",
        "train.run_name=vocab-parallel", "optim.epochs=2"])
    result = run_training(cfg)
    run_dir = tmp_path / "run"
    with result.checkpoint.as_directory() as folder:
        weights = torch.load(Path(folder) / "model.pt")
        assert weights["items.id_table.weight"].shape[0] == n_items + 1     # every slice, gathered
        write_run_folder(run_dir, Path(folder), config=to_dict(cfg), dataset="toy", identity="vp" * 8,
                         fingerprint=manifest["fingerprint"], wall_seconds=0.0,
                         checkpoint_uri=result.checkpoint.path)
    results = read_results(run_dir)
    export = tmp_path / "export"
    export_run(run_dir, export, program=False)
    loaded = load_export(export)
    assert torch.equal(loaded.model.items.id_table.weight, weights["items.id_table.weight"])

    out = tmp_path / "test.parquet"
    recommend_split(export, prepared, "test", K, out=out, batch_size=16, actors=1, log=None)
    recs = lists(pq.read_table(out))

    # the run's ranks (over the slices), per raw user with the raw target item
    users = pq.read_table(prepared / "users.parquet").to_pydict()
    raw_user = dict(zip(users["user_id"], users["raw_id"]))
    items = pq.read_table(prepared / "items.parquet").to_pydict()
    raw_item = dict(zip(items["item_id"], items["raw_id"]))
    target = {}
    for entry in ShardReader(prepared, "test", 16, max_len=cfg.model.max_seq_len, prefetch_batches=0):
        for uid, t, real in zip(entry.users.tolist(), entry.batch.target.tolist(), entry.mask.tolist()):
            if real:
                target[raw_user[uid]] = raw_item[t]
    run_ranks = np.load(run_dir / PER_USER_FILE)
    by_user = {raw_user[int(u)]: int(r) for u, r in zip(run_ranks["user"], run_ranks["rank"])}
    assert set(recs) == set(by_user) == set(target) and len(by_user) == results["test"]["count"]
    positions = {u: recs[u].index(target[u]) if target[u] in recs[u] else K for u in by_user}
    assert positions == {u: min(r, K) for u, r in by_user.items()}        # user by user
    assert any(p < K for p in positions.values())
    got = finalize(metric_sums(torch.tensor(list(positions.values())), KS), KS)
    for key, value in results["test"].items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
