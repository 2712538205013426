"""Initial item representations, eq. 2-5.

`x_id` comes from a learned ID table; `x_txt = W_txt f_txt + b_txt` and `x_img = W_img f_img + b_img`
project frozen, precomputed encoder features (BERT / ViT [CLS], eq. 2-3) to the hidden size d.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hm4sr_dist.config import ModelConfig
from hm4sr_dist.model.catalog import ItemCatalog


class ItemEmbedding(nn.Module):
    """Per-modality item vectors for the whole catalogue.

    `forward()` returns a (n_items + 1, M * d) table, modalities concatenated in `cfg.modalities`
    order: the concatenation is what eq. 19 scores against (one matmul sums the per-modality
    scores) and what CP (eq. 21) and the Interactive MoE (eq. 7) take per item.
    """

    def __init__(self, cfg: ModelConfig, catalog: ItemCatalog):
        super().__init__()
        self.modalities = list(cfg.modalities)
        d = cfg.hidden_size
        self.projections = nn.ModuleDict()
        for m in self.modalities:
            if m == "id":
                self.id_table = nn.Embedding(catalog.n_items + 1, d, padding_idx=0)
                continue
            table = catalog.feature_table(m)
            if table is None:
                raise ValueError(f"model.modalities includes {m!r} but the data set has no {m} "
                                 f"features; drop it from model.modalities")
            # Frozen (eq. 2-3) and item-sized: a buffer every worker holds, kept out of checkpoints.
            self.register_buffer(f"{m}_features", table.detach().float(), persistent=False)
            self.projections[m] = nn.Linear(table.shape[1], d)

    def forward(self) -> Tensor:
        """(n_items + 1, M * d): [x_id; x_txt; x_img] for every item (row 0 = padding)."""
        parts = []
        for m in self.modalities:
            if m == "id":
                parts.append(self.id_table.weight)
            else:
                parts.append(self.projections[m](getattr(self, f"{m}_features")))
        return torch.cat(parts, dim=-1)
