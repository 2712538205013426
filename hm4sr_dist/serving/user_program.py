"""The user side of an exported model as a `torch.export` program: histories -> sequence vectors.

HM4SR scores a history against every item with eq. 19, `seq_repr @ item_vectors.T`. The item side
is a table (`item_vectors`, (n_items + 1, M*d), row 0 the padding item) computed once; the user
side is the part that runs per request: positions, the Interactive and Temporal MoEs, the time
embeddings and the per-modality encoders (eq. 6-18). This module exports that part as an
`ExportedProgram` that needs none of this package's code to run, only torch:

    program(item_seq, time_seq, seq_len, item_vectors) -> (B, M*d) float32

    item_seq      (B, L) int64 dense item IDs, RIGHT-padded with 0, oldest first
    time_seq      (B, L) int64 unix seconds; padded slots are never read
    seq_len       (B,)   int64 real items per row, 1..L
    item_vectors  (n_items + 1, M*d) float32: the export's item_vectors.npy

B is dynamic (>= 1) and so is L (1..max_len, the model's `max_seq_len`): the caller keeps the last
`max_len` items of a longer history, as the data reader and the `Scorer` do. The program does not
check its inputs (its shapes only): `Scorer.dense_histories` is the checked way to build them.

The item vectors are an input, not a constant of the program, so the program stays a few MB for
any catalogue, and a serving system that already holds the table for top-K (or an ANN index
built on it) passes the same table in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hm4sr_dist.batch import Batch
from hm4sr_dist.model.hm4sr import HM4SR

PROGRAM_FILE = "user_side.pt2"
ITEM_VECTORS_FILE = "item_vectors.npy"
INPUT_NAMES = ("item_seq", "time_seq", "seq_len", "item_vectors")


class UserSide(nn.Module):
    """An eval-mode `HM4SR`'s `forward(...).seq_repr` with plain tensors in and out."""

    def __init__(self, model: HM4SR):
        super().__init__()
        self.model = model

    def forward(self, item_seq: Tensor, time_seq: Tensor, seq_len: Tensor, item_vectors: Tensor) -> Tensor:
        batch = Batch(item_seq, time_seq, seq_len, target=seq_len)     # target: never read here
        return self.model(batch, item_repr=item_vectors).seq_repr


def build_user_program(model: HM4SR, item_vectors: Tensor) -> torch.export.ExportedProgram:
    """Export `model`'s user side (eval mode, on the model's device), dynamic in the batch size and
    the width 1..model.cfg.max_seq_len."""
    from torch.export import Dim, export

    model = model.eval()
    max_len = model.cfg.max_seq_len
    device = item_vectors.device
    # example width 2: a width of 0 or 1 would make torch.export fix that dimension
    width = min(2, max_len)
    item_seq = torch.ones(2, width, dtype=torch.long, device=device)
    time_seq = torch.zeros(2, width, dtype=torch.long, device=device)
    seq_len = torch.full((2,), width, dtype=torch.long, device=device)
    batch = Dim("batch", min=1, max=1 << 30)
    length = Dim("length", min=1, max=max_len) if max_len > 1 else None   # max_len 1: fixed at 1
    dims = {0: batch, 1: length} if length is not None else {0: batch}
    with torch.no_grad():
        return export(UserSide(model), (item_seq, time_seq, seq_len, item_vectors),
                      dynamic_shapes=(dims, dims, {0: batch}, None), strict=False)


def write_user_program(model: HM4SR, folder: Path) -> dict:
    """Write `item_vectors.npy` and `user_side.pt2` of `model` into `folder`; returns the export
    manifest's `program` entry."""
    with torch.no_grad():
        item_vectors = model.eval().item_representations().float().contiguous()
    np.save(folder / ITEM_VECTORS_FILE, item_vectors.cpu().numpy())
    program = build_user_program(model, item_vectors)
    torch.export.save(program, folder / PROGRAM_FILE)
    return {"file": PROGRAM_FILE, "item_vectors": ITEM_VECTORS_FILE, "inputs": list(INPUT_NAMES),
            "max_len": model.cfg.max_seq_len, "torch": torch.__version__,
            "item_vectors_shape": list(item_vectors.shape)}


def load_user_program(folder: str | Path) -> tuple[nn.Module, Tensor]:
    """(the program as a callable module, the item vectors) of an export folder; torch only."""
    folder = Path(folder)
    program = torch.export.load(folder / PROGRAM_FILE).module()
    vectors = torch.from_numpy(np.load(folder / ITEM_VECTORS_FILE))
    return program, vectors
