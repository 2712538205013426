"""Dropout with a cheap mask on the CPU: same semantics as `F.dropout`, mask drawn with `rand`.

On the CPU, `F.dropout` draws its mask with the `bernoulli_` kernel, several times slower than
`rand` (one thread, 512 x 50 x 64: 24-29 ms vs ~5 ms); with 21 dropouts per HM4SR step it was 18-29%
of the whole step. Here a CPU tensor in training keeps an element when `rand >= p` and scales it by
1 / (1 - p), as `F.dropout` does. With float32 `rand` (multiples of 2^-24) the keep probability is
1 - p up to 2^-24, i.e. Bernoulli(1 - p) up to float32's resolution. Anywhere else (CUDA, where
`F.dropout` is fused and fast; eval; p == 0; p == 1, which `F.dropout` answers with zeros and no
mask; in-place) this *is* `F.dropout`. Both draw from the default generator, so a seed fixes the
masks, but the two draw different masks for the same seed.

Autograd saves only the bool mask (1 byte per element; `F.dropout` on the CPU keeps a float one):
an ml-100k-sized HM4SR step (512 x 50, ID + text) saves 947 MiB for backward instead of 1061.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RAND_DTYPES = (torch.float32, torch.float64)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """`F.dropout`'s signature and semantics; the mask comes from `rand` on the CPU (see above)."""
    if not training or p == 0.0 or p == 1.0 or inplace or input.device.type != "cpu":
        return F.dropout(input, p, training, inplace)
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    # half / bfloat16 rand would have 2^-8..2^-11 resolution: draw it in float32 instead
    noise = torch.rand_like(input, dtype=input.dtype if input.dtype in _RAND_DTYPES else torch.float32)
    keep = noise >= p                                                   # bool: 1 byte per element
    # mul by the bool mask saves only the mask; the in-place scale saves nothing
    return input.mul(keep).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout (same attributes, no parameters or buffers) whose forward is `dropout` above."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)
