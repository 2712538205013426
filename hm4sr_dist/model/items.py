"""Initial item representations, eq. 2-5.

`x_id` comes from a learned ID table; `x_txt = W_txt f_txt + b_txt` and `x_img = W_img f_img + b_img`
project frozen, precomputed encoder features (BERT / ViT [CLS], eq. 2-3) to the hidden size d.

The frozen tables grow with the catalogue (10^7 items x 768 = 15 GB in float16) and are usually
memory-mapped files (`hm4sr_dist.data.load_catalog`). They are therefore held in a `FrozenFeatures`,
deliberately *not* a buffer: a buffer is copied by `.to()`, cast by `.half()`/DeepSpeed's mixed
precision, deep-copied by `copy.deepcopy` and could be broadcast or checkpointed. The projection
reads the table block by block, upcasting each block (fp16 -> fp32) on the weight's device, and
recomputes the blocks in backward instead of saving them (`_FrozenProjection`).

`ItemEmbedding.gather(ids)` computes the same rows for some items only (the sampled main loss,
loss.main_loss=sampled, needs the batch's items and its negatives, not the catalogue): ID rows
gathered from the ID table, content rows projected from the gathered frozen rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hm4sr_dist.config import ModelConfig
from hm4sr_dist.model.catalog import ItemCatalog
from hm4sr_dist.model.feature_file import open_feature_table

BLOCK_ROWS = 16384   # rows upcast at a time: 16384 x 768 x 4 B = 48 MiB of fp32 at most


class FrozenFeatures:
    """A frozen (n_items + 1, w) feature table kept outside the module's parameters and buffers.

    `table` stays where it is (CPU memory or a read-only memory-mapped file, float16/32); blocks
    are upcast on demand. `source` is the file behind a mapped table (None when in memory).
    Copying the owning module (`copy.deepcopy`, e.g. the fp32 evaluation copy) shares the table;
    pickling a mapped table sends its path and the receiver maps the same file again.
    `window` = (start, stop, rows of the file) when `table` is only rows start..stop-1 of `source`
    (`rows`: a vocabulary-parallel worker's slice).

    On a GPU the table is copied there once, in its own (narrow) dtype, and read from that copy:
    otherwise every forward and backward pass would copy it across the bus again (twice the table
    per step). Only when it fits: at most `DEVICE_COPY_SHARE` of the GPU's free memory at that
    moment (and `DEVICE_COPY_BYTES`); a larger table streams block by block, as on the CPU. The
    copy is made when the owning module moves to the GPU (`ItemEmbedding._apply`), not inside a
    (possibly compiled) forward.
    """

    DEVICE_COPY_BYTES = 16 << 30
    DEVICE_COPY_SHARE = 0.25

    def __init__(self, table: Tensor, source: str | None = None, block_rows: int = BLOCK_ROWS,
                 window: tuple[int, int, int] | None = None):
        if table.dim() != 2 or not torch.is_floating_point(table):
            raise ValueError(f"frozen features must be a 2-D float table, got {table.dtype} "
                             f"{tuple(table.shape)}" + (f" ({source})" if source else ""))
        self.table = table.detach()
        self.source = source
        self.block_rows = int(block_rows)
        self.window = window
        self._copies: dict[torch.device, Tensor] = {}     # device -> the table there

    def on(self, device) -> Tensor:
        """The table where it is read from for `device`: itself on the CPU (and when too large
        to copy), else its copy there, made on first use."""
        device = torch.device(device)
        if device.type == "cpu" or self.table.device == device:
            return self.table
        if device not in self._copies:
            limit = self.DEVICE_COPY_BYTES
            if device.type == "cuda" and torch.cuda.is_available():
                limit = min(limit, int(torch.cuda.mem_get_info(device)[0] * self.DEVICE_COPY_SHARE))
            if self.table.numel() * self.table.element_size() > limit:
                return self.table
            self._copies[device] = self.table.to(device)
        return self._copies[device]

    def rows(self, start: int, stop: int) -> "FrozenFeatures":
        """Rows start..stop-1 as a FrozenFeatures of their own: a view of the table (a mapped file
        stays mapped, nothing is read or copied)."""
        offset, total = (self.window[0], self.window[2]) if self.window else (0, self.table.shape[0])
        return FrozenFeatures(self.table[start:stop], self.source, self.block_rows,
                              (offset + start, offset + stop, total))

    @property
    def shape(self) -> torch.Size:
        return self.table.shape

    def blocks(self):
        """(start, stop) row ranges of at most `block_rows` rows."""
        n = self.table.shape[0]
        step = max(1, self.block_rows)
        return ((s, min(s + step, n)) for s in range(0, n, step))

    def block(self, start: int, stop: int, device, dtype: torch.dtype) -> Tensor:
        """Rows start..stop-1 as a (stop - start, w) tensor of `dtype` on `device`: a copy, or a
        view of the table when it already has that dtype and device (callers only read it)."""
        part = self.on(device)[start:stop]
        if part.device != torch.device(device):
            part = part.to(device)         # copy the narrow dtype, upcast where it is used
        return part.to(dtype)

    def gather(self, ids: Tensor, device, dtype: torch.dtype) -> Tensor:
        """Rows `ids` (k,) as a (k, w) tensor of `dtype` on `device`; only those rows are read."""
        table = self.on(device)
        part = table[ids.to(table.device)]
        return part.to(device).to(dtype)

    def __deepcopy__(self, memo) -> "FrozenFeatures":
        return self                        # frozen: a copied module reads the same table

    def __reduce__(self):
        if self.source is not None:
            return (_remap, (self.source, tuple(self.table.shape), str(self.table.dtype), self.block_rows,
                             self.window))
        return (FrozenFeatures, (self.table, None, self.block_rows, self.window))


def _remap(source: str, shape: tuple, dtype: str, block_rows: int,
           window: tuple[int, int, int] | None = None) -> FrozenFeatures:
    table = open_feature_table(source, rows=window[2] if window else shape[0], width=shape[1])
    if str(table.dtype) != dtype:
        raise ValueError(f"{source}: the file changed since it was mapped ({table.dtype}, was {dtype})")
    if window:
        table = table[window[0]:window[1]]
    return FrozenFeatures(table, source, block_rows, window)


class _FrozenProjection(torch.autograd.Function):
    """x = f W^T + b over a frozen table f, block by block; no (n, w) upcast copy is ever whole.

    Computed in fp32 (fp64 for fp64 weights) whatever the table's and weights' dtype, also under
    bf16 autocast (`custom_fwd` casts the weights to fp32 and turns autocast off inside), returned
    in the weights' dtype. Backward recomputes each block: dW = sum_blocks g_block^T f_block,
    db = sum g.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, weight: Tensor, bias: Tensor, frozen: FrozenFeatures) -> Tensor:
        acc = torch.promote_types(weight.dtype, torch.float32)
        w, b = weight.to(acc), bias.to(acc)
        out = weight.new_empty(frozen.shape[0], weight.shape[0])
        for start, stop in frozen.blocks():
            out[start:stop] = torch.addmm(b, frozen.block(start, stop, weight.device, acc), w.T)
        ctx.frozen = frozen
        ctx.dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: Tensor):
        frozen, (w_dtype, b_dtype) = ctx.frozen, ctx.dtypes
        acc = torch.promote_types(w_dtype, torch.float32)
        grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_w = grad_out.new_zeros(grad_out.shape[1], frozen.shape[1], dtype=acc)
            for start, stop in frozen.blocks():
                grad_w.addmm_(grad_out[start:stop].to(acc).T, frozen.block(start, stop, grad_out.device, acc))
            grad_w = grad_w.to(w_dtype)
        if ctx.needs_input_grad[1]:
            grad_b = grad_out.to(acc).sum(0).to(b_dtype)
        return grad_w, grad_b, None


