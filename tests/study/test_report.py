"""Study tables mark only what survives the Holm adjustment over the table's family (every
non-baseline setting x metric), keep the unadjusted CIs unbolded, and show the seed-level intervals."""

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from hm4sr_dist.compare import per_user_metrics
from hm4sr_dist.config import ExperimentConfig, to_dict
from hm4sr_dist.stats import holm
from hm4sr_dist.study.plan import slug
from hm4sr_dist.study.report import METRICS, holm_marks, markdown, plot_differences, table_holm, tabulate


def _row(setting, p=None, ci=(0.001, 0.005), baseline=False):
    """A study.csv row as `tabulate` builds it, with user-level two-sided p-values `p` per metric."""
    row = {"setting": setting, "baseline": baseline, "runs": "3/3", "failed": "", "best_epoch_mean": 2.0,
           "best_epoch_std": math.nan, "train_seconds_mean": 60.0}
    for i, m in enumerate(METRICS):
        there = p is not None
        row |= {f"{m}_mean": 0.1, f"{m}_std": 0.01, f"{m}_rel_change": 0.03 if there else math.nan,
                f"{m}_diff": 0.003 if there else math.nan, f"{m}_ci_low": ci[0] if there else math.nan,
                f"{m}_ci_high": ci[1] if there else math.nan, f"{m}_seeds_ahead": "3/3" if there else "",
                f"{m}_p_two_sided": p[i] if there else math.nan,
                f"{m}_seed_t_low": -0.002 if there else math.nan,
                f"{m}_seed_t_high": 0.008 if there else math.nan,
                f"{m}_seed_t_note": "", f"{m}_seed_hier_low": -0.001 if there else math.nan,
                f"{m}_seed_hier_high": 0.007 if there else math.nan, f"{m}_seed_hier_note": ""}
    return row


PLAN = {"name": "toy", "study": "custom", "notes": []}
STUB = SimpleNamespace(settings=[SimpleNamespace(n_users=100)], n_boot=2000)


def test_table_family_is_adjusted_by_holm_and_only_survivors_are_bold():
    """Family = 2 settings x 3 metrics = 6 p-values (the baseline is not in it). Sorted:
    0.01 (s1 NDCG@5), 0.011 (s2 NDCG@10), 0.03 (s1 MRR@10), 0.04 (s1 NDCG@10), 0.20 (s2 NDCG@5),
    0.5 (s2 MRR@10); Holm: 6·0.01 = 0.06, max(0.06, 5·0.011) = 0.06, 4·0.03 = 0.12, max(0.12, 3·0.04)
    = 0.12, 2·0.2 = 0.4, 0.5. Nothing is <= 0.05, though four raw p-values are and s1's NDCG@5 CI
    excludes 0: nothing is bold."""
    rows = [_row("base", baseline=True), _row("s1", [0.01, 0.04, 0.03]),
            _row("s2", [0.20, 0.011, 0.5], (-1, 1))]
    assert table_holm(rows) == 6
    held = {(r["setting"], m): r[f"{m}_holm_p"] for r in rows[1:] for m in METRICS}
    assert held == pytest.approx({("s1", "ndcg@5"): 0.06, ("s1", "ndcg@10"): 0.12, ("s1", "mrr@10"): 0.12,
                                  ("s2", "ndcg@5"): 0.4, ("s2", "ndcg@10"): 0.06, ("s2", "mrr@10"): 0.5})
    assert all(math.isnan(rows[0][f"{m}_holm_p"]) and not rows[0][f"{m}_holm_excludes_0"] for m in METRICS)
    md = markdown(PLAN, rows, STUB, [])
    assert "**" not in md.split("**Significance.**")[0].split("|---")[1]     # no bold cell in the table
    assert "+0.0030 [+0.0010, +0.0050], Holm p=0.060" in md                     # printed, unadjusted CI
    assert "2 settings x 3 metrics: NDCG@5, NDCG@10, MRR@10; 6 comparisons" in md
    assert "Holm-Bonferroni step-down method over the 6" in md and "Excluding 0 after Holm: none." in md
    assert "t [-0.0020, +0.0080]; hier. [-0.0010, +0.0070]" in md                      # seed-level column

    # s1's NDCG@5 at p = 0.001: 6·0.001 = 0.006 <= 0.05, the next max(0.006, 5·0.011) = 0.055: one bold cell
    rows[1]["ndcg@5_p_two_sided"] = 0.001
    table_holm(rows)
    assert rows[1]["ndcg@5_holm_p"] == pytest.approx(0.006)
    assert rows[2]["ndcg@10_holm_p"] == pytest.approx(0.055)
    marked = [(r["setting"], m) for r in rows for m in METRICS if r[f"{m}_holm_excludes_0"]]
    assert marked == [("s1", "ndcg@5")]
    md = markdown(PLAN, rows, STUB, [])
    assert "| **+0.0030 [+0.0010, +0.0050]**, Holm p=0.006, ahead in 3/3 seeds |" in md
    assert md.count("**+0.") == 1 and "Excluding 0 after Holm: s1 NDCG@5 (Holm p=0.006)." in md
    assert holm_marks(rows, ["s1", "s2"]) == {"ndcg@5": [True, False], "ndcg@10": [False, False],
                                              "mrr@10": [False, False]}


