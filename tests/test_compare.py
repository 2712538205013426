"""hm4sr-compare: per-user metric maths, the results.json check, seed grouping, paired bootstrap, CLI."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from hm4sr_dist.compare import (CompareError, compare, format_markdown, format_text, group_settings, load_run, main,
                                paired_bootstrap, per_user_metrics, resolve_metrics)
from hm4sr_dist.config import ExperimentConfig, to_dict
from hm4sr_dist.metrics import finalize, metric_sums


def write_run(folder, ranks, users=None, seed=2020, variant="hm4sr", dataset="toy", test=None, **overrides):
    """A run folder as the training job writes it; `test` defaults to the real metrics.finalize path."""
    ranks = np.asarray(ranks, dtype=np.int64)
    users = np.arange(ranks.size, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    cfg = to_dict(ExperimentConfig())
    cfg["optim"]["seed"] = seed
    cfg["name"] = f"{dataset}-{variant}"
    cfg["train"]["run_name"] = folder.name
    cfg["train"]["storage_path"] = str(folder / "ray")
    cfg["train"]["tensorboard_dir"] = str(folder / "tb")
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    if test is None:
        test = finalize(metric_sums(torch.from_numpy(ranks), [5, 10]), [5, 10])
    folder.mkdir(parents=True, exist_ok=True)
    results = {"dataset": dataset, "variant": variant, "test": test, "best_epoch": 3, "epochs_run": 5,
               "wall_seconds": 1.0, "config": cfg}
    (folder / "results.json").write_text(json.dumps(results))
    np.savez(folder / "per_user_test.npz", user=users, rank=ranks)
    return folder


def random_ranks(n, seed, high=40):
    return np.random.default_rng(seed).integers(0, high, n)


@pytest.fixture
def study(tmp_path):
    """3 seeds x 2 settings (HM4SR and IDCL off) over 300 users; IDCL-off ranks are worse on a third."""
    dirs = []
    for weight, tag in ((1.0, "full"), (0.0, "noidcl")):
        for seed in (1, 2, 3):
            ranks = random_ranks(300, seed)
            if weight == 0.0:
                ranks[:100] += 7
            dirs.append(write_run(tmp_path / f"{tag}-s{seed}", ranks, seed=seed, loss__idcl_weight=weight))
    return dirs


def test_per_user_metrics_by_hand():
    v = per_user_metrics(np.array([0, 1, 4, 5, 9, 10]), ["ndcg@5", "mrr@10", "hit@5"])
    np.testing.assert_allclose(v["ndcg@5"], [1, 1 / math.log2(3), 1 / math.log2(6), 0, 0, 0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(v["mrr@10"], [1, 1 / 2, 1 / 5, 1 / 6, 1 / 10, 0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(v["hit@5"], [1, 1, 1, 0, 0, 0])
    assert resolve_metrics(None, None) == ["ndcg@5", "ndcg@10", "mrr@5", "mrr@10"]
    assert resolve_metrics(["NDCG", "hit@20"], [10]) == ["ndcg@10", "hit@20"]


def test_mean_matches_results_and_a_mismatched_file_is_caught(tmp_path):
    ranks = random_ranks(500, 0)
    run = load_run(write_run(tmp_path / "ok", ranks))                   # finalize() agrees to 1e-9
    assert run.users.tolist() == list(range(500)) and run.seed == 2020
    other = random_ranks(500, 1)
    bad = write_run(tmp_path / "bad", ranks, test=finalize(metric_sums(torch.from_numpy(other), [5, 10]), [5, 10]))
    with pytest.raises(CompareError, match=r"run .*bad: test (ndcg|mrr|hit)@\d+ .*do not belong together"):
        load_run(bad)
    short = write_run(tmp_path / "short", ranks[:499],
                      test=finalize(metric_sums(torch.from_numpy(ranks), [5, 10]), [5, 10]))
    with pytest.raises(CompareError, match="499 users but results.json counts 500"):
        load_run(short)


def test_bootstrap_of_a_known_shift_and_of_identical_runs():
    a = np.random.default_rng(0).random(2000) * 0.5
    b = a.copy()
    b[:1000] += 0.05                                                     # true mean difference 0.025
    r = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert r.diff == pytest.approx(0.025)
    assert r.ci_low < 0.025 < r.ci_high and r.excludes_zero and r.p_le_0 == 0.0
    same = paired_bootstrap({"ndcg@10": a}, {"ndcg@10": a.copy()}, n_boot=500)["ndcg@10"]
    assert (same.ci_low, same.ci_high, same.diff) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_compare_finds_a_real_effect_between_runs(tmp_path):
    ranks = random_ranks(400, 5)
    better = ranks.copy()
    better[:80] = 0                                                      # 80 users get their target first
    a, b = write_run(tmp_path / "a", ranks), write_run(tmp_path / "b", better, model__hidden_size=32)
    res = compare([a, b], n_boot=2000)
    assert [s.name for s in res.settings] == ["hm4sr", "model.hidden_size=32"]
    ndcg10 = lambda r: per_user_metrics(r, ["ndcg@10"])["ndcg@10"].mean()    # noqa: E731
    true = ndcg10(better) - ndcg10(ranks)
    d = res.comparisons[0].metrics["ndcg@10"]
    assert d.diff == pytest.approx(true) and d.ci_low < true < d.ci_high and d.excludes_zero
    assert d.rel_change == pytest.approx(true / d.baseline_mean)
    same = compare([a, write_run(tmp_path / "a2", ranks, model__hidden_size=32)], n_boot=300)
    assert all((m.ci_low, m.ci_high) == (0.0, 0.0) for m in same.comparisons[0].metrics.values())


def test_seeds_group_into_settings(study):
    runs = [load_run(d) for d in study]
    settings = group_settings(runs)
    assert [(s.name, len(s.runs), s.seeds) for s in settings] == [
        ("hm4sr", 3, [1, 2, 3]), ("loss.idcl_weight=0.0", 3, [1, 2, 3])]
    res = compare(runs, n_boot=500)
    assert [s.metrics["ndcg@10"].n for s in res.settings] == [3, 3]
    per_seed = res.settings[1].metrics["mrr@5"].per_seed
    assert res.settings[1].metrics["mrr@5"].std == pytest.approx(np.std(per_seed, ddof=1))
    d = res.comparisons[0].metrics["ndcg@10"]
    assert d.diff < 0 and d.excludes_zero and d.p_le_0 == 1.0         # IDCL off is worse on every seed
    text = format_text(res)
    assert "Table 1" in text and "Table 2" in text and " ± " in text and "n=3" in text


def test_seed_level_pairing_counts_the_seeds_a_setting_is_ahead(tmp_path):
    """The bootstrap resamples users; the seed pairing says whether the gap holds seed by seed: run
    means differ by hand-set amounts per seed, and only seeds both settings ran are paired."""
    ranks = random_ranks(200, 0)
    base = [write_run(tmp_path / f"a-s{seed}", ranks, seed=seed) for seed in (1, 2, 3)]
    better, worse = ranks.copy(), ranks.copy()
    better[:20] = 0                                   # more users at rank 0: higher NDCG/MRR
    worse[:20] = 39
    other = [write_run(tmp_path / "b-s1", better, seed=1, loss__idcl_weight=0.5),
             write_run(tmp_path / "b-s2", worse, seed=2, loss__idcl_weight=0.5),
             write_run(tmp_path / "b-s4", better, seed=4, loss__idcl_weight=0.5)]   # seed 4: no partner
    res = compare(base + other, labels=[("A", "*a-*"), ("B", "*b-*")], n_boot=200)
    d = res.comparisons[0].metrics["ndcg@5"]
    assert d.paired_seeds == [1, 2] and d.seeds_ahead == "1/2"
    runs = {s.name: s.metrics["ndcg@5"].per_seed for s in res.settings}
    assert d.seed_diffs == pytest.approx([runs["B"][0] - runs["A"][0], runs["B"][1] - runs["A"][1]])
    assert d.seed_diffs[0] > 0 > d.seed_diffs[1]
    assert "seeds ahead" in format_text(res) and "ahead in 1/2 seeds" in format_markdown(res)
    single = compare([base[1], other[1]], labels=[("A", "*a-*"), ("B", "*b-*")], n_boot=50)
    assert single.comparisons[0].metrics["ndcg@5"].seeds_ahead == "0/1"


def test_labels_baseline_and_single_run(study, tmp_path):
    res = compare(study, labels=[("A", "*full-*"), ("B", "*noidcl-*")], baseline="B", n_boot=200)
    assert [s.name for s in res.settings] == ["A", "B"] and res.baseline == "B"
    assert res.comparisons[0].metrics["ndcg@5"].diff > 0
    one = compare([study[0]], n_boot=10)
    assert one.settings[0].metrics["ndcg@5"].n == 1 and math.isnan(one.settings[0].metrics["ndcg@5"].std)
    assert "n=1" in format_text(one) and "nothing to compare" in format_text(one)
    with pytest.raises(CompareError, match="no such setting"):
        compare(study, baseline="nope", n_boot=10)


def test_fixed_seed_is_deterministic(study, tmp_path):
    first = compare(study, n_boot=700, seed=3).to_dict()
    assert compare(study, n_boot=700, seed=3).to_dict() == first
    assert compare(study, n_boot=700, seed=4).to_dict() != first
    # A setting's CI does not depend on which other settings are compared in the same call.
    extra = write_run(tmp_path / "lr-s1", random_ranks(300, 9), seed=1, optim__lr=0.01)
    assert compare(study + [extra], n_boot=700, seed=3).to_dict()["comparisons"][0] == first["comparisons"][0]


def test_unequal_user_sets_are_an_error(tmp_path):
    a = write_run(tmp_path / "a", random_ranks(100, 0))
    b = write_run(tmp_path / "b", random_ranks(100, 1), users=list(range(98)) + [200, 201], loss__pcl_weight=0.5)
    with pytest.raises(CompareError, match="4 users differ: 2 only in the first, 2 only in the second"):
        compare([a, b], n_boot=10)
    c = write_run(tmp_path / "c", random_ranks(100, 2), users=list(range(1, 101)), seed=7)
    with pytest.raises(CompareError, match="different test user set"):
        compare([a, c], n_boot=10)


def test_missing_files_and_empty_selection(tmp_path):
    run = write_run(tmp_path / "r", random_ranks(10, 0))
    (run / "per_user_test.npz").unlink()
    with pytest.raises(CompareError, match=r"r/per_user_test.npz: no such file"):
        load_run(run)
    with pytest.raises(CompareError, match="matches nothing"):
        compare([str(tmp_path / "nothing-*")])
    with pytest.raises(CompareError, match="no runs"):
        compare([])


def test_cli_writes_one_row_per_setting(study, tmp_path, capsys):
    out_csv, out_md, out_json = tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "t.json"
    assert main([str(tmp_path / "*-s*"), "--bootstrap", "300", "--csv", str(out_csv),
                 "--markdown", str(out_md), "--json", str(out_json)]) == 0
    stdout = capsys.readouterr().out
    assert "Table 1" in stdout and "loss.idcl_weight=0.0" in stdout
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["setting"], r["n"]) for r in rows] == [("hm4sr", "3"), ("loss.idcl_weight=0.0", "3")]
    assert rows[0]["ndcg@10_diff"] == "" and float(rows[1]["ndcg@10_diff"]) < 0
    md_rows = [line for line in out_md.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(md_rows) == 2 * (1 + 2)                                 # two tables: header + 2 settings
    assert json.loads(out_json.read_text())["baseline"] == "hm4sr"
    # The module entry point, and an error exit that names the path.
    proc = subprocess.run([sys.executable, "-m", "hm4sr_dist.compare", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing: no such run folder" in proc.stderr


def test_a_study_folder_stands_for_its_finished_runs_only(tmp_path):
    """`hm4sr-compare runs/`: the run folders, not a half-written `.<run>.tmp` left by a killed study."""
    from hm4sr_dist.compare import expand_runs

    for name in ("a__seed1", "b__seed1", ".b__seed2.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    assert expand_runs([tmp_path]) == [tmp_path / "a__seed1", tmp_path / "b__seed1"]
    assert expand_runs([tmp_path / "*"]) == [tmp_path / "a__seed1", tmp_path / "b__seed1"]
