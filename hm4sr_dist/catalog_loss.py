"""Eq. 20 for catalogues of 10^6-10^7 items: the main loss without a (B, n_items + 1) score matrix.

Two options besides today's full matmul (`loss.main_loss`, see docs/scaling.md):

* ``chunked``: the exact softmax cross-entropy. The forward pass scores `loss.item_chunk_size`
  items at a time and keeps only a running log-sum-exp per row; the backward pass scores each chunk
  again and adds its share of softmax - onehot to the gradients of H (seq_repr) and of the item
  table (item_repr). Memory O(B x chunk) instead of O(B x n); the price is one extra matmul over
  the catalogue per step (the recomputation).
* ``sampled``: a sampled softmax. Row i's partition function sum_v exp(y_iv) keeps its target's
  term exactly and estimates the rest from negatives: the global batch's targets (in-batch) and
  `loss.num_negatives` items drawn with replacement from q (uniform, or popularity from item
  counts). Each negative's logit is corrected by subtracting log E[v], the expected number of times
  its item v is among a row's negatives ((B_global - 1) pi(v) + K q(v); pi = the target
  distribution, estimated by the item counts, uniform without them), and a negative that is the
  row's own target item is masked, as in the contrastive losses. Then
  E[exp(y_t) + sum_j exp(y_ij - log E[v_j])] = sum_v exp(y_iv) (an unbiased estimate of the
  partition function; the loss, its logarithm, is consistent, not unbiased). It reads the item
  table at the targets and negatives only, so the objective computes just those rows (`rows`).

The padding item 0 is never a candidate (eq. 20 as `losses.main_loss` computes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from hm4sr_dist.config import ConfigError, LossConfig

MAIN_LOSSES = ("full", "chunked", "sampled")     # + "vocab_parallel": hm4sr_dist.parallel.vocab
NEGATIVE_SAMPLERS = ("uniform", "popularity")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exp and softmax in at least float32 (bf16/fp16 logits are upcast per chunk)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _chunk_logits(seq_repr: Tensor, item_repr: Tensor, start: int, stop: int, acc: torch.dtype) -> Tensor:
    """(B, stop - start) scores of items start..stop-1; the padding item's column is -inf."""
    logits = (seq_repr @ item_repr[start:stop].T).to(acc)
    if start == 0:
        logits[:, 0] = float("-inf")
    return logits


