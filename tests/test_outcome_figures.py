"""The outcome-figure script reads RecBole's validation curve from the reference tool's output."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "outcome_figures.py"
spec = importlib.util.spec_from_file_location("outcome_figures", SCRIPT)
outcome_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outcome_figures)

LOG = """recbole: n_users=22363 n_items=12101
epoch 0: 329.96s 129 batches 131413 samples 398.3 seq/s loss_sum=1159.6420
epoch 0 valid: NDCG@5=0.0066 NDCG@10=0.0095 MRR@5=0.0052 Hit@10=0.0197
epoch 1: 301.00s 129 batches 131413 samples 436.6 seq/s loss_sum=1100.0
epoch 1 valid: NDCG@5=0.0129 NDCG@10=0.0171 MRR@5=0.0105 Hit@10=0.0332
valid: eval_s=20.00 NDCG@5=0.0200 NDCG@10=0.0300
"""


def test_reads_the_validation_curve_per_epoch_in_our_metric_spelling(tmp_path):
    log = tmp_path / "recbole.log"
    log.write_text(LOG)
    assert outcome_figures.read_recbole_curve(log, "valid/ndcg@5") == [0.0066, 0.0129]
    assert outcome_figures.read_recbole_curve(log, "valid/mrr@5") == [0.0052, 0.0105]


def test_a_log_without_the_metric_or_with_a_gap_is_refused_naming_the_file(tmp_path):
    log = tmp_path / "recbole.log"
    log.write_text(LOG)
    with pytest.raises(SystemExit, match=r"recbole.log:3: no mrr@10"):
        outcome_figures.read_recbole_curve(log, "valid/mrr@10")
    log.write_text(LOG.replace("epoch 0 valid", "epoch 2 valid"))
    with pytest.raises(SystemExit, match=r"missing for epochs \[0\]"):
        outcome_figures.read_recbole_curve(log)
    log.write_text("epoch 0: 3s\n")
    with pytest.raises(SystemExit, match="--valid-every-epoch"):
        outcome_figures.read_recbole_curve(log)
