"""Where a batch goes to its device: the one place, used by training, evaluation and diagnostics.

`BatchPlacement(device, widths)` turns a reader's host batch into the batch a step or an
evaluation pass computes on:
1. on the host, its right padding is cut to its longest sequence, or, with `widths`, to the
   smallest of them that holds it (padded up where the batch is narrower): a few fixed shapes for
   `torch.compile`. Outputs are unchanged either way (right padding, causal encoders: `Batch`);
2. on CUDA, its tensors are copied from pinned host memory with `non_blocking=True`.

Two ways to run it:
- `placement(entry)`, on the caller's thread: a `Batch`, an `EvalBatch` (its mask goes along, its
  user ids stay on the host) or a (batch, weight) pair. An entry already on the device passes
  unchanged, so a batch can meet the same placement twice (reader, then `run_epoch`).
- `stage(entry)` in a reader's prefetch thread, on a real GPU only (`stages_copies`): the copy is
  issued on a side CUDA stream and an event recorded, so batch k+1 crosses the bus while step k
  computes; `deliver(staged)`, on the consumer's thread, makes the compute stream wait for that
  event and marks the tensors as used there (`record_stream`, so the caching allocator does not
  hand their memory to the side stream while the step still reads it). The reader calls `deliver`
  as the consumer takes a batch, so its exact-resume position is unchanged.

On the CPU only step 1 runs. Under `FakeTensorMode` (the fake-CUDA tests) there is no real GPU,
so there is no pinning and no side stream: the copy is a plain `to(device)` on the caller's thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from hm4sr_dist.batch import Batch


@dataclass
class Staged:
    """A batch copied on the side stream, with the event its consumer waits for."""

    entry: Any
    event: Any          # torch.cuda.Event


def _is_eval_batch(entry) -> bool:
    return isinstance(entry, tuple) and hasattr(entry, "_fields") and "mask" in entry._fields


class BatchPlacement:
    """Shape a host batch (trim, or pad to one of `widths`) and move it to `device`.

    Args:
        device: where steps run ("cpu", "cuda", "cuda:1", a `torch.device`).
        widths: allowed sequence widths, e.g. (8, 16, 32, 50); a batch gets the smallest that holds
            its longest sequence (its own length if none does). Empty: trim to the longest.
    """

    def __init__(self, device: torch.device | str = "cpu", widths: Sequence[int] = ()):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            # one GPU for every thread (a prefetch thread's current device is not the caller's)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.widths = sorted({int(w) for w in widths})
        if any(w < 1 for w in self.widths):
            raise ValueError(f"sequence widths must be >= 1, got {list(widths)}")
        self._stream = None
        self._stream_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BatchPlacement({str(self.device)!r}, widths={self.widths})"

    @property
    def stages_copies(self) -> bool:
        """Copies can be staged on a side stream (a real CUDA device is present)."""
        return self.device.type == "cuda" and torch.cuda.is_available()

    # -- shaping (host) ------------------------------------------------------------------------
    def width(self, longest: int) -> int:
        """The width a batch whose longest sequence is `longest` gets."""
        return next((w for w in self.widths if w >= longest), longest)

    def shape(self, batch: Batch) -> Batch:
        """Cut or pad the right padding of a host batch to `width(longest)` columns."""
        columns = batch.item_seq.shape[1]
        width = self.width(int(batch.seq_len.max()))             # a host tensor: no device read
        if width == columns:
            return batch
        if width < columns:
            return Batch(batch.item_seq[:, :width], batch.time_seq[:, :width], batch.seq_len, batch.target)
        pad = (0, width - columns)                    # right padding: item 0, time 0 (never read)
        return Batch(torch.nn.functional.pad(batch.item_seq, pad), torch.nn.functional.pad(batch.time_seq, pad),
                     batch.seq_len, batch.target)

    # -- moving --------------------------------------------------------------------------------
    def _placed(self, tensor: Tensor) -> bool:
        d = tensor.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index)

    def _copy(self, tensor: Tensor) -> Tensor:
        upload = tensor.device.type == "cpu" and self.device.type == "cuda"
        if upload and self.stages_copies and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        # asynchronous only host -> GPU from pinned memory; any other direction waits for its data
        return tensor.to(self.device, non_blocking=upload)

    def _batch(self, batch: Batch) -> Batch:
        if batch.item_seq.device.type == "cpu":
            batch = self.shape(batch)                 # host work; a device batch was shaped before
        if self._placed(batch.item_seq):
            return batch                              # a host placement, or placed by the reader
        return Batch(*(self._copy(t) for t in (batch.item_seq, batch.time_seq, batch.seq_len, batch.target)))

    def _entry(self, entry):
        if isinstance(entry, Batch):
            return self._batch(entry)
        if _is_eval_batch(entry):                     # EvalBatch(batch, mask, users): users stay
            mask = entry.mask if self._placed(entry.mask) else self._copy(entry.mask)
            return entry._replace(batch=self._batch(entry.batch), mask=mask)
        batch, weight = entry                         # (batch, weight)
        return self._batch(batch), (None if weight is None or self._placed(weight) else self._copy(weight))

    def __call__(self, entry):
        """Place `entry` on the caller's thread (a `Staged` one is delivered)."""
        if isinstance(entry, Staged):
            return self.deliver(entry)
        return self._entry(entry)

    # -- staged copies (a reader's prefetch thread, real GPUs) ----------------------------------
    def stage(self, entry) -> Staged:
        """Shape and copy `entry` on a side stream (call from the producer thread)."""
        with self._stream_lock:                       # two prefetch threads may start at once
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)
            stream = self._stream
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            placed = self._entry(entry)
            event = torch.cuda.Event()
            event.record(stream)
        return Staged(placed, event)

    def deliver(self, staged: Staged):
        """On the consumer's thread: the compute stream waits for the copy; the tensors are
        recorded as used on it."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(staged.event)
        for tensor in _tensors(staged.entry):
            if tensor.is_cuda:
                tensor.record_stream(current)
        return staged.entry


def _tensors(entry) -> list[Tensor]:
    if isinstance(entry, Batch):
        return [entry.item_seq, entry.time_seq, entry.seq_len, entry.target]
    if _is_eval_batch(entry):
        return _tensors(entry.batch) + [entry.mask]
    batch, weight = entry
    return _tensors(batch) + ([weight] if weight is not None else [])