def _bounds(n_rows: int, chunk_size: int):
    chunk = n_rows if chunk_size <= 0 else chunk_size
    return [(s, min(s + chunk, n_rows)) for s in range(0, n_rows, chunk)]


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    """mean_i [logsumexp_{v >= 1} (h_i . x_v) - h_i . x_{t_i}], item chunk by item chunk. Under
    bf16 autocast its inputs are cast to fp32 and the forward runs without autocast, so the
    backward's recomputed blocks are the forward's (`custom_fwd`)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, seq_repr: Tensor, item_repr: Tensor, target: Tensor, chunk_size: int) -> Tensor:
        acc = _accumulation_dtype(seq_repr.dtype)
        lse = seq_repr.new_full((seq_repr.shape[0],), float("-inf"), dtype=acc)       # (B,)
        for start, stop in _bounds(item_repr.shape[0], chunk_size):                    # online lse
            block = _chunk_logits(seq_repr, item_repr, start, stop, acc)               # (B, chunk)
            lse = torch.logaddexp(lse, torch.logsumexp(block, 1))
            del block
        target_logit = (seq_repr * item_repr[target]).sum(-1).to(acc)                 # (B,)
        ctx.save_for_backward(seq_repr, item_repr, target, lse)
        ctx.chunk_size = chunk_size
        return (lse - target_logit).mean().to(seq_repr.dtype)

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss: Tensor):
        seq_repr, item_repr, target, lse = ctx.saved_tensors
        need_seq, need_items = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = lse.dtype
        scale = grad_loss.to(acc) / seq_repr.shape[0]               # d mean / d row = 1 / B
        grad_seq = torch.zeros(seq_repr.shape, dtype=acc, device=seq_repr.device) if need_seq else None
        grad_items = torch.empty_like(item_repr) if need_items else None
        for start, stop in _bounds(item_repr.shape[0], ctx.chunk_size):
            logits = _chunk_logits(seq_repr, item_repr, start, stop, acc)             # recomputed
            weight = logits.sub_(lse.unsqueeze(1)).exp_().mul_(scale)                  # softmax / B, in place
            if need_seq:
                grad_seq += (weight.to(item_repr.dtype) @ item_repr[start:stop]).to(acc)
            if need_items:                          # each item row is written by exactly one chunk
                grad_items[start:stop] = weight.T.to(seq_repr.dtype) @ seq_repr
            del logits, weight
        # the -onehot(target) part of softmax - onehot
        if need_seq:
            grad_seq -= scale * item_repr[target].to(acc)
            grad_seq = grad_seq.to(seq_repr.dtype)
        if need_items:
            grad_items.index_add_(0, target, (-scale * seq_repr.to(acc)).to(item_repr.dtype))
        return grad_seq, grad_items, None, None


def chunked_cross_entropy(seq_repr: Tensor, item_repr: Tensor, target: Tensor, chunk_size: int) -> Tensor:
    """Eq. 19-20 exactly, never holding more than (B, chunk_size) scores.

    seq_repr (B, D) = [H^id; H^txt; H^img]; item_repr (n_items + 1, D) with row 0 the padding item
    (never a candidate); target (B,) in 1..n_items; chunk_size items per block (<= 0: one block).
    Returns the mean over rows of logsumexp_v y_v - y_target, equal to
    `losses.main_loss(HM4SR.scores(seq_repr, item_repr), target)`, with gradients for both inputs.
    """
    return _ChunkedSoftmaxCrossEntropy.apply(seq_repr, item_repr, target, int(chunk_size))


def sampled_softmax_loss(seq_repr: Tensor, item_repr: Tensor, target: Tensor, negatives: Tensor,
                         log_expected: Tensor) -> Tensor:
    """Sampled softmax with logQ correction, the mean over rows.

    seq_repr (b, D); item_repr (n_items + 1, D); target (b,); negatives (N,) item IDs shared by
    the rows (the global batch's targets and/or sampled items, duplicates allowed);
    log_expected (N,) log of the expected count of each negative's item among a row's negatives.
    Row i: logits [y_{t_i}, y_{i,v_1} - log_expected_1, ..., y_{i,v_N} - log_expected_N], negatives
    whose item is t_i masked (-inf), then cross-entropy with the target in column 0.
    """
    return sampled_softmax_on_rows(seq_repr, item_repr[target], item_repr[negatives], target, negatives,
                                   log_expected)


def sampled_softmax_on_rows(seq_repr: Tensor, target_repr: Tensor, negative_repr: Tensor, target: Tensor,
                            negatives: Tensor, log_expected: Tensor) -> Tensor:
    """`sampled_softmax_loss` from the item rows it reads: target_repr (b, D) the rows of `target`,
    negative_repr (N, D) the rows of `negatives` (no (n_items + 1, D) table needed)."""
    positive = (seq_repr * target_repr).sum(-1, keepdim=True)                          # (b, 1)
    logits = seq_repr @ negative_repr.T - log_expected.to(seq_repr.dtype)              # (b, N)
    logits = logits.masked_fill(negatives.unsqueeze(0) == target.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(target))


class NegativeSampler(nn.Module):
    """Draws negatives from q over the real items 1..n_items and knows pi, the target distribution.

    `item_counts` (n_items + 1,) interactions per item (row 0 ignored), or None. 'uniform' draws
    uniformly; 'popularity' draws proportionally to count + 1 (add-one, so that every real item
    has q > 0, which the unbiased estimate needs) and needs the counts. pi, used for the in-batch
    negatives' correction, is the smoothed count distribution when counts are given, else uniform.
    """

    def __init__(self, n_items: int, kind: str = "uniform", item_counts: Tensor | None = None):
        super().__init__()
        if kind not in NEGATIVE_SAMPLERS:
            raise ConfigError(key="loss.negative_sampler", expected=f"one of {list(NEGATIVE_SAMPLERS)}",
                              got=kind)
        if kind == "popularity" and item_counts is None:
            raise ConfigError("loss.negative_sampler=popularity needs item counts, and the data set's "
                              "catalogue has none (ItemCatalog.item_counts); use "
                              "loss.negative_sampler=uniform", key="loss.negative_sampler")
        if item_counts is not None and item_counts.shape[0] != n_items + 1:
            raise ValueError(f"item_counts: expected {n_items + 1} rows (n_items + padding), "
                             f"got {item_counts.shape[0]}")
        self.n_items, self.kind = n_items, kind
        self._cache: dict = {}
        # int64, non-persistent: a dtype cast of the module (bf16 engines) leaves it alone.
        counts = None if item_counts is None else item_counts.to(torch.int64).clamp_min(0)
        self.register_buffer("item_counts", counts, persistent=False)

    def _probabilities(self, device) -> Tensor:
        """(n_items + 1,) float64 smoothed count distribution, 0 for the padding item."""
        key = ("p", str(device))
        if key not in self._cache:
            p = self.item_counts.to(device=device, dtype=torch.float64) + 1.0
            p[0] = 0.0
            self._cache[key] = p / p.sum()
        return self._cache[key]

    def _cdf(self, device) -> Tensor:
        key = ("cdf", str(device))
        if key not in self._cache:
            self._cache[key] = self._probabilities(device).cumsum(0)
        return self._cache[key]

    def sample(self, k: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """(k,) item IDs in 1..n_items, drawn independently from q."""
        device = device if device is not None else "cpu"
        if self.kind == "uniform":
            return torch.randint(1, self.n_items + 1, (k,), device=device, generator=generator)
        cdf = self._cdf(device)                       # inverse-CDF: any catalogue size, O(k log n)
        u = torch.rand(k, dtype=torch.float64, device=device, generator=generator) * cdf[-1]
        return torch.searchsorted(cdf, u, right=True).clamp_(1, self.n_items)

    def q(self, items: Tensor) -> Tensor:
        """float64 probability of drawing each of `items`."""
        if self.kind == "uniform":
            return torch.full(items.shape, 1.0 / self.n_items, dtype=torch.float64, device=items.device)
        return self._probabilities(items.device)[items]

    def pi(self, items: Tensor) -> Tensor:
        """float64 estimated probability that a training target is each of `items`."""
        if self.item_counts is None:
            return torch.full(items.shape, 1.0 / self.n_items, dtype=torch.float64, device=items.device)
        return self._probabilities(items.device)[items]

    def log_expected(self, items: Tensor, n_in_batch: int, n_sampled: int) -> Tensor:
        """log E[count of v among one row's negatives] = log((n_in_batch - 1) pi(v) + K q(v))."""
        expected = max(n_in_batch - 1, 0) * self.pi(items) + n_sampled * self.q(items)
        return torch.log(expected).to(torch.float32)


class MainLoss(nn.Module):
    """Eq. 20 as `loss.main_loss` chooses, for `HM4SRObjective`: 'chunked' or 'sampled'.

    ('full' is `losses.main_loss(HM4SR.scores(...))`, unchanged.) `all_gather` shares the targets
    of the global batch for the in-batch negatives (the identity on one process).

    'sampled' reads the item table at the targets and the negatives only: given `rows` (a callable
    ids -> their rows of the table, `HM4SR.item_rows`), it computes just those rows and
    `item_repr` is not used (pass None); the loss and its gradients are the same.
    """

    def __init__(self, cfg: LossConfig, n_items: int, item_counts: Tensor | None = None):
        super().__init__()
        self.kind, self.chunk_size = cfg.main_loss, cfg.item_chunk_size
        self.num_negatives, self.in_batch = cfg.num_negatives, cfg.in_batch_negatives
        self.sampler = None
        if self.kind == "sampled":
            if self.num_negatives == 0 and not self.in_batch:
                raise ConfigError(key="loss.num_negatives", expected="an int > 0 when "
                                  "loss.in_batch_negatives is false (a sampled softmax needs negatives)",
                                  got=self.num_negatives)
            self.sampler = NegativeSampler(n_items, cfg.negative_sampler, item_counts)

    def forward(self, seq_repr: Tensor, item_repr: Tensor | None, target: Tensor, all_gather=None,
                rows=None) -> Tensor:
        if self.kind == "chunked":
            return chunked_cross_entropy(seq_repr, item_repr, target, self.chunk_size)
        parts = []
        if self.in_batch:
            parts.append(target if all_gather is None else all_gather(target))
        n_in_batch = parts[0].shape[0] if parts else 0
        if self.num_negatives:
            parts.append(self.sampler.sample(self.num_negatives, device=target.device))
        negatives = torch.cat(parts)
        log_expected = self.sampler.log_expected(negatives, n_in_batch, self.num_negatives)
        if rows is None:
            return sampled_softmax_loss(seq_repr, item_repr, target, negatives, log_expected)
        b = target.shape[0]
        read = rows(torch.cat([target, negatives]))                    # (b + N, D), each item once
        return sampled_softmax_on_rows(seq_repr, read[:b], read[b:], target, negatives, log_expected)


def build_main_loss(cfg: LossConfig, n_items: int, item_counts: Tensor | None = None) -> MainLoss | None:
    """The module for `loss.main_loss`, None for 'full' (the objective scores every item at once)."""
    kind = getattr(cfg, "main_loss", "full")
    if kind == "vocab_parallel":
        raise ConfigError("needs the item table sharded over the workers: the objective takes it from "
                          "hm4sr_dist.parallel.vocab.ShardedItemTable, not from build_main_loss",
                          key="loss.main_loss")
    if kind not in MAIN_LOSSES:
        raise ConfigError(key="loss.main_loss", expected=f"one of {list(MAIN_LOSSES)}", got=kind)
    return None if kind == "full" else MainLoss(cfg, n_items, item_counts)


def full_loss_bytes(batch: int, n_items: int, width: int, element: int = 4) -> int:
    """The memory model of docs/scaling.md for the full main loss, in bytes: scores and their
    softmax/gradient, (B, n+1) each, plus the item table and its gradient, (n+1, D) each."""
    return element * (2 * batch * (n_items + 1) + 2 * (n_items + 1) * width)


def chunked_loss_bytes(batch: int, n_items: int, width: int, chunk: int, element: int = 4) -> int:
    """As `full_loss_bytes` for the chunked loss: two (B, chunk) blocks instead of (B, n+1)."""
    chunk = n_items + 1 if chunk <= 0 else min(chunk, n_items + 1)
    return element * (2 * batch * chunk + 2 * (n_items + 1) * width)


__all__ = ["chunked_cross_entropy", "sampled_softmax_loss", "sampled_softmax_on_rows", "NegativeSampler",
           "MainLoss", "build_main_loss", "full_loss_bytes", "chunked_loss_bytes", "MAIN_LOSSES",
           "NEGATIVE_SAMPLERS"]
