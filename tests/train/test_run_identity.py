"""Run identity: a run folder is resumed only by the same resolved config and data.

Unit tests of the identity and the clash message, then real Ray Train runs: a changed loss weight
trains a new run, an unchanged re-run resumes without training, and a reused name with another
config stops before Ray starts.
"""

import json

import pytest

from hm4sr_dist.config import load_config
from hm4sr_dist.data.manifest import read_manifest
from hm4sr_dist.train.identity import RunIdentityError, check_or_record, run_identity
from hm4sr_dist.train.launcher import run_training

SMALL = ["model.hidden_size=16", "model.inner_size=32", "model.modalities=[id]", "loss.cp_weight=0",
         "loss.pcl_weight=0", "optim.batch_size=64", "train.num_workers=2", "train.log_every_steps=50"]


def config(*extra):
    return load_config("configs/hm4sr_paper.yaml", SMALL + list(extra))


def test_identity_ignores_where_and_how_long_but_not_what():
    base = run_identity(config(), "data-a")
    assert run_identity(config("optim.epochs=7", "train.run_name=x", "train.storage_path=/elsewhere",
                               "train.checkpoint_every_steps=5"), "data-a")["hash"] == base["hash"]
    assert run_identity(config("loss.idcl_weight=0.5"), "data-a")["hash"] != base["hash"]
    assert run_identity(config(), "data-b")["hash"] != base["hash"]


def test_clash_names_the_differing_keys(tmp_path):
    run_dir = str(tmp_path / "run")
    assert check_or_record(run_dir, run_identity(config(), "d")) == "new"
    assert check_or_record(run_dir, run_identity(config(), "d")) == "same"
    changed = run_identity(config("loss.idcl_weight=0.0", "optim.lr=0.01"), "d")
    with pytest.raises(RunIdentityError) as err:
        check_or_record(run_dir, changed)
    message = str(err.value)
    assert "\n" not in message
    assert "loss.idcl_weight: 1.0 -> 0.0" in message and "optim.lr: 0.001 -> 0.01" in message
    assert "train.run_name" in message and "train.allow_config_change=true" in message
    assert check_or_record(run_dir, changed, allow_change=True) == "changed"
    assert check_or_record(run_dir, changed) == "same"                 # the new config is recorded


