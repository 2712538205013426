"""Ray Tune sweeps: the search-space builder (no Ray) and a tiny real sweep of two trials, each a
Train V2 TorchTrainer fit inside a Tune trial (1 worker, 1 epoch, tiny model, generated data)."""

import json
import math

import pytest

from hm4sr_dist.train.code_version import fingerprint
from hm4sr_dist.tune.space import (FIG4_PARAMS, PAPER_GRID, fig4_trials, grid_size, grid_space,
                                   grid_trials, override_strings, parse_values, resolve_param,
                                   trial_run_name)


def test_paper_grids_match_spec_section_3():
    assert PAPER_GRID["loss.idcl_weight"] == (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    assert PAPER_GRID["loss.pcl_weight"] == (0.1, 0.3, 0.5, 0.7, 1.0, 1.5)
    assert PAPER_GRID["loss.idcl_temperature"] == (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    assert PAPER_GRID["model.n_interactive_experts"] == (2, 4, 6, 8, 12)
    assert PAPER_GRID["model.n_temporal_experts"] == (2, 4, 6, 8, 12)
    assert PAPER_GRID["loss.pcl_ratio"] == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert resolve_param("l2") == "loss.idcl_weight" and resolve_param("beta") == "loss.pcl_ratio"
    assert resolve_param("k1") == "model.n_interactive_experts"
    assert resolve_param("tau") == "loss.idcl_temperature"
    with pytest.raises(ValueError):
        resolve_param("lambda")


def test_every_grid_value_is_accepted_by_the_config_loader():
    from hm4sr_dist.config import load_config
    for key, values in PAPER_GRID.items():
        for value in values:
            cfg = load_config("configs/hm4sr_paper.yaml", override_strings({key: value}))
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value


def test_fig4_is_one_at_a_time():
    trials = fig4_trials(["l2"])
    assert trials == [{"loss.idcl_weight": v} for v in PAPER_GRID["loss.idcl_weight"]]
    both = fig4_trials(["k1", "beta"])
    assert len(both) == 5 + 5 and all(len(t) == 1 for t in both)
    beta = [t for t in both if "loss.pcl_ratio" in t]
    assert beta == [{"loss.pcl_ratio": v} for v in PAPER_GRID["loss.pcl_ratio"]]
    default = fig4_trials()
    assert {next(iter(t)) for t in default} == set(FIG4_PARAMS)
    assert len(default) == sum(len(PAPER_GRID[k]) for k in FIG4_PARAMS)
    assert fig4_trials(["l2"], {"l2": [0.5, 1.0]}) == [{"loss.idcl_weight": 0.5}, {"loss.idcl_weight": 1.0}]
    assert fig4_trials(values={"model.n_layers": [1, 3]}) == [{"model.n_layers": 1}, {"model.n_layers": 3}]


def test_grid_size_is_the_product_of_the_grid_sizes():
    space = grid_space(["k1", "k2", "tau"])
    assert grid_size(space) == 5 * 5 * 6 == len(grid_trials(space))
    full = grid_space()
    assert set(full) == set(PAPER_GRID)
    assert grid_size(full) == 6 * 6 * 6 * 5 * 5 * 5 == math.prod(len(v) for v in PAPER_GRID.values())
    combos = grid_trials(grid_space(["k1", "l2"], {"l2": [0.5, 1.0]}))
    assert len(combos) == 10 and len({tuple(sorted(c.items())) for c in combos}) == 10


def test_values_and_run_names():
    assert parse_values("0.5,1.0") == [0.5, 1.0] and parse_values("[2, 4]") == [2, 4]
    a, b = trial_run_name("s", {"loss.idcl_weight": 0.5}), trial_run_name("s", {"loss.idcl_weight": 1.0})
    assert a != b and a == trial_run_name("s", {"loss.idcl_weight": 0.5})
    assert trial_run_name("s", {"a.x": 1, "b.y": 2}) == trial_run_name("s", {"b.y": 2, "a.x": 1})


def test_trial_config_applies_overrides_as_the_loader_does():
    from hm4sr_dist.config import ConfigError, load_config, to_dict
    from hm4sr_dist.tune.trial import trial_config, trial_overrides

    base = to_dict(load_config("configs/hm4sr_paper.yaml"))
    cfg = trial_config(base, {"loss.idcl_weight": 0.5, "model.n_temporal_experts": 8}, "s")
    assert cfg.loss.idcl_weight == 0.5 and cfg.model.n_temporal_experts == 8
    assert cfg.train.run_name == trial_run_name("s", {"loss.idcl_weight": 0.5, "model.n_temporal_experts": 8})
    assert base["loss"]["idcl_weight"] == 1.0                      # the base is not modified
    with pytest.raises(ConfigError, match="loss.idcl_weight"):
        trial_config(base, {"loss.idcl_weight": -1}, "s")
    assert trial_overrides({"overrides": {"a.b": 1}, "c.d": 2, "other": 3}) == {"a.b": 1, "c.d": 2}


TINY = ["model.hidden_size=8", "model.inner_size=16", "model.max_seq_len=12", "model.n_layers=1",
        "model.modalities=[id]", "loss.cp_weight=0", "loss.pcl_weight=0", "optim.batch_size=64",
        "optim.epochs=1", "train.num_workers=1", "eval.batch_size=256"]


@pytest.mark.slow
def test_tiny_sweep_runs_two_trials_and_writes_the_table(prepared_sequences, tmp_path):
    from jobs.tune_sweep import main

    out = tmp_path / "sweep"
    table = main(["--prepared-dir", str(prepared_sequences), "--sweep", "fig4", "--param", "l2",
                  "--values", "0.5,1.0", "--name", "tiny", "--output", str(out), "--max-concurrent", "1",
                  *TINY, f"train.storage_path={tmp_path / 'runs'}"])
    written = json.loads((out / "sweep_results.json").read_text())
    assert written["n_trials"] == written["n_finished"] == 2 == table["n_trials"]
    rows = {row["overrides"]["loss.idcl_weight"]: row for row in written["trials"]}
    assert set(rows) == {0.5, 1.0}
    for weight, row in rows.items():
        assert row["overrides"] == {"loss.idcl_weight": weight}
        assert row["finished"] and row["error"] is None
        assert math.isfinite(row["best_valid"]) and 0 <= row["best_valid"] <= 1
        assert row["test"]["count"] == 60 and 0 <= row["test"]["ndcg@5"] <= 1
        # each trial was its own Ray Train run, with its own checkpoints and TensorBoard events
        assert (tmp_path / "runs" / row["run_name"] / "tensorboard").is_dir()
        assert row["code"]["fingerprint"] == fingerprint()    # which code trained it
    assert written["best"]["best_valid"] == max(r["best_valid"] for r in rows.values())


def test_report_callback_renames_tune_reserved_keys():
    """`done` in a forwarded result would end the Tune trial before Ray Train cleans up."""
    from hm4sr_dist.tune.trial import HM4SRTuneReportCallback

    class Queue(list):
        put = list.append

    cb = HM4SRTuneReportCallback.__new__(HM4SRTuneReportCallback)   # __init__ needs a Tune session
    cb._training_actor_item_queue = Queue()
    cb.after_report(None, [{"best_valid": 0.3, "done": True, "test/ndcg@5": 0.2}, {"done": True}], None)
    assert cb._training_actor_item_queue == [{"best_valid": 0.3, "train_done": True, "test/ndcg@5": 0.2}]


def test_sweep_refuses_a_plan_whose_trial_does_not_fit_the_cpus(prepared_sequences, local_ray, tmp_path,
                                                                 capsys):
    """1 CPU for the trial's driver + 2 workers x 1 CPU > the session Ray's 2 CPUs: the worker group
    would wait forever. The job stops before any trial with one line naming the fix (the study
    runner's check, `hm4sr_dist.tune.resources.check_trials_fit`)."""
    from jobs.common import exit_on_user_error
    from jobs.tune_sweep import main

    argv = ["--prepared-dir", str(prepared_sequences), "--sweep", "fig4", "--param", "l2", "--values", "0.5",
            "--name", "too-big", "--output", str(tmp_path / "out"), "--trial-cpus", "1",
            *TINY, "train.num_workers=2", f"train.storage_path={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(lambda: main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --trial-cpus")
    assert "1 + workers = 3 CPUs" in err and "--trial-cpus 0.5 with train.num_workers=1" in err
    assert not (tmp_path / "runs" / "too-big").exists() and not (tmp_path / "out").exists()


def test_trial_fit_check_counts_each_trials_workers():
    from hm4sr_dist.config import ConfigError, load_config
    from hm4sr_dist.tune.resources import check_trials_fit
    from hm4sr_dist.tune.sweep import worker_shapes

    base = load_config("configs/hm4sr_paper.yaml", ["train.num_workers=1"])
    two_cpus = {"CPU": 2.0}
    check_trials_fit(worker_shapes(base, trials=[{"loss.idcl_weight": 0.5}]), 1.0, two_cpus)   # 1 + 1 fits
    with pytest.raises(ConfigError, match="1 \\+ workers = 3 CPUs"):     # one trial asks for 2 workers
        check_trials_fit(worker_shapes(base, trials=[{"loss.idcl_weight": 0.5}, {"train.num_workers": 2}]),
                         1.0, two_cpus)
    with pytest.raises(ConfigError, match="0.5 \\+ workers = 4.5 CPUs"):  # a grid's largest corner
        grid = {"train.num_workers": [1, 2], "train.cpus_per_worker": [1, 2]}
        check_trials_fit(worker_shapes(base, grid=grid), 0.5, two_cpus)
    check_trials_fit([(4, 1)], 1.0, {"CPU": 2.0, "GPU": 4.0})          # GPU clusters are not CPU-bound


def test_concurrency_is_lowered_to_the_trials_whose_worker_groups_fit():
    """Two trials of 0.5 + 2 x 1 CPU on a 3-CPU head: the second one's workers would wait and Ray
    Train would log a startup timeout every minute, so only one runs at once, with a note."""
    from hm4sr_dist.tune.resources import fit_concurrency

    three_cpus = {"CPU": 3.0}
    n, note = fit_concurrency(2, [(2, 1.0), (2, 1.0)], 0.5, three_cpus)
    assert n == 1 and "--max-concurrent 2 lowered to 1" in note and "2.5 CPUs" in note
    assert fit_concurrency(2, [(2, 1.0)], 0.5, {"CPU": 5.0}) == (2, None)       # 2 x 2.5 = 5 fits
    assert fit_concurrency(4, [(1, 1.0), (2, 1.0)], 1.0, {"CPU": 8.0})[0] == 2  # the largest trial counts
    assert fit_concurrency(4, [(2, 1.0)], 1.0, {"CPU": 2.0, "GPU": 4.0}) == (4, None)   # GPU: not capped
