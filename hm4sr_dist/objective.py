"""The training objective: HM4SR forward + every loss term, in one module's forward.

DeepSpeed (and DDP) must see the whole graph through the engine's own forward, so the losses are
computed inside `HM4SRObjective.forward`. Cross-worker communication is handed in as a
`BatchExchange`, and where the item table lives as an `ItemTable`; the local ones below are the
identity (every row on this process), so this file stays free of torch.distributed. Under
`loss.main_loss=vocab_parallel` the table is `hm4sr_dist.parallel.vocab.ShardedItemTable`: the
model holds a slice of the table, its ID rows are handed to `forward`, and the input items, IDCL's
targets (eq. 23) and eq. 20 are computed across the workers' slices. Under
`loss.main_loss=sampled` the table is `GatheredRows`: only the rows of the batch's items and of
eq. 20's negatives are computed (the same loss and gradients as the whole table's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm4sr_dist.batch import Batch
from hm4sr_dist.catalog_loss import build_main_loss
from hm4sr_dist.config import ConfigError, LossConfig
from hm4sr_dist.feasibility import unresolved
from hm4sr_dist.losses import category_count, category_loss, info_nce, main_loss, weighted_total
from hm4sr_dist.metrics import target_ranks
from hm4sr_dist.model.hm4sr import HM4SR, HM4SROutput


class BatchExchange:
    """How rows of the global batch are shared. This one is a single process: the identity.

    A distributed implementation (hm4sr_dist/parallel) concatenates every rank's rows with an
    autograd-aware all-gather, rank-major, and sums counts across ranks.
    """

    rank: int = 0
    world_size: int = 1

    def all_gather(self, tensor: Tensor) -> Tensor:
        """(b, ...) on each rank -> (world_size * b, ...), gradients flowing back to the owner."""
        return tensor

    def all_sum(self, tensor: Tensor) -> Tensor:
        """A count summed over ranks (no gradient)."""
        return tensor


class ItemTable:
    """Where the rows of the item table live. This one: every row on this process.

    The sharded implementation (`hm4sr_dist.parallel.vocab.ShardedItemTable`) holds rows
    [start, stop) on each worker and answers the same three questions with collectives.
    """

    sharded: bool = False
    start: int = 0
    stop: int | None = None          # None: the whole table

    def lookup(self, ids: Tensor, items: Tensor) -> Tensor:
        """ids (b, ...) of this worker's rows -> their table rows (b, ..., D)."""
        return F.embedding(ids, items)

    def main_loss(self, seq_repr: Tensor, items: Tensor, target: Tensor) -> Tensor:
        """Eq. 20, the mean over this worker's rows."""
        raise NotImplementedError("the whole table's eq. 20 is loss.main_loss=full/chunked/sampled")

    def target_ranks(self, seq_repr: Tensor, items: Tensor, target: Tensor, chunk_size: int = 0) -> Tensor:
        """(b,) full-ranking rank of each row's target (`metrics.target_ranks`)."""
        return target_ranks(seq_repr, items, target, chunk_size)


class GatheredRows(ItemTable):
    """Some rows of the table, computed for one step: `ids` (k,) the sorted distinct items they hold.

    `lookup(ids, rows)` finds each item's row in the (k, D) rows (every looked-up item must be in
    `ids`). Used by loss.main_loss=sampled, which reads the table at a few rows only.
    """

    def __init__(self, ids: Tensor):
        self.ids = ids

    def lookup(self, ids: Tensor, items: Tensor) -> Tensor:
        return F.embedding(torch.searchsorted(self.ids, ids), items)

    def target_ranks(self, seq_repr: Tensor, items: Tensor, target: Tensor, chunk_size: int = 0) -> Tensor:
        raise NotImplementedError("a full ranking needs every row (evaluate.py scores the whole table)")


