"""Studies in one command: the plan (no Ray: settings, de-duplication by run identity, errors) and a
tiny real study of 2 settings x 2 seeds whose driver is killed after its first finished trial and
resumed without re-running it, then writes the tables and figures."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hm4sr_dist.config import ConfigError, command_line_keys, load_tracked
from hm4sr_dist.feasibility import DataOffer, resolve
from hm4sr_dist.run_folder import read_results
from hm4sr_test_utils import mlflow_runs
from hm4sr_dist.study.plan import parse_setting, plan_study
from hm4sr_dist.train.code_version import fingerprint

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=8", "model.inner_size=16", "model.max_seq_len=12", "model.n_layers=1",
        "model.modalities=[id]", "loss.cp_weight=0", "loss.pcl_weight=0", "optim.batch_size=64",
        "optim.epochs=2", "train.num_workers=1", "eval.batch_size=256"]


def _plan(study, overrides=(), **kw):
    cfg, sources = load_tracked(str(ROOT / "configs/hm4sr_paper.yaml"), list(TINY) + list(overrides))
    explicit = command_line_keys(sources)
    offer = DataOffer(frozenset({"id"}), categories=False)
    base, _ = resolve(cfg, offer, explicit)
    return plan_study(study, base, kw.pop("seeds", [1, 2]), dataset="toy", fingerprint="fp", offer=offer,
                      explicit=explicit, **kw)


def test_fig4_default_point_runs_once_and_inert_panels_are_left_out():
    plan = _plan("fig4")
    keys = [t.key for t in plan.trials]
    assert len(keys) == len(set(keys))                        # every resolved config trains once
    assert plan.aliases["k1=4"] == "default" and plan.aliases["l2=1.0"] == "default"
    assert any(n.startswith("loss.pcl_ratio left out") for n in plan.notes)   # PCL is off on ID-only data
    assert plan.baseline == "default" and plan.trials[0].setting == "default"


@pytest.mark.parametrize("base_k1, xs", [(None, [2, 4, 6, 8, 12]), (3, [2, 3, 4, 6, 8, 12])])
def test_fig4_panel_places_the_baseline_at_its_value_in_or_outside_the_grid(tmp_path, base_k1, xs):
    from hm4sr_dist.study.plan import write_plan
    from hm4sr_dist.study.report import sweep_points

    overrides = [f"model.n_interactive_experts={base_k1}"] if base_k1 else []
    plan = _plan("fig4", overrides, params=["k1"], seeds=[1])
    write_plan(plan, tmp_path)
    written = json.loads((tmp_path / "study_plan.json").read_text())
    assert written["baseline_values"] == {"model.n_interactive_experts": base_k1 or 4}
    rows = [{"setting": s.label, "ndcg@5_mean": 0.1 + i / 100, "ndcg@5_std": 0.0}
            for i, s in enumerate(plan.settings)]
    [(key, points)] = sweep_points(written, rows).items()
    assert key == "model.n_interactive_experts" and [v for v, _, _ in points] == xs
    assert [v for v, _, is_base in points if is_base] == [base_k1 or 4]
    assert all(r["setting"] == "default" for _, r, is_base in points if is_base)


def test_fig3_drops_ablations_the_data_cannot_support_with_a_note():
    plan = _plan("fig3", seeds=[1])
    labels = [s.label for s in plan.settings]
    assert labels[0] == "hm4sr" and "-TMoE" in labels and "-IMoE" in labels
    for dropped in ("-Text", "-Image", "-PCL", "-CP"):        # already off on ID-only data
        assert dropped not in labels and any(n.startswith(dropped) for n in plan.notes)


def test_a_trial_that_would_resume_a_longer_train_run_is_refused_before_ray(tmp_path):
    from hm4sr_dist.study.runner import check_epoch_caps
    from hm4sr_dist.train.state import TrainState, save_worker_files

    plan = _plan("table1", [f"train.storage_path={tmp_path / 'ray'}"], seeds=[1])
    check_epoch_caps(plan, tmp_path / "study")                # nothing trained yet: fine
    shared = plan.trials[0].config["train"]["run_name"]       # another study's 3-epoch Train run
    folder = tmp_path / "ray" / shared / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    save_worker_files(folder, 0, TrainState(epoch=3, best_epoch=2), None)
    with pytest.raises(ConfigError, match=f"1 trial.*{plan.trials[0].run}: optim.epochs=2: run {shared} "
                                          "has already trained 3 epochs") as err:
        check_epoch_caps(plan, tmp_path / "study")
    assert err.value.key == "optim.epochs"
    assert not (tmp_path / "study").exists()                  # refused before anything was written


def test_a_run_folder_of_another_epoch_cap_is_not_a_result(tmp_path):
    """optim.epochs is not part of the run identity (a longer cap continues the same Train run), so
    the study must not answer a 20-epoch request with a 5-epoch study's run folder or Tune state."""
    from hm4sr_dist.study.runner import finished_run

    five = _plan("table1", ["optim.epochs=5"], seeds=[1])
    twenty = _plan("table1", ["optim.epochs=20"], seeds=[1])
    assert [t.key for t in five.trials] == [t.key for t in twenty.trials]       # the same Train runs
    assert five.experiment_in(tmp_path) != twenty.experiment_in(tmp_path)      # not the same Tune state
    t5, t20 = five.trials[0], twenty.trials[0]
    _fake_run(tmp_path / t5.run, t5.setting, t5.seed, t5.config, [1, 2, 30], t5.key)
    assert finished_run(tmp_path / t5.run, t5.key, t5.config)["identity"] == t5.key
    assert finished_run(tmp_path / t5.run, t20.key, t20.config) is None


