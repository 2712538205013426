"""The paper's search spaces (no Ray) and the fig4 / grid studies built from them: what the old
`jobs/tune_sweep.py` ran, now `jobs/study.py --study fig4|grid` (one experiment system)."""

import math
from pathlib import Path

import pytest

from hm4sr_dist.config import ConfigError
from hm4sr_dist.run_folder import train_run_name
from hm4sr_dist.study.space import (FIG4_PARAMS, PAPER_GRID, fig4_trials, grid_size, grid_space, grid_trials,
                                    override_strings, parse_values, resolve_param, trial_config)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=8", "model.inner_size=16", "model.max_seq_len=12", "model.n_layers=1",
        "model.modalities=[id]", "loss.cp_weight=0", "loss.pcl_weight=0", "optim.batch_size=64",
        "optim.epochs=1", "train.num_workers=1", "eval.batch_size=256"]


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


def test_values_parse_and_train_runs_are_named_by_data_set_and_identity():
    assert parse_values("0.5,1.0") == [0.5, 1.0] and parse_values("[2, 4]") == [2, 4]
    with pytest.raises(ConfigError, match="--values"):
        parse_values("")
    assert train_run_name("beauty", "0123456789abcdef") == "beauty-0123456789ab"


def test_trial_config_applies_overrides_as_the_loader_does():
    from hm4sr_dist.config import load_config, to_dict

    base = to_dict(load_config("configs/hm4sr_paper.yaml"))
    cfg = trial_config(base, {"loss.idcl_weight": 0.5, "model.n_temporal_experts": 8})
    assert cfg.loss.idcl_weight == 0.5 and cfg.model.n_temporal_experts == 8
    assert cfg.train.run_name == base["train"]["run_name"]          # the study names the Train run
    assert base["loss"]["idcl_weight"] == 1.0                      # the base is not modified
    with pytest.raises(ConfigError, match="loss.idcl_weight"):
        trial_config(base, {"loss.idcl_weight": -1})


def _study_plan(prepared, *flags):
    from jobs.study import plan
    return plan(["--prepared-dir", str(prepared), "--seeds", "1", *flags, *TINY])["study"]


def test_fig4_with_values_is_one_trial_per_value_plus_the_default(prepared_sequences):
    """`--study fig4 --param l2 --values 0.5,1.0` (was `tune_sweep.py --sweep fig4`): the default and
    one trial per value, each its own Train run named by data set and identity."""
    study = _study_plan(prepared_sequences, "--study", "fig4", "--param", "l2", "--values", "0.5,1.0")
    weights = {t.setting: t.config["loss"]["idcl_weight"] for t in study.trials}
    assert weights == {"default": 1.0, "l2=0.5": 0.5} and study.aliases == {"l2=1.0": "default"}
    for t in study.trials:
        assert t.config["train"]["run_name"] == train_run_name(study.dataset, t.key)


def test_grid_is_the_product_of_the_params(prepared_sequences):
    """`--study grid` (was `tune_sweep.py --sweep grid`): every combination, the default once."""
    study = _study_plan(prepared_sequences, "--study", "grid", "--param", "l2", "--values", "0.5,1.0",
                        "--param", "tau", "--values", "0.2,0.5")
    combos = {(t.config["loss"]["idcl_weight"], t.config["loss"]["idcl_temperature"]) for t in study.trials}
    assert combos == {(1.0, 0.2), (0.5, 0.2), (0.5, 0.5), (1.0, 0.5)} and len(study.trials) == 4
    assert study.aliases == {"l2=1.0 tau=0.2": "default"}


def test_values_bind_to_the_param_just_before_them(prepared_sequences):
    """`--param l2 --param tau --values 0.2,0.5` sweeps tau over 0.2, 0.5 and l2 over its paper grid
    (by position the values went to l2, silently); a second --values for one --param is an error."""
    study = _study_plan(prepared_sequences, "--study", "grid", "--param", "l2", "--param", "tau",
                        "--values", "0.2,0.5")
    taus = {t.config["loss"]["idcl_temperature"] for t in study.trials}
    l2s = {t.config["loss"]["idcl_weight"] for t in study.trials}
    assert taus == {0.2, 0.5} and len(l2s) == len(PAPER_GRID["loss.idcl_weight"])
    with pytest.raises(ConfigError, match=r"--values 0.1 follows none of its own"):
        _study_plan(prepared_sequences, "--study", "grid", "--param", "l2", "--values", "0.5", "--values", "0.1")
    with pytest.raises(ConfigError, match=r"--values 0.5 follows none of its own"):
        _study_plan(prepared_sequences, "--study", "grid", "--values", "0.5", "--param", "l2")


