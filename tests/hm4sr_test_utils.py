"""Small shared test helpers (a uniquely named module: several conftest.py files exist)."""

from hm4sr_dist.config import ExperimentConfig


def tiny_config(**model_overrides) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model.hidden_size = 8
    cfg.model.inner_size = 16
    cfg.model.max_seq_len = 12
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    return cfg.validate()