def project_frozen(frozen: FrozenFeatures, linear: nn.Linear) -> Tensor:
    """`linear(frozen.table)` for every row, without materialising an upcast copy of the table."""
    return _FrozenProjection.apply(linear.weight, linear.bias, frozen)


def project_frozen_rows(frozen: FrozenFeatures, linear: nn.Linear, ids: Tensor) -> Tensor:
    """`project_frozen(frozen, linear)[ids]` without projecting the other rows: (k,) -> (k, d),
    computed as `_FrozenProjection` computes each row (fp32 or wider, returned in the weight's dtype)."""
    weight, bias = linear.weight, linear.bias
    acc = torch.promote_types(weight.dtype, torch.float32)
    rows = frozen.gather(ids, weight.device, acc)                                   # (k, w)
    with torch.autocast(weight.device.type, enabled=False):                        # fp32 under bf16 too
        return torch.addmm(bias.to(acc), rows, weight.to(acc).T).to(weight.dtype)


class ItemEmbedding(nn.Module):
    """Per-modality item vectors for the whole catalogue, or for the rows [start, stop) of it.

    `forward()` returns a (n_items + 1, M * d) table, modalities concatenated in `cfg.modalities`
    order: the concatenation is what eq. 19 scores against (one matmul sums the per-modality
    scores) and what CP (eq. 21) and the Interactive MoE (eq. 7) take per item. With one modality
    nothing is concatenated: for the ID-only (SASRec) setting the result is the ID table's weight
    itself, so no second (n_items + 1, d) table and gradient exist.

    `features[m]` holds modality m's frozen table (`FrozenFeatures`): not a parameter, not a
    buffer, so it is not in `state_dict()`, not moved by `.to()`, not cast to half precision and
    not seen by DeepSpeed.

    `rows=(start, stop)` builds the slice a vocabulary-parallel worker holds (docs/scaling.md,
    "Vocabulary-parallel"): `forward(id_rows)` returns the (stop - start, M * d) rows
    start..stop-1, the content features are kept as views of those rows only, and the projections
    W_m, b_m stay whole (replicated). The slice's ID rows are NOT a parameter of this module: they
    are handed to `forward` (`id_rows`, (stop - start, d)), because they must stay outside the
    module a data-parallel engine wraps (it would broadcast and average them); the distributed
    layer holds them (`hm4sr_dist.parallel.vocab.ItemTableShard`).
    """

    def __init__(self, cfg: ModelConfig, catalog: ItemCatalog, rows: tuple[int, int] | None = None):
        super().__init__()
        self.modalities = list(cfg.modalities)
        d = cfg.hidden_size
        if rows is not None and not 0 <= rows[0] <= rows[1] <= catalog.n_items + 1:
            raise ValueError(f"rows {rows} outside the table's {catalog.n_items + 1} rows")
        self.rows = None if rows is None else (int(rows[0]), int(rows[1]))
        self.projections = nn.ModuleDict()
        self.features: dict[str, FrozenFeatures] = {}
        for m in self.modalities:
            if m == "id":
                if self.rows is None:
                    self.id_table = nn.Embedding(catalog.n_items + 1, d, padding_idx=0)
                continue
            table = catalog.feature_table(m)
            if table is None:
                raise ValueError(f"model.modalities includes {m!r} but the data set has no {m} "
                                 f"features; drop it from model.modalities")
            frozen = FrozenFeatures(table, catalog.feature_files.get(m))
            self.features[m] = frozen if self.rows is None else frozen.rows(*self.rows)
            self.projections[m] = nn.Linear(table.shape[1], d)

    def _apply(self, fn, *args, **kwargs):
        """`.to(device)` and friends: the frozen tables follow to the parameters' device (a copy
        there, `FrozenFeatures.on`), before any forward reads them."""
        out = super()._apply(fn, *args, **kwargs)
        device = next((p.device for p in self.projections.parameters()), None)
        if device is not None:
            for frozen in self.features.values():
                frozen.on(device)
        return out

    def forward(self, id_rows: Tensor | None = None) -> Tensor:
        """(n_items + 1, M * d): [x_id; x_txt; x_img] for every item (row 0 = padding); with `rows`,
        the (stop - start, M * d) rows of the slice, whose ID part is `id_rows`."""
        if (id_rows is not None) != (self.rows is not None and "id" in self.modalities):
            raise ValueError("ItemEmbedding: the ID rows are handed in exactly when the table is "
                             f"sliced (rows={self.rows}) and has the id modality")
        if id_rows is not None and id_rows.shape[0] != self.rows[1] - self.rows[0]:
            raise ValueError(f"id_rows: {id_rows.shape[0]} rows for the slice {self.rows}")
        parts = []
        for m in self.modalities:
            if m == "id":
                parts.append(self.id_table.weight if id_rows is None else id_rows)
            else:
                parts.append(project_frozen(self.features[m], self.projections[m]))   # eq. 2-3
        if len(parts) == 1:
            return parts[0]            # torch.cat would copy even a single table (and its gradient)
        return torch.cat(parts, dim=-1)

    def gather(self, ids: Tensor) -> Tensor:
        """`forward()[ids]`, computing only the rows of `ids` (any shape, duplicates allowed: each
        distinct item is computed once): ids.shape + (M * d,). Whole (unsliced) tables only."""
        if self.rows is not None:
            raise ValueError(f"ItemEmbedding.gather: a sliced table (rows={self.rows}) is looked "
                             "up through its ItemTable")
        unique, inverse = ids.reshape(-1).unique(return_inverse=True)     # sorted distinct items
        parts = []
        for m in self.modalities:
            if m == "id":
                parts.append(F.embedding(unique, self.id_table.weight))    # no padding_idx: as forward()
            else:
                parts.append(project_frozen_rows(self.features[m], self.projections[m], unique))
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)   # (k, M*d)
        return rows[inverse].view(*ids.shape, rows.shape[-1])
