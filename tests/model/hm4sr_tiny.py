"""Shared tiny set-up for tests/model (d=8, L=7, B=5, 9 items).

Plain functions in a module with a unique name, deliberately not a `conftest.py`: the other test
folders import their helpers with `from conftest import ...`, which a second conftest module in
this folder would shadow (pytest keeps only one module called `conftest` in sys.modules).
"""

from __future__ import annotations

import torch

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ExperimentConfig, ModelConfig
from hm4sr_dist.model import HM4SR, ItemCatalog
from hm4sr_dist.model.time import max_bucket_for

D = 8            # hidden size
L = 7            # padded sequence length (= max_seq_len)
N_ITEMS = 9
T0 = 1_700_000_000
TXT_W, IMG_W, N_CAT = 6, 5, 4


def tiny_model_cfg(**overrides) -> ModelConfig:
    cfg = ExperimentConfig()
    m = cfg.model
    m.hidden_size, m.inner_size, m.max_seq_len = D, 16, L
    m.n_layers, m.n_heads = 2, 2
    m.n_interactive_experts, m.n_temporal_experts = 3, 3      # k1 != M and k2 != 4: catches mix-ups
    m.hidden_dropout = m.attn_dropout = 0.1
    for key, value in overrides.items():
        setattr(m, key, value)
    cfg.validate()
    return m


def tiny_catalog(seed: int = 0) -> ItemCatalog:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(N_ITEMS + 1, TXT_W, generator=g)
    image = torch.randn(N_ITEMS + 1, IMG_W, generator=g)
    cats = torch.rand(N_ITEMS + 1, N_CAT, generator=g) < 0.4
    text[0] = image[0] = 0
    cats[0] = False
    return ItemCatalog(n_items=N_ITEMS, text_features=text, image_features=image, categories=cats,
                       max_interval_bucket=max_bucket_for(40 * 86400, 100.0),
                       time_origin=T0 - 3 * 86400, n_days=60)


def tiny_batch(seed: int = 0) -> Batch:
    """Right-padded, lengths 7, 3, 1, 5, 2; gaps from 0 s to weeks; padded slots hold 0."""
    g = torch.Generator().manual_seed(seed)
    seq_len = torch.tensor([7, 3, 1, 5, 2])
    b = len(seq_len)
    gaps = torch.tensor([0, 1, 59, 3600, 86400, 20 * 86400, 7])
    item_seq = torch.zeros(b, L, dtype=torch.long)
    time_seq = torch.zeros(b, L, dtype=torch.long)
    for row, n in enumerate(seq_len.tolist()):
        item_seq[row, :n] = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
        steps = gaps[torch.randperm(len(gaps), generator=g)[:n]]
        steps[0] = int(torch.randint(0, 86400, (1,), generator=g))
        time_seq[row, :n] = T0 + torch.cumsum(steps, 0)
    target = torch.randint(1, N_ITEMS + 1, (b,), generator=g)
    return Batch(item_seq, time_seq, seq_len, target)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter a generic random value (non-zero biases, non-unit LayerNorms), so that
    a wiring mistake cannot hide behind a zero or one initialisation. Padding rows are re-zeroed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
            if name.endswith("id_table.weight"):
                p[0].zero_()
    return module


def make_model(cfg: ModelConfig | None = None, category_head: bool = True, pcl_ratio: float | None = 0.3,
               seed: int = 0, randomize: bool = True, catalog: ItemCatalog | None = None) -> HM4SR:
    """An eval-mode HM4SR on the tiny catalogue; `randomize` gives every parameter a generic value."""
    torch.manual_seed(seed)
    model = HM4SR(cfg or tiny_model_cfg(), catalog or tiny_catalog(), category_head=category_head,
                  pcl_ratio=pcl_ratio)
    if randomize:
        randomize_(model, seed)
        if model.temporal_moe is not None:         # keep the element-wise experts near 1 (realistic)
            with torch.no_grad():
                model.temporal_moe.expert_weight.add_(1.0)
    return model.eval()
