"""hm4sr-compare: per-user metric maths, the results.json check, seed grouping (the run identity's
ignored keys), paired bootstrap, seed-level intervals, Holm adjustment, CLI."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from hm4sr_dist.compare import (IGNORED_KEYS, CompareError, compare, format_markdown, format_text,
                                group_settings, load_run, main, paired_bootstrap, per_user_metrics,
                                resolve_metrics)
from hm4sr_dist.config import ExperimentConfig, from_dict, to_dict
from hm4sr_dist.metrics import finalize, metric_sums
from hm4sr_dist.stats import holm, seed_t_interval
from hm4sr_dist.train.identity import NOT_IDENTITY, run_identity


HIER = "seeds then users (hierarchical bootstrap)"


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
    assert len(md_rows) == 3 * (1 + 2)                                 # three tables: header + 2 settings
    assert json.loads(out_json.read_text())["baseline"] == "hm4sr"
    # Every interval names its unit, in every output; the Holm family is stated.
    assert {rows[1][f"ndcg@10_{k}"] for k in ("interval_unit", "seed_t_unit", "seed_hier_unit")} == {
        "users", "seeds (t)", HIER}
    assert float(rows[1]["ndcg@10_seed_t_low"]) < float(rows[1]["ndcg@10_seed_t_high"]) < 0
    assert rows[1]["ndcg@10_holm_excludes_0"] == "True" and "2 x" not in rows[1]["holm_family"]
    md = out_md.read_text()
    for text in (stdout, md):
        assert "interval unit: users" in text and "seeds (t)" in text and "seeds then users" in text
        assert "Holm-Bonferroni step-down over every setting-vs-baseline comparison on every metric" in text
    saved = json.loads(out_json.read_text())
    assert saved["holm_family_sizes"] == {"users": 4, "seeds (t)": 4, HIER: 0}     # 3 seeds: not tested
    assert saved["comparisons"][0]["metrics"]["mrr@5"]["seed_hier"]["unit"].startswith("seeds then users")
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


def test_seed_level_intervals_and_holm_in_compare(study):
    """Table 3: the t interval of the paired seed differences, the hierarchical bootstrap over seeds
    then users (wider here than the user-level CI: the seeds disagree), and Holm over the call."""
    res = compare(study, n_boot=1000, seed=1)
    c = res.comparisons[0]
    for d in c.metrics.values():
        t = seed_t_interval(d.seed_diffs)
        assert d.paired_seeds == [1, 2, 3] and d.seed_t_note == d.seed_hier_note == ""
        assert (d.seed_t.low, d.seed_t.high, d.seed_t.p_value) == (t.low, t.high, t.p_value)
        assert d.seed_t.diff == pytest.approx(np.mean(d.seed_diffs)) == pytest.approx(d.diff)
        assert d.seed_hier.n_seeds == 3 and d.seed_hier.n_users == 300
        assert d.seed_hier.high - d.seed_hier.low > d.ci_high - d.ci_low
        assert d.interval_unit == "users" and d.p_two_sided == min(1, 2 * min(d.p_le_0, d.p_ge_0))
    # One family per interval kind: all 4 metrics of the one setting, adjusted together
    diffs = list(c.metrics.values())
    assert [d.holm_p for d in diffs] == pytest.approx(holm([d.p_two_sided for d in diffs]))
    assert [d.seed_t.holm_p for d in diffs] == pytest.approx(holm([d.seed_t.p_value for d in diffs]))
    assert all(d.holm_excludes_0 == (d.holm_p <= 0.05) for d in diffs)
    # 3 seeds: the hierarchical interval is shown, not tested (a resample of 3 seeds never falls
    # below the smallest seed difference), so it is in no Holm family and never marked
    assert all(math.isnan(d.seed_hier.p_value) and not d.seed_hier.holm_excludes_0 for d in diffs)
    assert res.holm_family_sizes == {"users": 4, "seeds (t)": 4, HIER: 0}
    assert "(1 settings x 4 metrics)" in res.holm_family
    text = format_text(res)
    assert "Table 3" in text and "Holm p" in text and "†" in text
    assert "not tested (< 8 seeds)" in format_markdown(res)


def test_holm_family_is_every_setting_and_metric_of_the_call(study, tmp_path):
    """A third setting joins the family: the CIs stay as they were, the Holm p-values are adjusted
    over 2 settings x 2 metrics = 4 comparisons."""
    extra = [write_run(tmp_path / f"lr-s{seed}", random_ranks(300, seed + 10), seed=seed, optim__lr=0.01)
             for seed in (1, 2, 3)]
    alone = compare(study, metrics=["ndcg@5", "mrr@10"], n_boot=800)
    both = compare(study + extra, metrics=["ndcg@5", "mrr@10"], n_boot=800)
    assert both.holm_family_sizes["users"] == 4 and alone.holm_family_sizes["users"] == 2
    same, _ = both.comparisons
    for m, d in same.metrics.items():
        first = alone.comparisons[0].metrics[m]
        assert (d.ci_low, d.ci_high) == (first.ci_low, first.ci_high)
    family = [d for c in both.comparisons for d in c.metrics.values()]
    for kind in ("p_two_sided", "seed_t"):      # seed_hier: not tested with 3 seeds
        raw = [getattr(d, kind) if kind == "p_two_sided" else getattr(d, kind).p_value for d in family]
        held = [d.holm_p if kind == "p_two_sided" else getattr(d, kind).holm_p for d in family]
        assert held == pytest.approx(holm(raw))


def test_from_eight_seeds_the_hierarchical_interval_is_tested_and_holm_adjusted(tmp_path):
    dirs = []
    for weight, tag in ((1.0, "full"), (0.0, "noidcl")):
        for seed in range(1, 9):
            ranks = random_ranks(120, seed)
            if weight == 0.0:
                ranks[:40] += 7
            dirs.append(write_run(tmp_path / f"{tag}-s{seed}", ranks, seed=seed, loss__idcl_weight=weight))
    res = compare(dirs, metrics=["ndcg@5", "mrr@10"], n_boot=400, seed=3)
    diffs = list(res.comparisons[0].metrics.values())
    assert all(d.seed_hier.n_seeds == 8 and 0 <= d.seed_hier.p_value <= 1 for d in diffs)
    assert res.holm_family_sizes[HIER] == 2
    assert [d.seed_hier.holm_p for d in diffs] == pytest.approx(holm([d.seed_hier.p_value for d in diffs]))


def test_too_few_seeds_say_why(tmp_path):
    """1 paired seed: no seed-level interval; 2: the t interval but no hierarchical bootstrap."""
    ranks = random_ranks(200, 0)
    better = ranks.copy()
    better[:30] = 0
    base = [write_run(tmp_path / f"a-s{seed}", ranks, seed=seed) for seed in (1, 2, 3)]
    other = [write_run(tmp_path / f"b-s{seed}", better, seed=seed, loss__idcl_weight=0.5)
             for seed in (1, 2, 4)]
    labels = [("A", "*a-*"), ("B", "*b-*")]
    two = compare(base + other, labels=labels, n_boot=200).comparisons[0].metrics["ndcg@5"]
    assert two.paired_seeds == [1, 2] and two.seed_t is not None and two.seed_t.n_seeds == 2
    assert two.seed_hier is None
    assert two.seed_hier_note == "2 seeds: no hierarchical bootstrap (needs >= 3 seeds)"
    one = compare([base[0], other[0]], labels=labels, n_boot=200)
    d = one.comparisons[0].metrics["ndcg@5"]
    assert d.seed_t is None and d.seed_hier is None
    assert d.seed_t_note == d.seed_hier_note == "1 seed: no seed-level interval"
    assert one.holm_family_sizes == {"users": 4, "seeds (t)": 0, HIER: 0}
    assert "1 seed: no seed-level interval" in format_text(one)
    assert "1 seed: no seed-level interval" in format_markdown(one)
    assert one.to_dict()["comparisons"][0]["metrics"]["ndcg@5"]["seed_t"] is None
    none = compare([base[2], other[2]], labels=labels, n_boot=50).comparisons[0].metrics["ndcg@5"]
    assert none.seed_t_note == "no seed run by both settings: no seed-level interval"


def test_grouping_ignores_exactly_the_run_identity_keys(tmp_path):
    """Finding 2: compare and the run identity share one list of keys that do not change results."""
    assert IGNORED_KEYS == ("optim.seed",) + tuple(NOT_IDENTITY)
    ranks = random_ranks(100, 0)
    runs = [write_run(tmp_path / "r1", ranks, seed=1, train__checkpoint_every_steps=50, eval__batch_size=64),
            write_run(tmp_path / "r2", ranks, seed=2, train__checkpoint_every_steps=1000, optim__epochs=7,
                      train__max_failures=9),
            # loss.cp_reduction is inert without the CP loss: the identity leaves it out, so does compare
            write_run(tmp_path / "r3", ranks, seed=3, loss__cp_weight=0.0, loss__cp_reduction="per_element"),
            write_run(tmp_path / "r4", ranks, seed=4, loss__cp_weight=0.0, loss__cp_reduction="per_item")]
    settings = group_settings([load_run(r) for r in runs])
    assert [(s.name, s.seeds) for s in settings] == [("hm4sr", [1, 2]), ("loss.cp_weight=0.0", [3, 4])]
    notes = compare([load_run(r) for r in runs], n_boot=50).notes     # r2's cap 7 averaged in: said
    assert any("setting hm4sr: runs with different epoch caps" in n for n in notes), notes
    # The same verdict as the identity hash (which keeps the seed: set it equal there)
    for a, b, same in ((runs[0], runs[1], True), (runs[2], runs[3], True), (runs[0], runs[2], False)):
        hashes = []
        for r in (a, b):
            cfg = json.loads((r / "results.json").read_text())["config"]
            cfg["optim"]["seed"] = 0
            hashes.append(run_identity(from_dict(ExperimentConfig, cfg), "fp")["hash"])
        assert (hashes[0] == hashes[1]) == same


def test_a_run_older_than_a_key_counts_at_its_legacy_value(tmp_path):
    """As in the run identity: a results.json without loss.cp_reduction (written before the key
    existed) ran with its legacy value, per_element, so it groups with per_element runs only."""
    ranks = random_ranks(100, 1)
    old = write_run(tmp_path / "old", ranks, seed=1)
    results = json.loads((old / "results.json").read_text())
    del results["config"]["loss"]["cp_reduction"]
    (old / "results.json").write_text(json.dumps(results))
    legacy = write_run(tmp_path / "legacy", ranks, seed=2, loss__cp_reduction="per_element")
    new = write_run(tmp_path / "new", ranks, seed=3, loss__cp_reduction="per_item")
    settings = group_settings([load_run(r) for r in (old, legacy, new)])
    assert [(s.seeds, s.diff) for s in settings] == [([1, 2], {}), ([3], {"loss.cp_reduction": "per_item"})]
