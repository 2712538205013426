"""Ray Train + DeepSpeed on 2 CPU workers (gloo): resume and failure recovery give the same result
as an uninterrupted run (also from a mid-epoch step checkpoint); checkpoints carry plain weights
and per-user test ranks; TensorBoard events use one x-axis and survive a restart without overlap.

Each run is tiny (60 users, ID + time, IDCL on); the code path is the production one. Recovery from
an epoch-end checkpoint is the stopped-and-resumed test's path; a worker lost between checkpoints is
the mid-epoch test here and the node loss of tests/parallel/test_multinode.py.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from hm4sr_dist.config import ConfigError, load_config
from hm4sr_dist.diagnostics import ROUTING_DPI, ROUTING_PANEL_INCHES
from hm4sr_dist.train.launcher import run_training
from hm4sr_dist.train.monitor import ROUTING_IMAGE

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


def scalar_steps(logdir: Path, tag: str) -> list[int]:
    return [e.step for e in EventAccumulator(str(logdir)).Reload().Scalars(tag)]


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
        per_user = np.load(Path(folder) / "per_user_test.npz")
        assert sorted(per_user["user"].tolist()) == sorted(set(per_user["user"].tolist()))
        assert len(per_user["user"]) == 60                     # every test user once, over both ranks
        ndcg = np.where(per_user["rank"] < 10, 1 / np.log2(per_user["rank"] + 2), 0).mean()
        assert ndcg == pytest.approx(result.metrics["test/ndcg@10"], abs=1e-12)
    for key in ("moe/temporal/modulation", "moe/temporal/entropy", "moe/interactive_id/entropy",
                "moe/alpha_id", "moe/temporal/expert_spread"):
        assert key in result.metrics, key
    logdir = storage / "full" / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    acc = EventAccumulator(str(logdir)).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/main", "loss/idcl", "train/lr", "train/grad_norm", "throughput/sequences_per_s",
                "valid/ndcg@5", "epoch/total", "epoch/seconds", "test/ndcg@10", "moe/temporal/modulation"):
        assert tag in tags, tag
    assert not {"valid/count", "test/count", "epoch", "global_step"} & tags      # no counts as curves
    assert any(t.startswith("routing/interactive_id/expert") for t in tags)
    assert any(t.startswith("routing/temporal_") for t in tags)
    # One point per tag and step: the training batches' MoE view has its own tags (issue 25, 8).
    assert "batch/moe/temporal/modulation" in tags and any(t.startswith("batch/routing/") for t in tags)
    routing_tag = next(t for t in sorted(tags) if t.startswith("routing/temporal_"))
    for tag in ("moe/temporal/modulation", "batch/moe/temporal/modulation", routing_tag):
        steps = scalar_steps(logdir, tag)
        assert len(steps) == len(set(steps)), tag
    assert "config/text_summary" in acc.Tags()["tensors"]
    # One x-axis, the global step: the epoch-level points sit at the steps where the epochs ended.
    steps_per_epoch = result.metrics["global_step"] // 3
    assert scalar_steps(logdir, "valid/ndcg@5") == [steps_per_epoch * (e + 1) for e in range(3)]
    assert scalar_steps(logdir, "test/ndcg@10") == [result.metrics["global_step"]]
    # The MoE routing heatmap (diagnostics.routing_figure) as an image per epoch, at the epoch's step:
    # one panel per MoE that routes (the Temporal MoE and the Interactive MoE over the ID modality).
    images = EventAccumulator(str(logdir), size_guidance={IMAGES: 0}).Reload().Images(ROUTING_IMAGE)
    assert [im.step for im in images] == [steps_per_epoch * (e + 1) for e in range(3)]
    width, height = (n * ROUTING_DPI for n in ROUTING_PANEL_INCHES)
    for im in images:
        png = Image.open(io.BytesIO(im.encoded_image_string))
        assert png.format == "PNG" and png.size == (im.width, im.height) == (2 * width, height)
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20   # drawn, not blank
    # hparams for the HParams tab: this run's config keys -> its final metrics, in <logdir>/hparams
    hparams = EventAccumulator(str(logdir / "hparams")).Reload()
    assert {"hparam/test/ndcg@10", "hparam/best_valid"} <= set(hparams.Tags()["scalars"])
    session = HParamsPluginData.FromString(
        hparams.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["optim.epochs"].number_value == 3
    assert session.hparams["model.modalities"].string_value.startswith("[")


def test_stopped_and_resumed_run_ends_like_the_uninterrupted_one(uninterrupted, prepared_sequences):
    storage, full = uninterrupted
    first = fit(prepared_sequences, storage, "resumed", 1)
    assert first.metrics["epochs_run"] == 1
    resumed = fit(prepared_sequences, storage, "resumed", 3)       # same name + storage: resume
    assert resumed.metrics["epochs_run"] == 3
    assert metrics_of_test(resumed) == metrics_of_test(full)


def test_worker_killed_mid_epoch_resumes_at_the_step_checkpoint(uninterrupted, prepared_sequences):
    """Step checkpoints every 2 steps: the recovered run repeats at most 2 steps, sees the same
    batches and dropout masks, and ends exactly like the uninterrupted run (no checkpoints inside
    its epochs); TensorBoard keeps one point per step (the crashed attempt's tail is purged)."""
    storage, full = uninterrupted
    steps_per_epoch = full.metrics["global_step"] // 3
    every = 2
    crash_at = steps_per_epoch + steps_per_epoch // 2 + 1
    crash_at += 1 if crash_at % every == 0 else 0                    # not on a checkpoint step
    crashed = fit(prepared_sequences, storage, "crash-mid", 3, f"train.fail_at_step={crash_at}",
                  f"train.checkpoint_every_steps={every}", "train.log_every_steps=1")
    assert (storage / "crash-mid" / "fault_injected").exists()
    [resumed_at] = crashed.metrics["resumed_at_steps"]
    assert steps_per_epoch < resumed_at < crash_at and crash_at - resumed_at <= every
    assert metrics_of_test(crashed) == metrics_of_test(full)
    steps = scalar_steps(storage / "crash-mid" / "tensorboard", "loss/main")
    assert steps == list(range(1, full.metrics["global_step"] + 1))


def test_a_shorter_epoch_cap_than_the_run_already_trained_is_refused(uninterrupted, prepared_sequences):
    """optim.epochs is left out of the run identity so that a longer cap continues a run; a shorter
    cap must not silently report the longer run's best weights as an N-epoch result."""
    storage, result = uninterrupted
    before = sorted(p.name for p in (storage / "full").iterdir())
    with pytest.raises(ConfigError) as failure:            # from the driver, before Ray Train starts
        fit(prepared_sequences, storage, "full", 2, "train.max_failures=0")
    assert "optim.epochs=2: run full has already trained 3 epochs" in str(failure.value)
    assert "use optim.epochs>=3" in str(failure.value)
    assert sorted(p.name for p in (storage / "full").iterdir()) == before     # nothing written
