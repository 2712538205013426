"""Shared tiny fixtures: a generated log and a small model configuration."""

import pytest
import torch

from hm4sr_dist.config import ExperimentConfig
from hm4sr_dist.synthetic import collate, generate_log, split_samples


def tiny_config(**model_overrides) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.hidden_size = 8
    cfg.model.inner_size = 16
    cfg.model.max_seq_len = 12
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    return cfg.validate()


@pytest.fixture(scope="session")
def tiny_log():
    return generate_log(n_users=24, n_clusters=3, items_per_cluster=5, min_len=6, max_len=14,
                        text_width=6, image_width=5, seed=3)


@pytest.fixture
def tiny_batch(tiny_log):
    samples = split_samples(tiny_log, max_len=12)["train"][:9]
    return collate(samples, max_len=12)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