def test_trials_json_is_strict_json_when_a_run_never_had_a_finite_validation(tmp_path):
    from hm4sr_dist.study.runner import STOPPED_FILE, write_trial_statuses

    plan = _plan("table1", seeds=[1])
    t = plan.trials[0]
    (tmp_path / "runs" / t.run).mkdir(parents=True)
    (tmp_path / "runs" / t.run / STOPPED_FILE).write_text(json.dumps(
        {"identity": t.key, "config": t.config, "best_valid": float("-inf"), "best_epoch": -1}))
    rows = write_trial_statuses(plan, tmp_path)
    assert rows[0]["status"] == "stopped"

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads((tmp_path / "trials.json").read_text(), parse_constant=refuse)
    assert written[0]["best_valid"] is None and written[0]["best_epoch"] == -1


def test_another_or_recreated_study_folder_gets_its_own_tune_experiment(tmp_path):
    """A finished Tune experiment restored for a study folder that lacks its results would run
    nothing and write nothing: the experiment belongs to one study folder (its study_id)."""
    import shutil

    plan = _plan("table1", seeds=[1])
    first = plan.experiment_in(tmp_path / "a")
    assert plan.experiment_in(tmp_path / "a") == first                   # a re-run restores it
    assert plan.experiment_in(tmp_path / "b") != first                   # another --output
    shutil.rmtree(tmp_path / "a")
    assert plan.experiment_in(tmp_path / "a") != first                   # the folder deleted, re-created
    named = [_plan("custom", custom=[parse_setting(f"{label}:loss.idcl_weight=0.2")], seeds=[1])
             for label in ("low", "weak")]
    assert named[0].trials[0].key == named[1].trials[0].key                # one config, two run folders
    assert named[0].experiment_in(tmp_path / "c") != named[1].experiment_in(tmp_path / "c")


def test_settings_whose_run_folders_would_collide_are_refused():
    one, two = parse_setting("wide:model.hidden_size=16"), parse_setting("wide:model.hidden_size=32")
    with pytest.raises(ConfigError, match="run-folder name 'wide'") as err:
        _plan("custom", custom=[one, two])
    assert err.value.key == "--setting"
    again = _plan("custom", variants=["hm4sr", "hm4sr"], seeds=[1])      # the same setting twice: one row
    assert len(again.trials) == 1 and [s.label for s in again.settings] == ["hm4sr"] and not again.aliases


