"""Top-K recommendations for (raw item, unix time) histories, ranked as the evaluator ranks.

A history is a list of (raw item ID, unix seconds) pairs, oldest first. `Scorer.recommend` maps
the raw IDs to dense ones (items.parquet), builds the model's input with the data reader's own
`collate` (so a long history keeps its LAST `max_len` items, and the first kept item's interval
is 0, exactly as in training and evaluation), runs the eval-mode model, and ranks every real
item by eq. 19, `seq_repr @ item_repr.T`: the product `metrics.target_ranks` computes, with the
item representations computed once, when the scorer is built.

Ranking, the evaluator's and this one:
- the padding item 0 is never a candidate; history items are candidates unless
  `exclude_history=True` (then every item of the given history is removed, also those cut off
  by `max_len`);
- scores are eq. 19's, the same numbers the evaluator compares;
- ties: the evaluator counts a tie against the target (rank = number of other real items with
  score >= the target's). The list orders items by score, highest first, and equal scores by
  LOWER DENSE ID FIRST, a deterministic total order. So a target's 0-based position in an
  untruncated list equals its evaluator rank when no other item has exactly its score; with ties
  the position is at most the rank (equal when the target has the highest dense ID of its tie).

The catalogue is scored `item_chunk_size` items at a time and each block's top k merged into the
running top k (`chunked_topk`), so no (batch, n_items) score matrix exists for a large catalogue.

Time range (decided from `hm4sr_dist.model.time`): every time embedding is defined for any
timestamp. Intervals longer than any in training fall in the largest trained bucket (eq. 12 is
clamped to `max_interval_bucket`), the `day` index is clamped to the trained days, the cosines
of eq. 13 are bounded. Timestamps after the training data, the normal case when serving, and
before it are therefore accepted (`Scorer.time_range` says what the model was trained on). What
is refused is what the model's arithmetic cannot represent or would silently misread: a value
that is not whole unix seconds (an int), one outside [0, 9999-12-31T23:59:59Z], and a history
not oldest first (eq. 11 would clamp a negative interval to 0 without a word).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from hm4sr_dist.data.reader import collate
from hm4sr_dist.model.hm4sr import HM4SR
from hm4sr_dist.serving.export import ItemIdMap, LoadedExport, load_export

MAX_UNIX_SECONDS = 253_402_300_799      # 9999-12-31T23:59:59Z: the calendar's range (day_of_year)
DEFAULT_ITEM_CHUNK = 65_536             # (256 x 65536) fp32 scores = 64 MiB per block
DEFAULT_BATCH = 256


class ScoringError(ValueError):
    """A request the scorer refuses; names the field (e.g. `histories[2][0].item`) and its value."""

    def __init__(self, field: str, value: Any, problem: str):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field} = {value!r}: {problem}")


# -- ranking ------------------------------------------------------------------------------------

def _top_in_block(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best columns of each row of a block under (score desc, column asc). Returns (scores,
    columns), (B, k), columns ascending. `torch.topk`'s set is the answer unless a row has items
    tied at its k-th score left outside it (topk picks among ties arbitrarily): only those rows
    take the slower tie-ordered selection."""
    values, columns = scores.topk(k, dim=1, sorted=False)
    kth = values.min(dim=1, keepdim=True).values
    tied_outside = (scores == kth).sum(1) != (values == kth).sum(1)
    if bool(tied_outside.any()):
        rows = tied_outside.nonzero()[:, 0]
        values, columns = values.clone(), columns.clone()
        values[rows], columns[rows] = _top_in_block_with_ties(scores[rows], k)
    columns, order = columns.sort(dim=1)
    return values.gather(1, order), columns


