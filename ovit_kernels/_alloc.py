"""Output allocation for the kernel backends.

With ``OVIT_POISON=1`` (the test suite sets it) every output buffer is filled with NaN
(floats) or a sentinel (integers) before a kernel writes it, so an entry a kernel forgot to
write cannot pass for a correct one.
"""

from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("OVIT_POISON", "0") not in ("", "0")


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else 0x5A)
    return out
