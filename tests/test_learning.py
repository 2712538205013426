"""End to end on a generated log with a learnable, time-dependent next-item rule: the training loss
falls and NDCG@10 rises far above chance, for HM4SR and for the SASRec setting."""

import math

import pytest
from hm4sr_test_utils import tiny_config

from hm4sr_dist.feasibility import with_variant
from hm4sr_dist.metrics import random_ranking_ndcg
from hm4sr_dist.synthetic import batches, generate_log, log_samples
from hm4sr_dist.train.loop import fit_in_process


@pytest.mark.parametrize("variant", ["hm4sr", "sasrec"])
def test_training_learns_the_rule(variant):
    log = generate_log(n_users=100, n_clusters=6, items_per_cluster=10, min_len=8, max_len=20, seed=7)
    samples = {split: log_samples(log, split) for split in ("train", "valid")}
    cfg = with_variant(tiny_config(hidden_size=32, inner_size=64, max_seq_len=20,
                                    hidden_dropout=0.1, attn_dropout=0.1), variant)
    cfg.optim.lr = 3e-3
    _, history = fit_in_process(cfg, log.catalog, lambda e: batches(samples["train"], 64, 20, True, seed=e),
                                batches(samples["valid"], 256, 20), epochs=5, log=lambda _: None)
    # Cross-entropy starts at log(n_items) (uniform scores) and must fall well below it.
    assert history[-1]["main"] < history[0]["main"]
    assert history[-1]["main"] < 0.5 * math.log(log.catalog.n_items), history
    chance = random_ranking_ndcg(10, log.catalog.n_items)
    assert history[-1]["valid/ndcg@10"] > 5 * chance, (history[-1], chance)