def _top_in_block_with_ties(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`_top_in_block` for rows with ties at the k-th score: topk finds that score, then the
    ties AT it are taken lowest column first."""
    kth = scores.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values     # (B, 1)
    above, tied = scores > kth, scores == kth
    need = k - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= need))               # exactly k per row
    columns = take.nonzero()[:, 1].view(scores.shape[0], k)        # row-major: ascending per row
    return scores.gather(1, columns), columns


def _merge(best: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top k of two candidate lists under (score desc, id asc). Every id of `best` is below every
    id of `new` (blocks come in id order) and each list has its ties in id order, so a stable sort
    of the concatenation keeps ties lowest id first."""
    scores, ids = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def chunked_topk(seq_repr: Tensor, item_repr: Tensor, k: int, chunk_size: int = 0,
                 exclude: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(scores, dense ids), (B, k) each: every row's k best items by eq. 19, highest score first,
    equal scores lower id first; the padding item 0 and the `exclude` (rows, items) pairs are no
    candidates (scored -inf: the caller makes sure each row has >= k candidates).

    Items are scored `chunk_size` at a time (0 = all at once), as `metrics.target_ranks` scores
    them, so the largest block is (B, chunk_size)."""
    b, n_total = seq_repr.shape[0], item_repr.shape[0]
    chunk = n_total if chunk_size <= 0 else chunk_size
    best = (seq_repr.new_empty(b, 0), torch.empty(b, 0, dtype=torch.long, device=seq_repr.device))
    for start in range(0, n_total, chunk):
        stop = min(start + chunk, n_total)
        scores = seq_repr @ item_repr[start:stop].T                                    # (B, c)
        if torch.isnan(scores).any():
            raise ValueError(f"eq. 19 gave NaN scores for items {start}..{stop - 1}")
        if start == 0:
            scores[:, 0] = float("-inf")                                               # padding
        if exclude is not None:
            rows, items = exclude
            inside = (items >= start) & (items < stop)
            scores[rows[inside], items[inside] - start] = float("-inf")
        block = _top_in_block(scores, min(k, stop - start))
        best = _merge(best, (block[0], block[1] + start), k)
    return best


# -- the scorer -----------------------------------------------------------------------------------

class Scorer:
    """Top-K recommendations from an eval-mode `HM4SR` and its item ID map.

    Args:
        model: the model (not a vocabulary-parallel slice); put in eval mode, moved to `device`.
        id_map: raw <-> dense item IDs of the data the model was trained on.
        max_len: inputs kept per history (the run's `model.max_seq_len`, the default).
        item_chunk_size: items scored per block (0 = the whole catalogue at once).
        batch_size: histories encoded and ranked together.
        device: where to compute (default: where the model's parameters are).
        time_range: (first, last) training timestamp, for callers (`time_range`); not enforced.
    """

    def __init__(self, model: HM4SR, id_map: ItemIdMap, *, max_len: int | None = None,
                 item_chunk_size: int = DEFAULT_ITEM_CHUNK, batch_size: int = DEFAULT_BATCH,
                 device: torch.device | str | None = None, time_range: tuple[int, int] | None = None):
        if model.items.rows is not None:
            raise ValueError(f"Scorer: the model holds item rows {model.items.rows} only (a "
                             "vocabulary-parallel worker); load the whole model (hm4sr-export)")
        if id_map.n_items != model.n_items:
            raise ValueError(f"Scorer: the ID map has {id_map.n_items} items, the model {model.n_items}")
        self.max_len = int(max_len or model.cfg.max_seq_len)
        if not 1 <= self.max_len <= model.cfg.max_seq_len:
            raise ValueError(f"Scorer: max_len {self.max_len} outside 1..model.max_seq_len "
                             f"{model.cfg.max_seq_len} (the position table's size)")
        if item_chunk_size < 0 or batch_size < 1:
            raise ValueError(f"Scorer: item_chunk_size >= 0 and batch_size >= 1, got {item_chunk_size}, "
                             f"{batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.id_map = id_map
        self.item_chunk_size, self.batch_size = int(item_chunk_size), int(batch_size)
        self.time_range = time_range
        with torch.no_grad():
            self.item_repr = self.model.item_representations()              # once: eq. 2-5
        if not bool(torch.isfinite(self.item_repr).all()):
            raise ValueError("Scorer: the model's item representations are not finite")

    @classmethod
    def from_export(cls, export: LoadedExport | str | Path, device: torch.device | str = "cpu",
                    verify: bool = True, **kwargs) -> "Scorer":
        """A scorer of an export (a folder, loaded with `load_export`, or a `LoadedExport`)."""
        if not isinstance(export, LoadedExport):
            export = load_export(export, device=device, verify=verify)
        kwargs.setdefault("max_len", export.max_len)
        return cls(export.model, export.id_map, device=device, time_range=export.time_range, **kwargs)

    @property
    def n_items(self) -> int:
        return self.id_map.n_items

    # -- requests ---------------------------------------------------------------------------------
    def recommend(self, histories: Sequence, k: int, exclude_history: bool = False
                  ) -> list[tuple[list[str], list[float]]]:
        """For each history, its k best items as (raw item IDs, scores), best first (module
        docstring: the order, the ties, what `exclude_history` removes). Raises ScoringError for
        a bad request before any computation."""
        self._check_k(k)
        dense = self.dense_histories(histories)
        if exclude_history:
            self._check_candidates(dense, k)
        out: list[tuple[list[str], list[float]]] = []
        for start in range(0, len(dense), self.batch_size):
            part = dense[start:start + self.batch_size]
            scores, ids = self._top_k(part, k, exclude_history)
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist()):
                out.append(([self.id_map.raw(i) for i in row_ids], row_scores))
        return out

    def encode(self, histories: Sequence) -> Tensor:
        """(B, M*d) sequence vectors [H^id; H^txt; H^img] (eq. 18) of validated histories."""
        dense = self.dense_histories(histories)
        return torch.cat([self._encode(dense[s:s + self.batch_size])
                          for s in range(0, len(dense), self.batch_size)])

    def dense_histories(self, histories: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """Validated (dense items, times) int64 arrays per history, oldest first, uncut."""
        if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise ScoringError("histories", histories, "expected a list of histories")
        if not histories:
            raise ScoringError("histories", histories, "expected at least one history")
        return [self._history(h, f"histories[{i}]") for i, h in enumerate(histories)]

    # -- validation -------------------------------------------------------------------------------
    def _check_k(self, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ScoringError("k", k, "expected an int >= 1")
        if k > self.n_items:
            raise ScoringError("k", k, f"more than the {self.n_items} items of the catalogue")

    def _check_candidates(self, dense: list[tuple[np.ndarray, np.ndarray]], k: int) -> None:
        for i, (items, _) in enumerate(dense):
            seen = len(np.unique(items))
            if k > self.n_items - seen:
                raise ScoringError("k", k, f"more than the {self.n_items - seen} candidate items of "
                                   f"histories[{i}] with exclude_history ({self.n_items} items less its "
                                   f"{seen} distinct history items)")

    def _history(self, history: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise ScoringError(where, history, "expected a list of (raw item ID, unix seconds) pairs")
        if len(history) == 0:
            raise ScoringError(where, history, "empty history; at least one (item, time) pair is needed")
        items = np.empty(len(history), dtype=np.int64)
        times = np.empty(len(history), dtype=np.int64)
        for j, pair in enumerate(history):
            field = f"{where}[{j}]"
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ScoringError(field, pair, "expected a (raw item ID, unix seconds) pair")
            raw, t = pair
            dense = self.id_map.dense(raw)
            if dense is None:
                raise ScoringError(f"{field}.item", raw, "unknown raw item ID (not in the export's "
                                   "items.parquet)")
            items[j], times[j] = dense, self._time(t, f"{field}.time")
            if j and times[j] < times[j - 1]:
                raise ScoringError(f"{field}.time", t, "earlier than the item before it "
                                   f"({int(times[j - 1])}); a history is oldest first")
        return items, times

    @staticmethod
    def _time(t: Any, field: str) -> int:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ScoringError(field, t, "expected whole unix seconds (an int)")
        if not 0 <= t <= MAX_UNIX_SECONDS:
            raise ScoringError(field, t, f"outside the unix seconds the model can read, "
                               f"[0, {MAX_UNIX_SECONDS}] (1970 to 9999)")
        return int(t)

    # -- computing --------------------------------------------------------------------------------
    def batch(self, dense: list[tuple[np.ndarray, np.ndarray]]):
        """The model's input for these histories: the reader's `collate` (last `max_len` items,
        right-padded), trimmed to the longest (outputs unchanged, `Batch.trimmed`). The target is
        a placeholder (item 1) that the forward never reads."""
        samples = [(np.append(items, 1), np.append(times, 0), len(items)) for items, times in dense]
        return collate(samples, self.max_len).trimmed().to(self.device)

    @torch.no_grad()
    def _encode(self, dense: list[tuple[np.ndarray, np.ndarray]]) -> Tensor:
        out = self.model(self.batch(dense), item_repr=self.item_repr)
        if not bool(torch.isfinite(out.seq_repr).all()):
            raise ValueError("Scorer: the model gave non-finite sequence vectors")
        return out.seq_repr

    @torch.no_grad()
    def _top_k(self, dense: list[tuple[np.ndarray, np.ndarray]], k: int, exclude_history: bool
               ) -> tuple[Tensor, Tensor]:
        seq_repr = self._encode(dense)
        exclude = None
        if exclude_history:
            rows = np.concatenate([np.full(len(items), r) for r, (items, _) in enumerate(dense)])
            items = np.concatenate([items for items, _ in dense])
            exclude = (torch.from_numpy(rows).to(self.device), torch.from_numpy(items).to(self.device))
        scores, ids = chunked_topk(seq_repr, self.item_repr, k, self.item_chunk_size, exclude)
        return scores.cpu(), ids.cpu()
