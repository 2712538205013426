"""Ray Train + DeepSpeed on 2 CPU workers (gloo): resume and failure recovery give the same result
as an uninterrupted run; checkpoints carry plain weights; TensorBoard events are written.

Each run is tiny (60 users, ID + time, IDCL on); the code path is the production one.
"""

import json
from pathlib import Path

import pytest
import torch

from hm4sr_dist.config import load_config
from hm4sr_dist.train.launcher import run_training

pytestmark = pytest.mark.slow

SMALL = ["model.hidden_size=16", "model.inner_size=32", "model.modalities=[id]", "loss.cp_weight=0",
         "loss.pcl_weight=0", "optim.batch_size=64", "train.num_workers=2", "train.log_every_steps=3",
         "model.hidden_dropout=0.2", "model.attn_dropout=0.2"]   # dropout on: RNG state must resume too


def fit(prepared, storage, name, epochs, *extra):
    cfg = load_config("configs/hm4sr_paper.yaml", SMALL + [
        f"data.prepared_dir={prepared}", f"train.storage_path={storage}", f"train.run_name={name}",
        f"optim.epochs={epochs}", *extra])
    return run_training(cfg)


def metrics_of_test(result):
    return {k: v for k, v in result.metrics.items() if k.startswith("test/")}


@pytest.fixture(scope="module")
def uninterrupted(prepared_sequences, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    return storage, fit(prepared_sequences, storage, "full", 3)


def test_run_reports_test_metrics_weights_and_tensorboard(uninterrupted):
    storage, result = uninterrupted
    assert result.metrics["finished"] and result.metrics["epochs_run"] == 3
    assert result.metrics["test/count"] == 60
    assert 0 < result.metrics["test/ndcg@10"] <= 1
    with result.checkpoint.as_directory() as folder:
        weights = torch.load(Path(folder) / "model.pt")
        assert "items.id_table.weight" in weights and weights["items.id_table.weight"].dtype == torch.float32
        assert json.loads((Path(folder) / "final_metrics.json").read_text())["test/ndcg@10"] == \
            result.metrics["test/ndcg@10"]
    events = list((storage / "full" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/main", "loss/idcl", "train/lr", "train/grad_norm", "throughput/sequences_per_s",
                "valid/ndcg@5", "test/ndcg@10"):
        assert tag in tags, tag
    assert any(t.startswith("routing/interactive_id/expert") for t in tags)
    assert any(t.startswith("routing/temporal_") for t in tags)
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_stopped_and_resumed_run_ends_like_the_uninterrupted_one(uninterrupted, prepared_sequences):
    storage, full = uninterrupted
    first = fit(prepared_sequences, storage, "resumed", 1)
    assert first.metrics["epochs_run"] == 1
    resumed = fit(prepared_sequences, storage, "resumed", 3)       # same name + storage: resume
    assert resumed.metrics["epochs_run"] == 3
    assert metrics_of_test(resumed) == metrics_of_test(full)


def test_killed_worker_recovers_from_last_checkpoint(uninterrupted, prepared_sequences):
    storage, full = uninterrupted
    steps_per_epoch = full.metrics["global_step"] // 3
    crash_at = steps_per_epoch + steps_per_epoch // 2                # the middle of epoch 2
    crashed = fit(prepared_sequences, storage, "crash", 3, f"train.fail_at_step={crash_at}")
    assert (storage / "crash" / "fault_injected").exists()
    assert crashed.metrics["epochs_run"] == 3
    assert metrics_of_test(crashed) == metrics_of_test(full)
