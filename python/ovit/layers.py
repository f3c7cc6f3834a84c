"""Which weights are pruned, and how each is cut into Fisher blocks (SPEC §1)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# timm ViT / DeiT / Swin names: the fused attention input projection, its output, the MLP.
# timm's ViT/DeiT/Swin (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) and Hugging Face transformers' ViT, DeiT
# and Swin: attention.{q,k,v,o}_proj and mlp.fc1/fc2 (transformers 5), or attention.attention|self.
# {query,key,value}, attention.output.dense, intermediate.dense and the block's output.dense (4.x)
DEFAULT_PATTERN = (
    r"(^|\.)(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|attention\.(q_proj|k_proj|v_proj|o_proj)"
    r"|attention\.(attention|self)\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
    r"|(layer|blocks)\.\d+\.output\.dense)$"
)
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


@dataclass
class Layout:
    """How a flat weight of ``numel`` entries is cut into ``num_blocks`` blocks of ``block_size``.

    ``pad`` zero entries are appended (and treated as already pruned) when no divisor of
    ``numel`` fits; they never count as parameters.
    """

    numel: int
    block_size: int
    num_blocks: int
    pad: int


@dataclass
class PrunableLayer:
    name: str
    module: nn.Module
    layout: Layout

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """(numel,) or (k, numel) → (num_blocks, B) or (k, num_blocks·B), padding with zeros."""
        lay = self.layout
        if lay.pad:
            pad_shape = (*flat.shape[:-1], lay.pad)
            flat = torch.cat([flat, flat.new_zeros(pad_shape)], dim=-1)
        if flat.dim() == 1:
            return flat.view(lay.num_blocks, lay.block_size)
        return flat

    def unblock(self, blocks: torch.Tensor) -> torch.Tensor:
        """(num_blocks, B) → the weight's shape, dropping the padding."""
        return blocks.reshape(-1)[: self.layout.numel].view_as(self.module.weight)

    def pad_mask(self, device: torch.device) -> torch.Tensor:
        """(num_blocks, B) bool, True on the padding entries."""
        lay = self.layout
        m = torch.zeros(lay.num_blocks * lay.block_size, dtype=torch.bool, device=device)
        if lay.pad:
            m[lay.numel :] = True
        return m.view(lay.num_blocks, lay.block_size)


def block_layout(numel: int, block_size: int, group: int = 1) -> Layout:
    """SPEC §1: the smallest divisor of N that is >= B, unless it exceeds 2·B or is not a
    multiple of the N:M group ``group``; otherwise blocks of B (rounded up to the group) with
    padding at the end."""
    if numel < 1 or block_size < 1:
        raise ValueError(f"need numel >= 1 and block_size >= 1, got {numel}, {block_size}")
    if numel <= block_size and numel % group == 0:
        return Layout(numel, numel, 1, 0)
    for d in range(block_size, min(2 * block_size, numel) + 1):
        if numel % d == 0:
            if d % group == 0:
                return Layout(numel, d, numel // d, 0)
            break
    b = math.ceil(block_size / group) * group
    nb = math.ceil(numel / b)
    return Layout(numel, b, nb, nb * b - numel)


def select_layers(
    model: nn.Module, layers: str | Iterable[nn.Module | str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to prune.

    Args:
        layers: ``None`` for timm ViT/DeiT/Swin defaults (every ``attn.qkv``, ``attn.proj``,
            ``mlp.fc1``, ``mlp.fc2``), a regex matched (``re.search``) against module names,
            or a list of modules / module names. Only Linear and Conv2d are accepted.
    """
    named = list(model.named_modules())
    if layers is None or isinstance(layers, str):
        rx = re.compile(DEFAULT_PATTERN if layers is None else layers)
        chosen = [(n, m) for n, m in named if n and rx.search(n) and isinstance(m, PRUNABLE_TYPES)]
        what = f"pattern {rx.pattern!r}"
    else:
        by_id = {id(m): n for n, m in named}
        by_name = dict(named)
        chosen = []
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"the model has no module named {item!r}")
                chosen.append((item, by_name[item]))
            elif id(item) in by_id:
                chosen.append((by_id[id(item)], item))
            else:
                raise ValueError(f"{type(item).__name__} module is not part of the model")
        what = "the given list"
        for n, m in chosen:
            if not isinstance(m, PRUNABLE_TYPES):
                raise TypeError(f"{n!r} is a {type(m).__name__}; only Linear and Conv2d can be pruned")
    if not chosen:
        raise ValueError(f"no Linear/Conv2d module of the model matches {what}")
    names = [n for n, _ in chosen]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"layers names the same module more than once: {dup}")
    return chosen