def test_sweep_errors_name_the_key_before_ray(prepared_sequences):
    with pytest.raises(ConfigError, match=r"^unknown key loss.idcl_weigth \(--param\); did you mean "
                                          r"loss.idcl_weight\?"):
        _study_plan(prepared_sequences, "--study", "grid", "--param", "loss.idcl_weigth")
    with pytest.raises(ConfigError, match=r"^loss.idcl_weight \(--values\): expected a number >= 0, got -1"):
        _study_plan(prepared_sequences, "--study", "grid", "--param", "l2", "--values", "0.5,-1")
    with pytest.raises(ConfigError, match=r"^--values: every --values needs a --param just before it"):
        _study_plan(prepared_sequences, "--study", "fig4", "--values", "0.5")
    with pytest.raises(ConfigError, match=r"has no effect, as .*every trial would train the same model"):
        _study_plan(prepared_sequences, "--study", "grid", "--param", "beta")     # PCL is off in TINY


def test_report_callback_renames_tune_reserved_keys():
    """`done` in a forwarded result would end the Tune trial before Ray Train cleans up; the final
    report also carries the scheduler's validation key (= best_valid)."""
    from hm4sr_dist.study.report_callback import HM4SRTuneReportCallback

    class Queue(list):
        put = list.append

    cb = HM4SRTuneReportCallback.__new__(HM4SRTuneReportCallback)   # __init__ needs a Tune session
    cb.valid_key = None
    cb._training_actor_item_queue = Queue()
    cb.after_report(None, [{"best_valid": 0.3, "done": True, "test/ndcg@5": 0.2}, {"done": True}], None)
    assert cb._training_actor_item_queue == [{"best_valid": 0.3, "train_done": True, "test/ndcg@5": 0.2}]
    cb.valid_key, cb._training_actor_item_queue = "valid/ndcg@5", Queue()
    cb.after_report(None, [{"best_valid": 0.3, "test/ndcg@5": 0.2}], None)
    assert cb._training_actor_item_queue == [{"best_valid": 0.3, "test/ndcg@5": 0.2, "valid/ndcg@5": 0.3}]
    cb._training_actor_item_queue = Queue()
    cb.after_report(None, [{"checkpoint_kind": "step", "global_step": 3}], None)       # mid-epoch: not sent
    assert cb._training_actor_item_queue == []


@pytest.mark.slow
def test_study_refuses_a_plan_whose_trial_does_not_fit_the_cpus(prepared_sequences, local_ray, tmp_path, capsys):
    """1 CPU for the trial's driver + 2 workers x 1 CPU > the session Ray's 2 CPUs: the worker group
    would wait forever. The study stops before any trial with one line naming the fix
    (`hm4sr_dist.study.resources.check_trials_fit`)."""
    from jobs.common import exit_on_user_error
    from jobs.study import main

    argv = ["--prepared-dir", str(prepared_sequences), "--study", "fig4", "--param", "l2", "--values", "0.5",
            "--seeds", "1", "--output", str(tmp_path / "out"), "--trial-cpus", "1",
            *[o for o in TINY if not o.startswith("train.num_workers")], "train.num_workers=2",
            f"train.storage_path={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(lambda: main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --trial-cpus")
    assert "1 + workers = 3 CPUs" in err and "--trial-cpus 0.5 with train.num_workers=1" in err
    assert not (tmp_path / "out" / "trials.jsonl").exists() and not (tmp_path / "out" / "runs").exists()
    assert not list((tmp_path / "runs").glob("*/run_identity.json"))      # no Train run was started


def test_trial_fit_check_counts_each_trials_workers():
    from hm4sr_dist.study.resources import check_trials_fit

    two_cpus = {"CPU": 2.0}
    check_trials_fit([(1, 1)], 1.0, two_cpus)                       # 1 + 1 fits
    with pytest.raises(ConfigError, match="1 \\+ workers = 3 CPUs"):     # one trial asks for 2 workers
        check_trials_fit([(1, 1), (2, 1)], 1.0, two_cpus)
    with pytest.raises(ConfigError, match="0.5 \\+ workers = 4.5 CPUs"):  # a grid's largest corner
        check_trials_fit([(1, 1), (2, 1), (1, 2), (2, 2)], 0.5, two_cpus)
    check_trials_fit([(4, 1)], 1.0, {"CPU": 2.0, "GPU": 4.0})          # GPU clusters are not CPU-bound


def test_concurrency_is_lowered_to_the_trials_whose_worker_groups_fit():
    """Two trials of 0.5 + 2 x 1 CPU on a 3-CPU head: the second one's workers would wait and Ray
    Train would log a startup timeout every minute, so only one runs at once, with a note."""
    from hm4sr_dist.study.resources import fit_concurrency

    three_cpus = {"CPU": 3.0}
    n, note = fit_concurrency(2, [(2, 1.0), (2, 1.0)], 0.5, three_cpus)
    assert n == 1 and "--max-concurrent 2 lowered to 1" in note and "2.5 CPUs" in note
    assert fit_concurrency(2, [(2, 1.0)], 0.5, {"CPU": 5.0}) == (2, None)       # 2 x 2.5 = 5 fits
    assert fit_concurrency(4, [(1, 1.0), (2, 1.0)], 1.0, {"CPU": 8.0})[0] == 2  # the largest trial counts
    assert fit_concurrency(4, [(2, 1.0)], 1.0, {"CPU": 2.0, "GPU": 4.0}) == (4, None)   # GPU: not capped