@dataclass
class LossTerms:
    total: Tensor
    main: Tensor
    cp: Tensor | None = None
    idcl: Tensor | None = None
    pcl: Tensor | None = None
    output: HM4SROutput | None = None

    NAMES = ("total", "main", "cp", "idcl", "pcl")

    def detached(self) -> dict[str, Tensor]:
        """The present terms, detached and still on their device (no host read: the epoch sums
        them on the device, `hm4sr_dist.train.loop.EpochProgress`)."""
        return {n: getattr(self, n).detach() for n in self.NAMES if getattr(self, n) is not None}

    def scalars(self) -> dict[str, float]:
        """Their values on the host, for logging (one read of the device per call)."""
        values = self.detached()
        return dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist()))


class HM4SRObjective(nn.Module):
    """Wraps an `HM4SR` and computes L of eq. 27 for a batch.

    Args:
        model: the recommender.
        loss_cfg: weights and temperatures.
        categories: (n_items + 1, C) multi-hot table, needed when loss_cfg.cp_weight > 0.
        exchange: shares rows across workers for the IDCL/PCL negatives, the CP normaliser and
            the in-batch negatives of loss.main_loss=sampled.
        item_counts: (n_items + 1,) interactions per item, for loss.negative_sampler=popularity.
        table: where the item table's rows live; a `ShardedItemTable` exactly when
            loss.main_loss=vocab_parallel (the model then holds that worker's slice, and `forward`
            takes the slice's ID rows).
    """

    def __init__(self, model: HM4SR, loss_cfg: LossConfig, categories: Tensor | None = None,
                 exchange: BatchExchange | None = None, item_counts: Tensor | None = None,
                 table: ItemTable | None = None):
        super().__init__()
        self.model = model
        self.cfg = loss_cfg
        self.exchange = exchange or BatchExchange()
        self.table = table or ItemTable()
        vocab_parallel = getattr(loss_cfg, "main_loss", "full") == "vocab_parallel"
        if vocab_parallel != self.table.sharded:
            raise ConfigError(key="loss.main_loss", expected="vocab_parallel exactly when the item table "
                              "is sharded (hm4sr_dist.parallel.vocab.ShardedItemTable)",
                              got=loss_cfg.main_loss)
        if self.table.sharded and model.items.rows != (self.table.start, self.table.stop):
            raise ValueError(f"the model holds item rows {model.items.rows}, the sharded table "
                             f"[{self.table.start}, {self.table.stop})")
        if loss_cfg.cp_weight > 0:
            if categories is None:
                raise unresolved("loss.cp_weight", "but the data set has no item categories")
            self.register_buffer("categories", categories.to(torch.bool), persistent=False)
        if "id" not in model.modalities and loss_cfg.idcl_weight > 0:
            raise unresolved("loss.idcl_weight", "needs the 'id' modality (IDCL contrasts H^id, eq. 23)")
        # eq. 20 over a large catalogue (loss.main_loss, docs/scaling.md); None = the full scores
        # (or, vocab_parallel, the sharded table's loss)
        self.catalog_loss = None if vocab_parallel else build_main_loss(loss_cfg, model.n_items, item_counts)
        # sampled: compute the item rows the step reads, not the catalogue (False: the whole table,
        # the same results; the reference of the tests)
        self.row_wise = getattr(loss_cfg, "main_loss", "full") == "sampled"
        self.compute_dtype: torch.dtype | None = None     # autocast dtype of the forward (None: off)

    def forward(self, batch: Batch, id_rows: Tensor | None = None) -> LossTerms:
        """L of eq. 27 for this worker's rows. `id_rows`: the ID rows of the worker's table slice
        (vocab_parallel only, where they are a parameter held outside this module).

        With `compute_dtype` (bf16, `train.precision`; set by `hm4sr_dist.train.acceleration`) the
        forward runs under autocast: matrix products in bf16, weights, gradients and every loss's
        log-sum-exp in fp32 (`hm4sr_dist.losses` upcasts)."""
        device_type = batch.item_seq.device.type
        with torch.autocast(device_type, dtype=self.compute_dtype or torch.float32,
                            enabled=self.compute_dtype is not None):
            return self._terms(batch, id_rows)

    def _terms(self, batch: Batch, id_rows: Tensor | None) -> LossTerms:
        model, cfg, ex, table = self.model, self.cfg, self.exchange, self.table
        if self.row_wise:                              # sampled: the batch's items' rows only
            table = GatheredRows(torch.cat([batch.item_seq.reshape(-1), batch.target]).unique())
            out = model(batch, augment=cfg.pcl_weight > 0, categories=cfg.cp_weight > 0,
                        item_repr=model.item_rows(table.ids), lookup=table.lookup)
            main = self.catalog_loss(out.seq_repr, None, batch.target, ex.all_gather,   # eq. 20
                                     rows=model.item_rows)
        elif table.sharded:
            out = model(batch, augment=cfg.pcl_weight > 0, categories=cfg.cp_weight > 0,
                        item_repr=model.item_representations(id_rows), lookup=table.lookup)
            main = table.main_loss(out.seq_repr, out.item_repr, batch.target)         # eq. 20
        else:
            out = model(batch, augment=cfg.pcl_weight > 0, categories=cfg.cp_weight > 0)
            if self.catalog_loss is None:                                           # eq. 20
                main = main_loss(model.scores(out.seq_repr, out.item_repr), batch.target)
            else:
                main = self.catalog_loss(out.seq_repr, out.item_repr, batch.target, ex.all_gather)
        terms = LossTerms(total=out.seq_repr.new_zeros(()), main=main, output=out)
        b = batch.target.shape[0]
        if cfg.idcl_weight > 0 or cfg.pcl_weight > 0:
            # Rank-major gather: this rank's rows sit at [rank*b, (rank+1)*b) of the global batch.
            positives = ex.rank * b + torch.arange(b, device=batch.target.device)
            all_targets = ex.all_gather(batch.target)
        if cfg.cp_weight > 0:
            labels = self.categories[out.cp_items]
            # Normalise by the GLOBAL count so that averaging over ranks gives the global mean.
            local = category_count(out.cp_logits, cfg.cp_reduction, out.real)
            terms.cp = category_loss(out.cp_logits, labels, ex.all_sum(local) / ex.world_size,
                                     mask=out.real)
        if cfg.idcl_weight > 0:
            d, i = model.d, model.modalities.index("id")
            h_id = out.seq_repr[:, i * d:(i + 1) * d]
            if table.sharded or self.row_wise:         # the target's row, where the table holds it
                x_target = table.lookup(batch.target, out.item_repr[:, i * d:(i + 1) * d])
            else:
                x_target = out.item_repr[batch.target, i * d:(i + 1) * d]
            terms.idcl = info_nce(h_id, ex.all_gather(x_target), positives, batch.target, all_targets,
                                  cfg.idcl_temperature)                            # eq. 23
        if cfg.pcl_weight > 0 and out.pcl_repr:
            per_modality = []
            for mod, augmented in out.pcl_repr.items():                            # eq. 25
                i = model.modalities.index(mod)
                h = out.seq_repr[:, i * model.d:(i + 1) * model.d]
                per_modality.append(info_nce(h, ex.all_gather(augmented), positives, batch.target,
                                             all_targets, cfg.pcl_temperature))
            terms.pcl = torch.stack(per_modality).mean()                            # eq. 26
        terms.total = weighted_total(terms.main, terms.cp, terms.idcl, terms.pcl,
                                     cfg.cp_weight, cfg.idcl_weight, cfg.pcl_weight)
        return terms


def build_objective(model_cfg, loss_cfg: LossConfig, catalog, exchange: BatchExchange | None = None,
                    table: ItemTable | None = None) -> HM4SRObjective:
    """The model and its objective for one data set, with the switches the loss weights imply;
    with a sharded `table`, the model holds that worker's rows of the item table."""
    rows = (table.start, table.stop) if table is not None and table.sharded else None
    model = HM4SR(model_cfg, catalog, category_head=loss_cfg.cp_weight > 0,
                  pcl_ratio=loss_cfg.pcl_ratio if loss_cfg.pcl_weight > 0 else None, item_rows=rows)
    return HM4SRObjective(model, loss_cfg, catalog.categories, exchange,
                          item_counts=getattr(catalog, "item_counts", None), table=table)
