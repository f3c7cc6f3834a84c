"""Compressed formats of a pruned Linear weight (out_features × in_features), and packing.

* ``"nm"``: N:M semi-structured (e.g. 2:4). ``values`` (out, in·n/m) and ``index`` (out, in·n/m)
  uint8, the position of each kept entry inside its group of m (ascending). For 2:4 with
  in % 32 == 0, ``meta`` (out, in/16) int16 also holds the positions in the sparse-tensor-core
  layout (2 bits each, 8 per word, lowest first); otherwise it is empty.
* ``"bitmap"``: unstructured, compressed. The input dimension is cut into chunks of 32;
  ``bits`` (out, ceil(in/32)) int32 has bit j set when column 32·c + j is kept, ``offsets``
  (out, ceil(in/32)) int32 gives where that chunk's kept values start in ``values`` (nnz,).
* ``"bsr"``: block-sparse rows with blocks (bm, bn): ``values`` (nnzb, bm, bn), ``col_index``
  (nnzb,) int32 and ``row_ptr`` (out/bm + 1,) int32; a block is stored if any entry is kept.

Every format keeps exactly what the mask keeps (N:M and bitmap) or the blocks holding it
(BSR), and unpacks to the masked dense weight bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("nm", "bitmap", "bsr")
CHUNK = 32


@dataclass
class PackedWeight:
    """A compressed weight: its format, shape, parameters and buffers (see the module doc)."""

    format: str
    out_features: int
    in_features: int
    a: torch.Tensor  # nm: values  | bitmap: bits    | bsr: values
    b: torch.Tensor  # nm: index   | bitmap: offsets | bsr: col_index
    c: torch.Tensor  # nm: meta (2:4) or empty | bitmap: values | bsr: row_ptr
    n: int = 0
    m: int = 0
    bm: int = 0
    bn: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.c.dtype if self.format == "bitmap" else self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.c))

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(
            self.format,
            self.out_features,
            self.in_features,
            self.a.to(device),
            self.b.to(device),
            self.c.to(device),
            self.n,
            self.m,
            self.bm,
            self.bn,
        )


def _check_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D tensor (out_features, in_features), got {getattr(weight, 'shape', None)}"
        )
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if mask is None:
        return weight != 0
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(weight.shape)} (True = kept), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device}, weight on {weight.device}")
    return mask


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs of every row keeps at most n entries."""
    out, k = mask.shape
    return k % m == 0 and bool((mask.view(out, k // m, m).sum(-1) <= n).all())


def pack_nm(weight: torch.Tensor, mask: torch.Tensor | None = None, n: int = 2, m: int = 4) -> PackedWeight:
    """Pack an N:M-sparse weight. ``mask`` (True = kept) defaults to ``weight != 0``; groups
    keeping fewer than n entries are padded with explicit zeros."""
    keep = _check_weight(weight, mask)
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got n={n}, m={m}")
    out, k = weight.shape
    if k % m:
        raise ValueError(f"in_features={k} is not a multiple of m={m}")
    groups = keep.view(out, k // m, m)
    if bool((groups.sum(-1) > n).any()):
        bad = int((groups.sum(-1) > n).sum())
        raise ValueError(f"the mask is not {n}:{m}: {bad} group(s) keep more than {n} of {m} entries")
    # the kept positions, topped up with the lowest pruned ones (explicit zeros), ascending
    pos = torch.arange(m, device=weight.device).expand_as(groups)
    key = torch.where(groups, pos, pos + m)
    idx = (key.sort(dim=-1).values[..., :n] % m).sort(dim=-1).values
    vals = weight.view(out, k // m, m).gather(-1, idx)
    vals = torch.where(groups.gather(-1, idx), vals, torch.zeros_like(vals))
    index = idx.reshape(out, -1).to(torch.uint8).contiguous()
    if (n, m) == (2, 4) and k % 32 == 0:
        meta = _tensor_core_meta(index)
    else:
        meta = torch.empty(0, dtype=torch.int16, device=weight.device)
    return PackedWeight("nm", out, k, vals.reshape(out, -1).contiguous(), index, meta, n=n, m=m)


def _tensor_core_meta(index: torch.Tensor) -> torch.Tensor:
    """(out, in/2) 2:4 positions → (out, in/16) int16 words of 8 two-bit positions, lowest first."""
    out, kc = index.shape
    shifts = 2 * torch.arange(8, device=index.device, dtype=torch.int32)
    words = (index.view(out, kc // 8, 8).to(torch.int32) << shifts).sum(-1)
    return torch.where(words >= 2**15, words - 2**16, words).to(torch.int16).contiguous()


def pack_bitmap(weight: torch.Tensor, mask: torch.Tensor | None = None) -> PackedWeight:
    """Pack an unstructured sparse weight as 32-wide bitmaps plus compressed values."""
    keep = _check_weight(weight, mask)
    out, k = weight.shape
    kc = (k + CHUNK - 1) // CHUNK
    pad = kc * CHUNK - k
    kp = torch.nn.functional.pad(keep, (0, pad)).view(out, kc, CHUNK)
    shifts = torch.arange(CHUNK, device=weight.device, dtype=torch.int64)
    bits64 = (kp.to(torch.int64) << shifts).sum(-1)
    bits = torch.where(bits64 >= 2**31, bits64 - 2**32, bits64).to(torch.int32)
    counts = kp.sum(-1).reshape(-1)
    offsets = (torch.cumsum(counts, 0) - counts).view(out, kc).to(torch.int32)
    values = weight[keep].contiguous()  # row-major order = chunk order
    return PackedWeight("bitmap", out, k, bits.contiguous(), offsets.contiguous(), values)


def pack_bsr(weight: torch.Tensor, mask: torch.Tensor | None = None, block: tuple[int, int] = (64, 64)) -> PackedWeight:
    """Pack a block-sparse weight: blocks of ``block`` = (bm, bn) that keep any entry are stored
    densely (pruned entries inside a stored block are explicit zeros)."""
    keep = _check_weight(weight, mask)
    bm, bn = (int(v) for v in block)
    out, k = weight.shape
    if bm < 1 or bn < 1 or out % bm or k % bn:
        raise ValueError(f"block {block} must tile the weight {tuple(weight.shape)}")
    w = torch.where(keep, weight, torch.zeros_like(weight))
    tiles = w.view(out // bm, bm, k // bn, bn).permute(0, 2, 1, 3)  # (R, C, bm, bn)
    occupied = keep.view(out // bm, bm, k // bn, bn).any(dim=3).any(dim=1)  # (R, C)
    rows, cols = occupied.nonzero(as_tuple=True)
    values = tiles[rows, cols].contiguous()
    row_ptr = torch.zeros(out // bm + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = torch.cumsum(occupied.sum(1), 0).to(torch.int32)
    return PackedWeight("bsr", out, k, values, cols.to(torch.int32).contiguous(), row_ptr, bm=bm, bn=bn)


def pack(weight: torch.Tensor, format: str, mask: torch.Tensor | None = None, **kw) -> PackedWeight:
    """Pack ``weight`` (out, in) in ``format`` ("nm", "bitmap" or "bsr")."""
    if format == "nm":
        return pack_nm(weight, mask, **kw)
    if format == "bitmap":
        return pack_bitmap(weight, mask)
    if format == "bsr":
        return pack_bsr(weight, mask, **kw)
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def unpack(p: PackedWeight) -> torch.Tensor:
    """The dense (out, in) weight a packed weight stands for (the reference path)."""
    out, k = p.out_features, p.in_features
    if p.format == "nm":
        dense = torch.zeros(out, k // p.m, p.m, dtype=p.a.dtype, device=p.device)
        vals = p.a.view(out, k // p.m, p.n)
        dense.scatter_add_(-1, p.b.view(out, k // p.m, p.n).to(torch.int64), vals)
        return dense.view(out, k)
    if p.format == "bitmap":
        kc = p.a.shape[1]
        shifts = torch.arange(CHUNK, device=p.device, dtype=torch.int64)
        bits = (p.a.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1)
        keep = ((bits >> shifts) & 1).bool().view(out, kc * CHUNK)[:, :k]
        dense = torch.zeros(out, k, dtype=p.c.dtype, device=p.device)
        dense[keep] = p.c
        return dense
    if p.format == "bsr":
        rcount = p.c[1:] - p.c[:-1]
        rows = torch.repeat_interleave(torch.arange(out // p.bm, device=p.device), rcount.to(torch.int64))
        tiles = torch.zeros(out // p.bm, k // p.bn, p.bm, p.bn, dtype=p.a.dtype, device=p.device)
        tiles[rows, p.b.to(torch.int64)] = p.a
        return tiles.permute(0, 2, 1, 3).reshape(out, k)
    raise ValueError(f"unknown format {p.format!r}")