def _write_study(root, ranks_of):
    """A finished study folder: plan, trials.json and run folders; `ranks_of[setting]` = [ranks per
    seed] (None: that trial failed)."""
    cfg = to_dict(ExperimentConfig())
    labels = list(ranks_of)
    plan = {"name": "toy", "study": "custom", "baseline": labels[0], "notes": [],
            "settings": [{"label": lab, "axis": None} for lab in labels]}
    (root / "runs").mkdir(parents=True)
    (root / "study_plan.json").write_text(json.dumps(plan))
    status = []
    for lab, per_seed in ranks_of.items():
        for seed, ranks in enumerate(per_seed, start=1):
            run = f"{slug(lab)}__seed{seed}"
            failed = ranks is None
            row = {"setting": lab, "seed": seed, "run": run, "status": "failed" if failed else "finished",
                   "error": "RuntimeError('boom')" if failed else None, "best_epoch": 2,
                   "wall_seconds": 5.0, "train_seconds": 4.0}
            status.append(row)
            if failed:
                continue
            folder = root / "runs" / run
            folder.mkdir()
            np.savez(folder / "per_user_test.npz", user=np.arange(ranks.size), rank=ranks)
            test = {m: float(v.mean()) for m, v in per_user_metrics(ranks, list(METRICS)).items()}
            (folder / "results.json").write_text(json.dumps({
                "dataset": "toy", "variant": lab, "test": test | {"count": int(ranks.size)},
                "data_manifest": {"fingerprint": "fp"},
                "config": cfg | {"optim": cfg["optim"] | {"seed": seed}}}))
    (root / "trials.json").write_text(json.dumps(status))


def test_study_tables_bold_only_after_holm_and_say_the_family(tmp_path):
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 30, 300) for _ in range(3)]
    strong = [r.copy() for r in base]
    for r in strong:
        r[:120] = 0                                     # 40% of users get their target first: a clear gain
    _write_study(tmp_path, {"base": base, "strong": strong, "same": [r.copy() for r in base],
                            "single": [base[0].copy(), None, None], "pending": [None, None, None]})
    rows = tabulate(tmp_path, n_boot=400)
    by = {r["setting"]: r for r in rows}
    # The family: 3 settings with a comparison (pending has none) x 3 metrics
    family = [(r["setting"], m) for r in rows for m in METRICS if math.isfinite(r[f"{m}_holm_p"])]
    assert len(family) == 9 and {s for s, _ in family} == {"strong", "same", "single"}
    raw = [by[s][f"{m}_p_two_sided"] for s, m in family]
    assert [by[s][f"{m}_holm_p"] for s, m in family] == pytest.approx(holm(raw))
    assert all(by["strong"][f"{m}_holm_excludes_0"] for m in METRICS)
    others = ("same", "single", "pending", "base")
    assert not any(by[s][f"{m}_holm_excludes_0"] for s in others for m in METRICS)
    assert by["same"]["ndcg@5_p_two_sided"] == 1.0                   # identical runs
    # Seed level: 3 paired seeds give both intervals, 1 seed says why there is none
    assert by["strong"]["ndcg@5_seed_t_unit"] == "seeds (t)" and by["strong"]["ndcg@5_seed_t_low"] > 0
    assert by["strong"]["ndcg@5_seed_hier_unit"] == "seeds then users (hierarchical bootstrap)"
    assert by["single"]["ndcg@5_seed_t_note"] == "1 seed: no seed-level interval"
    saved = {r["setting"]: r for r in csv.DictReader((tmp_path / "study.csv").read_text().splitlines())}
    assert saved["strong"]["mrr@10_holm_excludes_0"] == "True" and saved["pending"]["mrr@10_holm_p"] == ""
    assert float(saved["same"]["ndcg@10_holm_p"]) == pytest.approx(by["same"]["ndcg@10_holm_p"])
    md = (tmp_path / "study.md").read_text()
    strong_line = next(line for line in md.splitlines() if line.startswith("| strong "))
    assert "| **+0." in strong_line and "Holm p=0.000" in strong_line
    assert not any("**" in line for line in md.splitlines() if line.startswith(("| same ", "| single ")))
    assert "| 1 seed: no seed-level interval |" in md
    assert "(3 settings x 3 metrics: NDCG@5, NDCG@10, MRR@10; 9 comparisons)" in md
    assert "Excluding 0 after Holm: strong NDCG@5 (Holm p=0.000); strong NDCG@10" in md
    plan = json.loads((tmp_path / "study_plan.json").read_text())
    assert plot_differences(tmp_path, plan, rows).is_file()
    assert holm_marks(rows, ["strong", "same", "single"]) == {m: [True, False, False] for m in METRICS}