def test_a_folder_with_checkpoints_but_no_identity_is_not_resumed(tmp_path):
    (tmp_path / "old" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    with pytest.raises(RunIdentityError, match="no run_identity.json"):
        check_or_record(str(tmp_path / "old"), run_identity(config(), "d"))


def test_epoch_cap_is_read_from_the_newest_checkpoint_before_ray(tmp_path):
    from hm4sr_dist.train.state import TrainState, epoch_cap_error, save_worker_files, stored_train_state

    run_dir = tmp_path / "run"
    assert stored_train_state(str(run_dir)) is None                   # no folder yet
    for stamp, epoch in (("2026-01-01_00-00-00.000000", 2), ("2026-01-01_00-05-00.000000", 3)):
        folder = run_dir / f"checkpoint_{stamp}"
        folder.mkdir(parents=True)
        save_worker_files(folder, 0, TrainState(epoch=epoch, best_epoch=1), None)
    (run_dir / "checkpoint_2026-01-01_00-09-00.000000").mkdir()       # being written: no state yet
    half = run_dir / "checkpoint_2026-01-01_00-08-00.000000"
    half.mkdir()
    (half / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")    # being written: half a file
    state = stored_train_state(str(run_dir))
    assert state.epoch == 3 and state.best_epoch == 1
    assert stored_train_state(f"file://{run_dir}").epoch == 3          # a URI reads the same
    # Ray's snapshot names the checkpoint a resume starts from: it wins over folder-name order
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-00.000000"}}))
    assert stored_train_state(str(run_dir)).epoch == 2
    (run_dir / "checkpoint_manager_snapshot.json").unlink()
    cfg = config("optim.epochs=2", "train.run_name=r")
    assert "optim.epochs=2: run r has already trained 3 epochs (best validation epoch 1)" in \
        epoch_cap_error(cfg, state)
    assert epoch_cap_error(config("optim.epochs=3"), state) is None    # equal or longer: continues
    assert epoch_cap_error(cfg, None) is None


def test_a_finished_run_is_read_only_when_resuming_it_would_train_nothing(tmp_path):
    """`finished_checkpoint`: what lets a study read another study's finished Train run instead of
    resuming it. Its last checkpoint must be the final one, of a run that reached the cap or ran out
    of patience; a run stopped by a Tune stop request, or capped lower, or longer, is resumed."""
    from hm4sr_dist.train.state import TrainState, finished_checkpoint, save_worker_files

    def checkpoint(stamp, final=None, **state):
        folder = tmp_path / "run" / f"checkpoint_2026-01-01_00-{stamp:02d}-00.000000"
        folder.mkdir(parents=True)
        save_worker_files(folder, 0, TrainState(**state), None)
        if final is not None:
            (folder / "final_metrics.json").write_text(json.dumps(final))
        return folder

    run = str(tmp_path / "run")
    assert finished_checkpoint(run, epochs=5, patience=10) is None                 # no run
    checkpoint(1, epoch=4)                                                         # an epoch checkpoint
    assert finished_checkpoint(run, epochs=4, patience=10) is None                 # not the final one
    final = checkpoint(2, {"finished": True, "test/ndcg@5": 0.1}, epoch=4)
    assert finished_checkpoint(run, epochs=4, patience=10).path == str(final)       # reached the cap
    assert finished_checkpoint(f"file://{run}", epochs=4, patience=10).path == str(final)
    assert finished_checkpoint(run, epochs=6, patience=10) is None                 # a longer cap trains on
    assert finished_checkpoint(run, epochs=3, patience=10) is None                 # trained longer than asked
    patient = checkpoint(3, {"finished": True}, epoch=4, epochs_without_improvement=10)
    assert finished_checkpoint(run, epochs=300, patience=10).path == str(patient)  # early-stopped
    checkpoint(4, {"finished": True, "stopped_early": True, "stopped_by": "asha"}, epoch=5)
    assert finished_checkpoint(run, epochs=300, patience=10) is None               # Tune-stopped: resumes


def test_epoch_cap_refusal_comes_before_ray_and_writes_nothing(prepared_sequences, tmp_path, capsys):
    from hm4sr_dist.config import ConfigError
    from hm4sr_dist.train.launcher import build_trainer
    from hm4sr_dist.train.state import TrainState, save_worker_files

    cfg = config(f"data.prepared_dir={prepared_sequences}", f"train.storage_path={tmp_path}",
                 "train.run_name=r", "optim.epochs=3")
    run_dir = tmp_path / "r"
    ident = run_identity(cfg, read_manifest(prepared_sequences).get("fingerprint"))
    check_or_record(str(run_dir), ident, code={"fingerprint": "aaaaaaaaaaaa"})
    folder = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir()
    save_worker_files(folder, 0, TrainState(epoch=3, best_epoch=2), None)
    before = (run_dir / "run_identity.json").read_bytes()
    cfg.optim.epochs = 2
    with pytest.raises(ConfigError, match="optim.epochs=2: run r has already trained 3 epochs"):
        build_trainer(cfg)
    assert (run_dir / "run_identity.json").read_bytes() == before   # no code version recorded
    assert "trained so far" not in capsys.readouterr().err


@pytest.mark.slow
def test_changed_config_trains_anew_and_unchanged_resumes(prepared_sequences, tmp_path, local_ray):
    from hm4sr_dist.run_folder import train_run_name

    common = [f"data.prepared_dir={prepared_sequences}", f"train.storage_path={tmp_path}", "optim.epochs=2"]
    first_cfg = config(*common)
    first = run_training(first_cfg)
    manifest = read_manifest(prepared_sequences)
    identity = run_identity(first_cfg, manifest.get("fingerprint"))["hash"]
    assert first_cfg.train.run_name == train_run_name(manifest["dataset"], identity)   # data set + identity
    changed_cfg = config(*common, "loss.idcl_weight=0.0")
    changed = run_training(changed_cfg)
    assert changed_cfg.train.run_name != first_cfg.train.run_name
    assert changed.metrics["resumed_at_steps"] == []                   # a new run that trained
    assert changed.metrics["test/ndcg@10"] != first.metrics["test/ndcg@10"]
    again_cfg = config(*common)
    again = run_training(again_cfg)
    assert again_cfg.train.run_name == first_cfg.train.run_name
    assert again.metrics["resumed_at_steps"] == [first.metrics["global_step"]]   # no training
    assert {k: v for k, v in again.metrics.items() if k.startswith("test/")} == \
        {k: v for k, v in first.metrics.items() if k.startswith("test/")}
    # MLflow (the default: a SQLite file under the storage path): one run per Train run, found by
    # its identity; the resumed run continued the first one's MLflow run instead of opening another
    from hm4sr_dist.tracking import IDENTITY_TAG
    from hm4sr_dist.train.tracking_run import experiment_name
    from hm4sr_test_utils import mlflow_runs

    _, runs = mlflow_runs(tmp_path / "mlflow.db", experiment_name(manifest["dataset"]))
    by_identity = {r.data.tags[IDENTITY_TAG]: r for r in runs}
    assert len(runs) == 2 and set(by_identity) == {
        identity, run_identity(changed_cfg, manifest.get("fingerprint"))["hash"]}
    mine = by_identity.pop(identity)
    assert mine.data.params["loss.idcl_weight"] == "1.0" and mine.data.params["optim.epochs"] == "2"
    assert mine.data.tags["hm4sr.train_run"] == first_cfg.train.run_name
    assert mine.data.metrics["test/ndcg_at_10"] == pytest.approx(first.metrics["test/ndcg@10"])
    assert mine.data.metrics["valid/ndcg_at_5"] >= 0 and mine.data.metrics["loss/total"] > 0
    [other] = by_identity.values()
    assert other.data.params["loss.idcl_weight"] == "0.0"
    clash = config(*common, "loss.idcl_weight=0.0", f"train.run_name={first_cfg.train.run_name}")
    with pytest.raises(RunIdentityError, match="loss.idcl_weight: 1.0 -> 0.0"):
        run_training(clash)


def test_a_key_added_later_at_its_default_does_not_break_resume(tmp_path):
    """A run recorded before a config key existed resumes when the key has its default value."""
    import json

    run_dir = str(tmp_path / "run")
    current = run_identity(config(), "d")
    older = {"hash": "0" * 16, "config": {k: v for k, v in current["config"].items() if k != "loss.pcl_ratio"}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_identity.json").write_text(json.dumps(older))
    assert check_or_record(run_dir, current) == "same"
    changed = run_identity(config("loss.pcl_ratio=0.1"), "d")
    older_again = dict(older, hash="1" * 16)
    (tmp_path / "run" / "run_identity.json").write_text(json.dumps(older_again))
    with pytest.raises(RunIdentityError, match="loss.pcl_ratio: 0.3 -> 0.1"):
        check_or_record(run_dir, changed)


def test_a_key_whose_default_changed_behaviour_keeps_old_runs_apart(tmp_path):
    """loss.cp_reduction was added with a default (per_item) that computes something else than
    the runs before it (per_element): those runs keep their hash, and resuming one under the new
    default is a clash, not a silent change. Where CP is off the key is inert and left out."""
    import json

    with_cp = ["model.modalities=[id,text]", "loss.cp_weight=1.0"]
    old_behaviour = run_identity(config(*with_cp, "loss.cp_reduction=per_element"), "d")
    assert "loss.cp_reduction" not in old_behaviour["config"]           # the hash of a pre-key run
    new_default = run_identity(config(*with_cp), "d")
    assert new_default["config"]["loss.cp_reduction"] == "per_item"
    assert new_default["hash"] != old_behaviour["hash"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_identity.json").write_text(json.dumps(old_behaviour))
    with pytest.raises(RunIdentityError, match="loss.cp_reduction: 'per_element' -> 'per_item'"):
        check_or_record(str(tmp_path / "run"), new_default)
    no_cp = [run_identity(config(f"loss.cp_reduction={r}"), "d")["hash"] for r in ("per_item", "per_element")]
    assert no_cp[0] == no_cp[1]                                          # cp_weight=0 in SMALL


def test_new_config_keys_do_not_change_existing_run_identities():
    """Every run folder and study trial is keyed by this hash: a key added to the config must not
    change it for configs that compute what they computed before (add the key to NOT_IDENTITY if
    it cannot change results, or to LEGACY_VALUES with the value that reproduces the old runs).
    The hashes are those of version 2d233e8 (2026-11-23) for the same configs."""
    def identity(path, *extra):
        return run_identity(load_config(path, list(extra)), "fixed-fingerprint")["hash"]

    assert identity("configs/sasrec.yaml") == "fb4891831590a87c"
    assert identity("configs/hm4sr_paper.yaml", "loss.cp_reduction=per_element") == "5a9e3004f08d8816"