def test_each_trial_gets_its_own_tensorboard_folder_under_a_given_one(tmp_path):
    plan = _plan("table1", [f"train.tensorboard_dir={tmp_path / 'tb'}"], seeds=[1, 2])
    folders = [t.config["train"]["tensorboard_dir"] for t in plan.trials]
    assert folders == [str(tmp_path / "tb" / t.config["train"]["run_name"]) for t in plan.trials]
    assert len(set(folders)) == len(plan.trials)
    assert _plan("table1", seeds=[1]).trials[0].config["train"]["tensorboard_dir"] == ""   # default: per run
    on_s3 = _plan("fig4", ["train.tensorboard_dir=s3://b/tb"], seeds=[1], params=["l2"])      # a URI root
    assert [t.config["train"]["tensorboard_dir"] for t in on_s3.trials] == [
        f"s3://b/tb/{t.config['train']['run_name']}" for t in on_s3.trials]


def test_a_study_larger_than_the_threshold_needs_yes(prepared_sequences):
    sys.path.insert(0, str(ROOT))
    from jobs.study import plan

    argv = ["--prepared-dir", str(prepared_sequences), "--study", "fig4", "--seeds", "1", "2", "3", *TINY]
    with pytest.raises(ConfigError, match=r"the study has \d+ trials .* more than 24; pass --yes") as err:
        plan(argv)
    assert err.value.key == "--yes"
    assert len(plan(argv + ["--yes"])["study"].trials) > 24
    assert len(plan(argv + ["--max-trials", "100"])["study"].trials) > 24


def test_asha_refuses_settings_that_select_on_different_validation_metrics(prepared_sequences):
    sys.path.insert(0, str(ROOT))
    from jobs.study import plan

    argv = ["--prepared-dir", str(prepared_sequences), "--study", "custom", "--variant-list", "hm4sr",
            "--setting", "eval.valid_metric=mrr@10", "--seeds", "1", *TINY]
    assert len(plan(argv)["study"].trials) == 2                     # fine without ASHA
    with pytest.raises(ConfigError, match="mrr@10 and ndcg@5") as err:
        plan(argv + ["--asha"])
    assert err.value.key == "--asha"


