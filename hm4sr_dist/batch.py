"""The batch contract between the data reader and the model.

Sequences are RIGHT-padded with item 0: real items sit at positions 0..seq_len-1, oldest first, so
the causal encoders never let a padded slot influence a real one, and a batch can be trimmed to its
longest real sequence without changing any output (see `Batch.trimmed`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Batch:
    item_seq: Tensor  # (B, L) int64, item IDs, 0 = padding
    time_seq: Tensor  # (B, L) int64, unix seconds; padded slots hold 0 and are never read
    seq_len: Tensor   # (B,) int64, number of real items, >= 1
    target: Tensor    # (B,) int64, the next item (>= 1)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def __len__(self) -> int:
        return self.item_seq.shape[0]

    def trimmed(self) -> "Batch":
        """Drop trailing columns that are padding in every row (outputs are unchanged)."""
        longest = int(self.seq_len.max())
        if longest == self.item_seq.shape[1]:
            return self
        return Batch(self.item_seq[:, :longest], self.time_seq[:, :longest], self.seq_len, self.target)

    def padding_mask(self) -> Tensor:
        """(B, L) bool, True on real positions."""
        positions = torch.arange(self.item_seq.shape[1], device=self.item_seq.device)
        return positions.unsqueeze(0) < self.seq_len.unsqueeze(1)
