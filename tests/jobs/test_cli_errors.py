"""Errors before work: a bad command line ends a job with one `error: ...` line on stderr and exit
code 2 -- before Ray starts and before any data is prepared.

Each case runs the job script as a subprocess with RAY_TMPDIR (and TMPDIR) pointing at a fresh
folder: a local `ray.init()` creates `$RAY_TMPDIR/ray/session_<date>_<pid>/` (seen on a run of
`jobs/train.py --dataset beauty` with Ray 2.60), so an empty folder afterwards means Ray never started.
"""

import subprocess
from pathlib import Path

import pytest

import hm4sr_test_utils
from hm4sr_test_utils import run

VARIANTS = "['hm4sr', '-IMoE', '-TMoE', '-CP', '-IDCL', '-PCL', '-Text', '-Image', 'sasrec']"


def assert_user_error(work: Path, result: subprocess.CompletedProcess, line: str = "", start: str = "") -> None:
    """One `error:` line, exit 2, Ray not started (hm4sr_test_utils), and no data prepared."""
    hm4sr_test_utils.assert_user_error(work, result, line, start)
    assert not (work / "prepared").exists(), "data preparation started"


def train(work: Path, *args: str, dataset: str = "beauty") -> subprocess.CompletedProcess:
    script = ["jobs/train_home.py"] if dataset == "home" else ["jobs/train.py", "--dataset", dataset]
    return run(work, *script, "--raw-dir", str(work / "raw"), "--prepared-dir", str(work / "prepared"), *args)


def grid_study(work: Path, prepared: Path, *args: str) -> subprocess.CompletedProcess:
    return run(work, "jobs/study.py", "--prepared-dir", str(prepared), "--study", "grid", "--seeds", "1",
               "--output", str(work / "study"), *args)


def test_bad_value(work):
    assert_user_error(work, train(work, "optim.lr=abc"),
                      "error: optim.lr (command line): expected a number > 0, got 'abc'")


def test_unknown_key_with_its_suggestion(work):
    assert_user_error(work, train(work, "optim.epochs=3", "optim.lrr=0.1"),
                      "error: unknown key optim.lrr (command line); did you mean optim.lr?")


def test_bad_variant(work):
    assert_user_error(work, train(work, "--variant=-TMOE"),
                      f"error: --variant: expected one of {VARIANTS}, got '-TMOE'; did you mean -TMoE?")


def test_bad_prep_key_and_value(work):
    assert_user_error(work, train(work, "--prep", "imge_dir=/data/images"),
                      "error: unknown key imge_dir (--prep); did you mean image_dir?")
    assert_user_error(work, train(work, "--prep", "min_shards=many"),
                      "error: min_shards (--prep): expected an int, got 'many'")


def test_bad_value_in_the_yaml_file_names_the_file(work):
    config = work / "mine.yaml"
    config.write_text("optim:\n  lr: abc\n")
    assert_user_error(work, train(work, "--config", str(config)),
                      f"error: optim.lr ({config}): expected a number > 0, got 'abc'")


def test_infeasible_request_is_an_error_before_work(work):
    # the variant switches the Temporal MoE off, which PCL needs: asked for explicitly, it is an error
    assert_user_error(work, train(work, "--variant=-TMoE", "loss.pcl_weight=0.5"),
                      start="error: loss.pcl_weight (command line): expected 0 when model.use_temporal_moe "
                            "is false, got 0.5")
    # sequence files carry IDs only: asking for text fails before the data is prepared
    (work / "raw" / "Beauty_item.txt").write_text("")
    assert_user_error(work, train(work, "model.modalities=[id,text]"),
                      "error: model.modalities (command line): expected modalities the data set has "
                      "features for (['id']), got ['id', 'text']")


@pytest.mark.parametrize("dataset", ["toys", "home", "games", "movielens"])
def test_every_data_set_checks_first(work, dataset):
    assert_user_error(work, train(work, "model.hiden_size=3", dataset=dataset),
                      "error: unknown key model.hiden_size (command line); did you mean model.hidden_size?")


def test_bad_sweep_key_value_and_sweep_without_effect(work, prepared_sequences):
    """The study's grid (the old tune_sweep.py --sweep grid) checks every trial before Ray starts."""
    assert_user_error(work, grid_study(work, prepared_sequences, "--param", "loss.idcl_weigth"),
                      "error: unknown key loss.idcl_weigth (--param); did you mean loss.idcl_weight?")
    assert_user_error(work, grid_study(work, prepared_sequences, "--param", "l2", "--values", "0.5,-1"),
                      "error: loss.idcl_weight (--values): expected a number >= 0, got -1")
    assert_user_error(work, grid_study(work, prepared_sequences, "--param", "beta", "model.use_temporal_moe=false"),
                      "error: loss.pcl_ratio (--param): has no effect, as PCL is off "
                      "(loss.pcl_weight = 0.0); every trial would train the same model")
    assert_user_error(work, grid_study(work, prepared_sequences, "--param", "k1", "optim.lr=abc"),
                      "error: optim.lr (command line): expected a number > 0, got 'abc'")
    assert not (work / "study").exists()


def test_an_unknown_data_set_is_named(work):
    assert_user_error(work, train(work, dataset="beuty"),
                      "error: --dataset: expected one of ['beauty', 'games', 'home', 'movielens', 'toys'], "
                      "got 'beuty'; did you mean beauty?")


def test_quickstart_checks_its_overrides_before_writing_the_demo_data(work):
    qs = work / "qs"
    assert_user_error(work, run(work, "-m", "jobs.quickstart", "--workdir", str(qs), "optim.lr=abc"),
                      "error: optim.lr (command line): expected a number > 0, got 'abc'")
    assert not qs.exists()


def test_job_overrides_anywhere_and_a_key_given_twice_is_an_error():
    """Issue 25, finding 7: overrides may follow flags (as in the study CLI); a key given twice
    names both values instead of taking the last; `--variant -TMoE` hints at `=`."""
    from hm4sr_dist.config import ConfigError
    from jobs.common import DatasetJob, plan_job
    JOB = DatasetJob("movielens", "movielens")
    plan = plan_job(JOB, ["optim.epochs=1", "--output", "x", "train.storage_path=y", "--variant=sasrec"],
                    check_paths=False)
    assert plan.config.optim.epochs == 1 and plan.config.train.storage_path == str(Path("y").resolve())
    assert plan.args.output == "x" and plan.args.variant == "sasrec"
    with pytest.raises(ConfigError, match=r"given twice \('optim.lr=0.1' and 'optim.lr=0.2'\)"):
        plan_job(JOB, ["optim.lr=0.1", "optim.lr=0.2"], check_paths=False)
    with pytest.raises(ConfigError, match=r"loss.cp_weight .*given twice \('loss.cp_weight=0' and 'loss.cp_weight=1'\)"):
        plan_job(JOB, ["loss.cp_weight=0", "--output", "x", "loss.cp_weight=1"], check_paths=False)


def test_variant_with_a_dash_hints_at_the_equals_sign(capsys):
    from jobs.common import DatasetJob, parse_args
    JOB = DatasetJob("movielens", "movielens")
    with pytest.raises(SystemExit) as exit_:
        parse_args(JOB, ["--variant", "-TMoE"])
    assert exit_.value.code == 2
    assert "--variant=-TMoE" in capsys.readouterr().err