def test_user_errors_name_the_key():
    with pytest.raises(ConfigError, match="loss.idcl_weigth"):
        parse_setting("loss.idcl_weigth=0.5")
    with pytest.raises(ConfigError, match="--variant"):
        _plan("table1", variants=["hm4sr", "-TMOE"])
    with pytest.raises(ConfigError, match="--seeds"):
        _plan("table1", seeds=[1, -1])
    with pytest.raises(ConfigError, match=r"loss.pcl_weight \(--setting\)"):     # PCL needs text or images
        _plan("custom", custom=[parse_setting("loss.pcl_weight=0.5")], seeds=[1])
    sys.path.insert(0, str(ROOT))
    from jobs.study import plan

    for flags, key in ((["--bootstrap", "5"], "--bootstrap"),
                       (["--variant-list", "sasrec"], "--variant-list")):
        with pytest.raises(ConfigError) as err:          # checked before the data is even read
            plan(["--prepared-dir", str(ROOT), "--study", "fig5", *flags])
        assert err.value.key == key
    r = subprocess.run([sys.executable, "jobs/study.py", "--prepared-dir", str(ROOT), "--study", "table1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "manifest.json" in r.stderr


def test_failed_trials_make_the_command_exit_1_after_the_report(monkeypatch):
    sys.path.insert(0, str(ROOT))
    import jobs.study

    for failed, code in ((0, None), (2, 1)):
        monkeypatch.setattr(jobs.study, "main", lambda argv, n=failed: {"failed_trials": n})
        monkeypatch.setattr(sys, "argv", ["study.py"])
        if code is None:
            jobs.study.cli()
        else:
            with pytest.raises(SystemExit) as err:
                jobs.study.cli()
            assert err.value.code == code


def test_overrides_may_follow_the_seed_and_variant_lists():
    """`--seeds 2020 2021 optim.epochs=50` and `--variant-list hm4sr -TMoE key=value`: each list ends at
    the first key=value, which is an override of the base config (as the docs write it)."""
    sys.path.insert(0, str(ROOT))
    from jobs.study import parse_args

    args = parse_args(["--prepared-dir", "d", "--study", "fig5", "--seeds", "2020", "2021", "optim.epochs=50",
                       "--variant-list", "hm4sr", "-TMoE", "train.num_workers=1", "--dry-run"])
    assert args.seeds == [2020, 2021] and args.variant_list == ["hm4sr", "-TMoE"] and args.dry_run
    assert args.overrides == ["optim.epochs=50", "train.num_workers=1"]
    assert parse_args(["--prepared-dir", "d", "--study", "table1"]).seeds == [2020]      # the default
    for argv in (["--seeds", "1", "2", "optim.epochs=5", "--prepared-dir", "d", "--study", "fig5"],
                 ["optim.epochs=5", "--study", "fig5", "--seeds", "1", "2", "--prepared-dir", "d",
                  "eval.k=[5]"]):
        args = parse_args(argv)                     # the lists and overrides in any order
        assert args.seeds == [1, 2] and args.overrides[0] == "optim.epochs=5" and args.study == "fig5"
    args = parse_args(["--prepared-dir", "d", "--study", "custom", "--variant-list=-TMoE", "hm4sr",
                       "--seeds=3", "4"])
    assert args.variant_list == ["-TMoE", "hm4sr"] and args.seeds == [3, 4]
    for wrong in (["--variant=-TMoE"], ["--variant-list="]):     # the jobs' flag is not an abbreviation here
        with pytest.raises(SystemExit):
            parse_args(["--prepared-dir", "d", "--study", "table1", *wrong])
    with pytest.raises(SystemExit):
        parse_args(["--prepared-dir", "d", "--study", "table1", "--seeds", "x1"])      # not an int
    # a negative seed is a seed (refused by the plan as one), not an override (issue 25, finding 7)
    assert parse_args(["--prepared-dir", "d", "--study", "table1", "--seeds", "1", "-1"]).seeds == [1, -1]
    with pytest.raises(ConfigError, match=r"^--seeds: expected seeds >= 0, got '1 -1'$"):
        _plan("table1", seeds=[1, -1])


@pytest.mark.slow
def test_study_is_killed_resumed_and_tabulated(prepared_sequences, local_ray, tmp_path, capsys):
    from PIL import Image

    from jobs.study import main

    out = tmp_path / "study"
    argv = ["--prepared-dir", str(prepared_sequences), "--study", "table1", "--seeds", "1", "2",
            "--output", str(out), "--trial-cpus", "0.5", "--bootstrap", "200", *TINY,
            f"train.storage_path={tmp_path / 'ray'}"]
    started = time.time()
    # 1. the driver, connected to the session's Ray, exits abruptly after its first finished trial
    env = dict(os.environ, HM4SR_STUDY_EXIT_AFTER="1",
               RAY_ADDRESS=local_ray.get_runtime_context().gcs_address)
    killed = subprocess.run([sys.executable, "jobs/study.py", *argv], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == 75, killed.stdout[-2000:] + killed.stderr[-3000:]
    events = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    first = [e for e in events if e["event"] == "end"]
    assert len(first) == 1 and (out / "runs" / first[0]["run"] / "results.json").is_file()
    trained = json.loads((out / "runs" / first[0]["run"] / "results.json").read_text())
    assert trained["code"]["fingerprint"] == fingerprint() and trained["code_history"] == []
    assert not (out / "study.md").exists()
    # the interrupted study's tables so far: statuses from the run folders (no trials.json yet)
    capsys.readouterr()
    main(argv + ["--report-only"])
    assert "statuses from the run folders: 1/4 finished" in capsys.readouterr().out
    assert sorted(r["runs"] for r in csv.DictReader(open(out / "study.csv"))) == ["0/2", "1/2"]
    other_seeds = [a if a != "2" else "3" for a in argv]                 # a report of another study
    with pytest.raises(ConfigError, match=r"not in this command: hm4sr__seed2, sasrec__seed2; not in the "
                                          r"study: hm4sr__seed3, sasrec__seed3") as err:
        main(other_seeds + ["--report-only"])
    assert err.value.key == "--report-only"

    # 2. the same command again: the Tune experiment is restored, the finished trial is not re-run
    capsys.readouterr()
    result = main(argv + ["--max-failures", "3"])
    printed = capsys.readouterr().out
    assert "resuming the Tune experiment" in printed                    # Tuner.restore, not a new one
    assert "keeps the settings it was started with (--max-failures=1); this run's --max-failures=3" in printed
    events = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    starts = [e["run"] for e in events if e["event"] == "start"]
    assert starts.count(first[0]["run"]) == 1
    assert sorted(e["run"] for e in events if e["event"] == "end") == sorted(
        ["hm4sr__seed1", "hm4sr__seed2", "sasrec__seed1", "sasrec__seed2"])
    status = json.loads((out / "trials.json").read_text())
    assert [r["status"] for r in status] == ["finished"] * 4
    for r in status:                           # every trial's folder reads as the one schema
        assert read_results(out / "runs" / r["run"])["identity"] == r["key"]
    # MLflow: the study is a parent run, each trial a child with its config, metrics and run folder
    dataset = read_results(out / "runs" / status[0]["run"])["dataset"]
    client, runs = mlflow_runs(tmp_path / "ray" / "mlflow.db", f"hm4sr-{dataset}")
    [parent] = [r for r in runs if "hm4sr.study" in r.data.tags]
    children = {r.data.tags["hm4sr.identity"]: r for r in runs if r is not parent}
    assert set(children) == {r["key"] for r in status}
    for r in status:
        child = children[r["key"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["optim.seed"] == str(r["seed"])
        stored = read_results(out / "runs" / r["run"])
        assert child.data.metrics["test/ndcg_at_5"] == pytest.approx(stored["test"]["ndcg@5"])
        assert {a.path for a in client.list_artifacts(child.info.run_id, "run_folder")} == {
            "run_folder/results.json", "run_folder/per_user_test.npz"}
    study_files = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/study.md", "study/study.csv", "study/bars.png"} <= study_files
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # 3. tables: one row per setting, HM4SR the baseline, SASRec with a paired CI
    rows = list(csv.DictReader(open(out / "study.csv")))
    assert [r["setting"] for r in rows] == ["hm4sr", "sasrec"]
    assert rows[0]["runs"] == rows[1]["runs"] == "2/2" and rows[0]["baseline"] == "True"
    low, diff, high = (float(rows[1][f"ndcg@5_{k}"]) for k in ("ci_low", "diff", "ci_high"))
    assert low <= diff <= high
    md = (out / "study.md").read_text()
    assert sum(line.startswith("| hm4sr ") or line.startswith("| sasrec ") for line in md.splitlines()) == 2
    # 4. figures: curves per setting, bars, routing heatmap for HM4SR (SASRec has no MoE)
    names = {Path(f).name for f in result["figures"]}
    assert {"curves_hm4sr.png", "curves_sasrec.png", "bars.png", "diffs.png", "routing_hm4sr.png"} <= names
    expected = {"curves_hm4sr.png": (1100, 400), "curves_sasrec.png": (1100, 400), "bars.png": (600, 450),
                "diffs.png": (600, 450), "routing_hm4sr.png": (1200, 400)}     # figsize x 100 dpi
    for f in result["figures"]:
        with Image.open(f) as im:
            im.load()                                         # decodes: a truncated PNG fails here
            assert im.size == expected.get(Path(f).name, im.size) and min(im.size) >= 300, f

    # 5. another study with a setting the first one trained: read from its Train run, not re-trained
    train_run = tmp_path / "ray" / trained["config"]["train"]["run_name"]
    checkpoints = sorted(train_run.glob("checkpoint_*"))
    other = tmp_path / "other"
    setting, seed = first[0]["run"].split("__seed")
    main(["--prepared-dir", str(prepared_sequences), "--study", "custom", "--variant-list", setting,
          "--seeds", seed, "--output", str(other), "--trial-cpus", "0.5",
          "--bootstrap", "200", *TINY, f"train.storage_path={tmp_path / 'ray'}"])
    events = [json.loads(line) for line in (other / "trials.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["reuse"] and events[0]["train_run"] == train_run.name
    reused = json.loads((other / "runs" / first[0]["run"] / "results.json").read_text())
    assert reused["reused"] and reused["test"] == trained["test"] and reused["history"] == trained["history"]
    assert (other / "runs" / first[0]["run"] / "per_user_test.npz").is_file()
    assert sorted(train_run.glob("checkpoint_*")) == checkpoints      # the Train run is untouched
    print(f"study test: {time.time() - started:.0f} s")


def _fake_run(folder: Path, setting: str, seed: int, config: dict, ranks, key: str) -> None:
    """A run folder as the study runner writes it (results.json + per_user_test.npz)."""
    import numpy as np

    from hm4sr_dist.compare import per_user_metrics

    folder.mkdir(parents=True)
    ranks = np.asarray(ranks)
    np.savez(folder / "per_user_test.npz", user=np.arange(ranks.size), rank=ranks)
    test = {m: float(v.mean()) for m, v in per_user_metrics(ranks, ["ndcg@5", "ndcg@10", "mrr@10"]).items()}
    history = [{"epoch": e, "epoch/total": 5.0 - e, "epoch/main": 3.0 - e / 2, "valid/ndcg@5": 0.1 * (e + 1)}
               for e in range(3)]
    diag = {f"routing/temporal_{r}/expert{i}": 0.5 for r in ("same_time", "under_1h") for i in range(2)}
    (folder / "results.json").write_text(json.dumps({
        "dataset": "toy", "variant": setting, "identity": key, "test": test | {"count": int(ranks.size)},
        "best_epoch": 2, "wall_seconds": 10.0, "train_seconds": 6.0, "history": history, "diagnostics": diag,
        "data_manifest": {"fingerprint": "fp"}, "config": config}))


def test_report_tables_and_figures_from_run_folders(tmp_path):
    import numpy as np
    from PIL import Image

    from hm4sr_dist.study.plan import write_plan
    from hm4sr_dist.study.report import relative_changes, report

    plan = _plan("fig4", params=["k1"], seeds=[1, 2])
    write_plan(plan, tmp_path)
    rng = np.random.default_rng(0)
    status = []
    for i, t in enumerate(plan.trials):
        if t.setting == "k1=12" and t.seed == 2:          # a failed trial: reported, not dropped
            status.append({"setting": t.setting, "seed": t.seed, "run": t.run, "key": t.key,
                           "status": "failed", "error": "RuntimeError('boom')", "best_epoch": None,
                           "wall_seconds": None, "train_seconds": None, "best_valid": None})
            continue
        _fake_run(tmp_path / "runs" / t.run, t.setting, t.seed, t.config, rng.integers(0, 30, 50), t.key)
        status.append({"setting": t.setting, "seed": t.seed, "run": t.run, "key": t.key, "status": "finished",
                       "error": None, "best_epoch": 2, "wall_seconds": 10.0, "train_seconds": 6.0,
                       "best_valid": 0.3})
    (tmp_path / "trials.json").write_text(json.dumps(status))
    made = report(tmp_path, n_boot=100)
    labels = [s.label for s in plan.settings]
    assert [r["setting"] for r in made["rows"]] == labels == ["default", "k1=2", "k1=6", "k1=8", "k1=12"]
    assert made["rows"][-1]["runs"] == "1/2" and "boom" in made["rows"][-1]["failed"]
    md = (tmp_path / "study.md").read_text()
    assert "k1=4 = default" in md and "seed 2: failed" in md
    ahead = {r["setting"]: r["ndcg@5_seeds_ahead"] for r in made["rows"]}
    assert ahead["default"] == "" and ahead["k1=2"] in {"0/2", "1/2", "2/2"} and ahead["k1=12"] in {"0/1", "1/1"}
    assert f"ahead in {ahead['k1=2']} seeds" in md                    # the seed pairing beside the CI
    names = {Path(f).name for f in made["figures"]}
    assert {"fig4.png", "bars.png", "diffs.png", "curves_default.png", "routing_default.png"} <= names
    for f in made["figures"]:
        with Image.open(f) as im:
            assert im.size[0] >= 400 and im.size[1] >= 300
    # diffs.png plots each paired difference and its CI as % of the baseline's mean
    changes = relative_changes(made["rows"])
    base = made["rows"][0]
    assert base["baseline"] and set(changes) == set(labels[1:])
    for row in made["rows"][1:]:
        for m in ("ndcg@5", "mrr@10"):
            rel, low, high = changes[row["setting"]][m]
            assert rel == pytest.approx(100 * (row[f"{m}_mean"] - base[f"{m}_mean"]) / base[f"{m}_mean"])
            assert low <= rel <= high and low == pytest.approx(100 * row[f"{m}_ci_low"] / base[f"{m}_mean"])
