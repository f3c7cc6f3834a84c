"""Quantization after pruning: int8 weights that keep every pruned weight exactly zero.

Two paths for the Linear layers of a pruned model:

- :func:`int8_weight_only`: each Linear becomes an :class:`Int8Linear` holding int8 weights with
  one symmetric scale per output row (q = round(w / s), s = max|w_row| / 127): zero stays zero,
  the weights take a quarter of their float32 bytes, the product runs on the dequantised
  weights (any device, autograd-free inference).
- :func:`int8_dynamic`: PyTorch's dynamic quantization on the CPU (int8 weights, activations
  quantized on the fly); its weight quantization is symmetric, so zeros stay zero too.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


class Int8Linear(nn.Module):
    """A Linear with int8 weights and a float scale per output row.

    Attributes:
        qweight: (out, in) int8.
        scale: (out, 1) float32.
        bias: (out,) float32 or None.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 weights the layer computes with."""
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )


def _replace_linears(model: nn.Module, make) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, make(child))
        else:
            _replace_linears(child, make)
    return model


def int8_weight_only(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Linear as :class:`Int8Linear` (pruned zeros stay zero)."""
    return _replace_linears(copy.deepcopy(model), Int8Linear)


def int8_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with PyTorch's dynamic int8 quantization of every Linear (CPU)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float weights every Linear of a model computes with, quantized or not."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            out[name] = m.dequantized()
        elif isinstance(m, nn.Linear):
            out[name] = m.weight.detach().float()
        elif hasattr(m, "weight") and callable(getattr(m, "weight", None)) and "quantized" in type(m).__module__:
            out[name] = m.weight().dequantize()
    return out
