"""Input validation shared by every backend: one place, clear messages."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FISHER_DTYPES = (torch.float32, torch.float64)


def tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: torch.Tensor, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    tensor(name, x)
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {x.dtype}")


def ndim(name: str, x: torch.Tensor, n: int, shape_doc: str) -> None:
    if x.dim() != n:
        raise ValueError(f"{name} must be {n}-D with shape {shape_doc}, got shape {tuple(x.shape)}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    uniq = set(devs.values())
    if len(uniq) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")
    return next(iter(uniq))


def finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")


def block_size(n: int, b: int, what: str = "the number of parameters") -> int:
    if not isinstance(b, int) or isinstance(b, bool) or b < 1:
        raise ValueError(f"block_size must be a positive int, got {b!r}")
    if n % b != 0:
        raise ValueError(f"block_size={b} does not divide {what} ({n}); pad or pick a divisor")
    return n // b


def damp(value: float, mode: str) -> float:
    if mode not in ("absolute", "relative"):
        raise ValueError(f"damp_mode must be 'absolute' or 'relative', got {mode!r}")
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"damp must be a finite positive number, got {value!r}")
    return value


def sparsity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {s!r}")
    return s


def nm_pattern(nm: tuple[int, int] | None, block: int) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise ValueError(f"nm must be a pair (n, m) of ints, got {nm!r}") from None
    if not 0 <= n < m:
        raise ValueError(f"nm=(n, m) needs 0 <= n < m, got {nm!r}")
    if block % m != 0:
        raise ValueError(f"N:M groups of m={m} must tile the block size {block}")
    return n, m


def blocks_and_finv(w_blocks: torch.Tensor, finv: torch.Tensor, finv_name: str = "finv") -> tuple[int, int]:
    """Validate (nb, B) weights against (nb, B, B) inverses (named ``finv_name``); return (nb, B)."""
    floating("w_blocks", w_blocks)
    floating(finv_name, finv, FISHER_DTYPES)
    ndim("w_blocks", w_blocks, 2, "(nb, B)")
    ndim(finv_name, finv, 3, "(nb, B, B)")
    nb, b = w_blocks.shape
    if tuple(finv.shape) != (nb, b, b):
        raise ValueError(
            f"{finv_name} must have shape (nb, B, B) = ({nb}, {b}, {b}) to match w_blocks {tuple(w_blocks.shape)}, "
            f"got {tuple(finv.shape)}"
        )
    same_device(w_blocks=w_blocks, **{finv_name: finv})
    return nb, b


def bool_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    if mask is None:
        return
    tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = pruned), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the weights are on {device}")
