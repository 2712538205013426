"""HM4SR: hierarchical time-aware mixture of experts for multi-modal sequential recommendation.

Plain PyTorch, no distributed code. The pipeline per batch (paper §4):

    items  x_m            ItemEmbedding                       eq. 2-5
    e_m = x_m + p         shared position table               eq. 6
    e'_m                  InteractiveMoE  (switch: -IMoE)     eq. 7-10
    S_m = split(x_temp)   TemporalMoE     (switch: -TMoE)     eq. 11-16
    H^m                   SequenceEncoder per modality        eq. 17-18
    y_v = sum_m H^m . x_m(v)                                  eq. 19
    PCL view H^{m,1}      placeholder replaces beta of the positions  eq. 24

Any non-empty subset of {id, text, image} works; the SASRec baseline is modalities=[id] with both
MoEs off. Per-modality vectors are kept concatenated, (..., M*d), in `cfg.modalities` order, so the
sum of eq. 19 is one matmul and one (B, n_items + 1) score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm4sr_dist.batch import Batch
from hm4sr_dist.config import ModelConfig
from hm4sr_dist.feasibility import CONTENT_MODALITIES, unresolved
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.encoder import SequenceEncoder
from hm4sr_dist.model.items import ItemEmbedding
from hm4sr_dist.model.moe import InteractiveMoE, TemporalMoE
from hm4sr_dist.model.time import TimeEmbedding

PCL_MODALITIES = CONTENT_MODALITIES   # eq. 26: PCL runs on the content modalities only


@dataclass
class HM4SROutput:
    """What the losses and the monitors need from one forward pass."""

    seq_repr: Tensor                  # (B, M*d)  [H^id; H^txt; H^img]
    item_repr: Tensor                 # (n_items + 1, M*d)  [x_id; x_txt; x_img] of every item
                                      # (of the worker's slice under vocabulary parallelism;
                                      # of the batch's items only under loss.main_loss=sampled)
    pcl_repr: dict[str, Tensor] = field(default_factory=dict)   # m -> (B, d), H^{m,1} (eq. 24)
    cp_logits: Tensor | None = None   # (B, L, C) eq. 21 at every input position (CP reads the
                                      # real ones, `real`: a mask, not boolean indexing, keeps
                                      # the step free of data-dependent shapes)
    cp_items: Tensor | None = None    # (B, L) the item at each of those positions
    interactive_gates: Tensor | None = None   # (B, L, M, k1) g^m of eq. 9
    temporal_gates: Tensor | None = None      # (B, L, k2) g' of eq. 14
    real: Tensor | None = None                # (B, L) bool, real (non-padding) positions

    def modality(self, tensor: Tensor, index: int, d: int) -> Tensor:
        return tensor[..., index * d:(index + 1) * d]


def placeholder_mask(real: Tensor, seq_len: Tensor, ratio: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """(B, L) bool: floor(ratio * len) distinct random real positions per row, as tensor ops."""
    noise = torch.rand(real.shape, generator=generator, device=real.device)
    noise = noise.masked_fill(~real, 2.0)                       # padding sorts after every real slot
    rank = noise.argsort(dim=1).argsort(dim=1)                  # rank of each slot in its row
    n_replace = torch.floor(seq_len.double() * ratio + 1e-9).long()   # guard 0.3*10 -> 2.999...
    return rank < n_replace.unsqueeze(1)


class HM4SR(nn.Module):
    """The recommender. `forward(batch)` returns an `HM4SROutput`; losses live in `hm4sr_dist.losses`.

    Args:
        cfg: architecture switches and sizes.
        catalog: the frozen item tables and time statistics of the data set.
        category_head: build the CP head (eq. 21); needs `catalog.categories`.
        pcl_ratio: beta of PCL; builds the time-placeholder projections W_{P,m} (eq. 24).
            None = no PCL view.
        item_rows: (start, stop) to hold only those rows of the item table (a vocabulary-parallel
            worker, `ItemEmbedding`): the ID rows are then handed to `item_representations`, the
            lookup of the input items to `forward`, and `scores` does not apply.
    """

    def __init__(self, cfg: ModelConfig, catalog: ItemCatalog, category_head: bool = False,
                 pcl_ratio: float | None = None, item_rows: tuple[int, int] | None = None):
        super().__init__()
        catalog.validate()
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        self.n_items = catalog.n_items
        d, m = cfg.hidden_size, len(self.modalities)
        self.d = d
        self.items = ItemEmbedding(cfg, catalog, rows=item_rows)
        self.position = nn.Embedding(cfg.max_seq_len, d)
        self.interactive_moe = None
        if cfg.use_interactive_moe:
            alpha = [cfg.alpha_init_id if mod == "id" else cfg.alpha_init_content for mod in self.modalities]
            self.interactive_moe = InteractiveMoE(m, d, cfg.n_interactive_experts, alpha, cfg.initializer_range)
        self.time_embedding = self.temporal_moe = None
        if cfg.use_temporal_moe:
            self.time_embedding = TimeEmbedding(cfg, catalog)
            self.temporal_moe = TemporalMoE(m * d, self.time_embedding.width, cfg.n_temporal_experts,
                                            cfg.temporal_expert_init_std)
        self.encoders = nn.ModuleDict({mod: SequenceEncoder(cfg) for mod in self.modalities})
        pcl = pcl_ratio is not None
        self.pcl_ratio = pcl_ratio
        self.pcl_modalities = [mod for mod in self.modalities if mod in PCL_MODALITIES] if pcl else []
        if pcl and not (cfg.use_temporal_moe and self.pcl_modalities):
            raise unresolved("loss.pcl_weight", "needs model.use_temporal_moe and a text or image "
                             "modality (PCL's placeholder is built from the Temporal MoE's time "
                             "embeddings, eq. 24)")
        self.placeholders = nn.ModuleDict({mod: nn.Linear(self.time_embedding.width, d)
                                           for mod in self.pcl_modalities})
        self.cp_head = None
        if category_head:
            if catalog.n_categories == 0:
                raise unresolved("loss.cp_weight", "but the data set has no item categories")
            self.cp_head = nn.Linear(m * d, catalog.n_categories)
        self._init_weights()

    def _init_weights(self) -> None:
        # RecBole's scheme: N(0, 0.02) for linear and embedding weights, zero biases. The MoE
        # parameters that are not nn.Linear keep the initialisation their modules gave them.
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():                    # padding rows (ID table, day tables) start at zero
            for module in self.modules():
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()

    # -- the pieces ---------------------------------------------------------------------------
    def item_representations(self, id_rows: Tensor | None = None) -> Tensor:
        """(n_items + 1, M*d): eq. 2-5 for the whole catalogue (row 0 = padding); for a sliced
        table (`item_rows`), its rows, the ID part being `id_rows`."""
        return self.items(id_rows)

    def item_rows(self, ids: Tensor) -> Tensor:
        """`item_representations()[ids]` computing only those rows: ids.shape + (M*d,)."""
        return self.items.gather(ids)

    def scores(self, seq_repr: Tensor, item_repr: Tensor) -> Tensor:
        """Eq. 19 for every item: (B, n_items + 1); the padding column is -inf."""
        logits = seq_repr @ item_repr.T
        logits[:, 0] = float("-inf")
        return logits

    def forward(self, batch: Batch, augment: bool = False, item_repr: Tensor | None = None,
                categories: bool = False, lookup: Callable[[Tensor, Tensor], Tensor] | None = None
                ) -> HM4SROutput:
        """Encode `batch`. `augment` adds the PCL view, `categories` the CP logits (the objective asks
        for both, in train and eval mode alike); pass `item_repr` to reuse it. `lookup(ids, item_repr)`
        gives the input items' rows (default `F.embedding`; a vocabulary-parallel worker's looks them
        up in every worker's slice)."""
        items = self.item_representations() if item_repr is None else item_repr
        b, length = batch.item_seq.shape
        m, d = len(self.modalities), self.d
        real = batch.padding_mask()                                              # (B, L)
        x = (lookup or F.embedding)(batch.item_seq, items)                       # (B, L, M*d)
        e = x.view(b, length, m, d) + self.position.weight[:length].unsqueeze(1)  # eq. 6, shared p
        out = HM4SROutput(seq_repr=items.new_empty(0), item_repr=items, real=real)
        if self.interactive_moe is not None:
            e, out.interactive_gates = self.interactive_moe(e)                   # eq. 7-10
        seq = e.reshape(b, length, m * d)
        time = None
        if self.temporal_moe is not None:
            time = self.time_embedding(batch.time_seq, real)                     # eq. 11-13
            seq, out.temporal_gates = self.temporal_moe(seq, time)               # eq. 14-16
        seq = seq.view(b, length, m, d)
        out.seq_repr = torch.cat([self.encoders[mod](seq[:, :, i], batch.seq_len)  # eq. 17-18
                                  for i, mod in enumerate(self.modalities)], dim=-1)
        if augment and self.pcl_modalities:
            replace = placeholder_mask(real, batch.seq_len, self.pcl_ratio).unsqueeze(-1)
            for mod in self.pcl_modalities:
                i = self.modalities.index(mod)
                augmented = torch.where(replace, self.placeholders[mod](time), seq[:, :, i])   # eq. 24
                out.pcl_repr[mod] = self.encoders[mod](augmented, batch.seq_len)
        if self.cp_head is not None and categories:
            out.cp_logits = self.cp_head(x)                                      # eq. 21
            out.cp_items = batch.item_seq
        return out

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
