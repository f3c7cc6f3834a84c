"""Pruned checkpoints in safetensors: the weights, every pruned layer's mask bit-packed, and the
prune report and settings as metadata; a per-layer report of a checkpoint (table and chart).

A checkpoint is refused whole — never loaded half-way — when the file is corrupt or truncated,
a mask does not match its weight's shape or its zeros, or the checkpoint belongs to another
architecture (a missing, unexpected or differently shaped tensor).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch
from torch import nn

MASK_PREFIX = "__ovit_mask__."
FORMAT = "ovit-pruned-1"


def pack_bits(values: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Values of ``width`` bits (a bool mask for 1; 0..3 for 2) → uint8 bytes, 8 // width per
    byte (little-endian order), flattened."""
    per = 8 // width
    flat = values.flatten().to(torch.uint8)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return (flat.view(-1, per) << shifts).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...], width: int = 1) -> torch.Tensor:
    """The inverse of :func:`pack_bits` for a tensor of ``shape`` (bool for ``width=1``, else
    uint8)."""
    n = 1
    for d in shape:
        n *= d
    per = 8 // width
    if packed.dtype != torch.uint8 or packed.numel() != (n + per - 1) // per:
        raise ValueError(f"a packed field of {packed.numel()} bytes cannot hold shape {tuple(shape)}")
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    vals = ((packed.unsqueeze(1) >> shifts) & ((1 << width) - 1)).flatten()[:n].view(shape)
    return vals.bool() if width == 1 else vals


def save_pruned(
    model: nn.Module,
    path: str,
    masks: dict[str, torch.Tensor] | None = None,
    *,
    report=None,
    settings: dict | None = None,
) -> None:
    """Write ``model``'s state dict, the masks (``{module name: bool of the weight's shape}``, True =
    kept; default: the zeros of every Linear/Conv2d weight that has any) bit-packed, and the
    report (a :class:`~ovit.PruneReport` or a dict) and settings as JSON metadata. Written
    through a temporary file: an interrupted save never leaves a broken checkpoint."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    if masks is None:
        masks = {n: m.weight.detach() != 0 for n, m in mods.items()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and bool((m.weight == 0).any())}  # fmt: skip
    shapes = {}
    for name, keep in masks.items():
        if name not in mods or tuple(keep.shape) != tuple(mods[name].weight.shape):
            raise ValueError(f"mask {name!r} does not match a weight of the model")
        state[MASK_PREFIX + name] = pack_bits(keep.cpu())
        shapes[name] = list(keep.shape)
    rep = asdict(report) if report is not None and not isinstance(report, dict) else report
    meta = {"format": FORMAT, "masks": json.dumps(shapes), "report": json.dumps(rep), "settings": json.dumps(settings),
            "model": type(model).__name__}  # fmt: skip
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def read_pruned(path: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``(state, masks, metadata)`` of a checkpoint, checked: a clear error for a file that is not
    one, is corrupt or truncated, or whose masks do not match their weights' shapes or zeros."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own errors for a corrupt or truncated file
        raise ValueError(f"{path!r} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an ovit pruned checkpoint (format {meta.get('format')!r})")
    shapes = json.loads(meta["masks"])
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    masks = {}
    for name, shape in shapes.items():
        packed = tensors.get(MASK_PREFIX + name)
        w = state.get(name + ".weight")
        if packed is None or w is None or list(w.shape) != shape:
            raise ValueError(f"{path!r}: the mask of {name!r} does not match its weight")
        keep = unpack_bits(packed, tuple(shape))
        if bool((w[~keep] != 0).any()):
            raise ValueError(f"{path!r}: {name!r} has non-zero weights where its mask prunes")
        masks[name] = keep
    info = {k: json.loads(v) if k in ("report", "settings", "masks") else v for k, v in meta.items()}
    return state, masks, info


def load_pruned(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint written by :func:`save_pruned` into ``model`` (all or nothing) and return
    its masks (True = kept), on the model's devices; :class:`ovit.Pruner` and
    :class:`ovit.MaskHolder` take them as they are.

    Raises:
        ValueError: the file (corrupt, truncated, not a checkpoint), its masks, or a mismatch
            with ``model`` (missing, unexpected or differently shaped tensors, naming them).
    """
    state, masks, _ = read_pruned(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shaped:
        raise ValueError(f"{path!r} belongs to another architecture: {len(missing)} missing (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(shaped)} shaped differently "
                         f"(e.g. {shaped[:2]})")  # fmt: skip
    mods = dict(model.named_modules())
    if any(n not in mods for n in masks):
        raise ValueError(f"{path!r} has masks of modules the model does not have")
    model.load_state_dict(state)
    return {n: k.to(mods[n].weight.device) for n, k in masks.items()}


def report(path: str, png: str | None = None) -> list[dict]:
    """Per pruned layer: sparsity, pattern (2:4 when every group of 4 keeps at most 2),
    parameters, and bytes dense (fp16) vs as a bitmap (fp16 values + 1 bit per weight) and as
    2:4 (half the values in fp16 + a 2-bit index each: 56% of dense) where it applies. Optionally a PNG bar chart of the
    per-layer sparsity."""
    _, masks, _ = read_pruned(path)
    rows = []
    for name, keep in masks.items():
        n = keep.numel()
        kept = int(keep.sum())
        is24 = keep.shape[-1] % 4 == 0 and bool((keep.reshape(-1, 4).sum(1) <= 2).all())
        rows.append({"layer": name, "params": n, "sparsity": 1 - kept / n, "pattern": "2:4" if is24 else "unstructured",
                     "dense_fp16_bytes": 2 * n, "bitmap_fp16_bytes": 2 * kept + (n + 7) // 8,
                     "nm_fp16_bytes": (n + (n + 7) // 8) if is24 else None})  # fmt: skip
    if png is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
        ax.bar(range(len(rows)), [100 * r["sparsity"] for r in rows])
        ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel("sparsity (%)")
        ax.set_title(os.path.basename(path))
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        plt.close(fig)
    return rows


# --- compressed checkpoints: N:M and bitmap layers stored packed, loaded as SparseLinear ----------------

COMPRESSED = "ovit-compressed-1"


def save_compressed(model: nn.Module, path: str, format: str = "nm", *, dtype: torch.dtype = torch.float16) -> dict:
    """Write ``model`` with its pruned Linear layers compressed, every floating tensor in ``dtype``.

    ``format="nm"`` (2:4): per layer the kept values (half the weights) and a 2-bit position each
    (56% of the dense bytes in fp16); ``"bitmap"``: the nonzero values and 1 bit per weight. A
    Linear that is not pruned, or whose zeros do not fit 2:4, stays dense (said in the result).
    :func:`load_compressed` rebuilds the layers as :class:`ovit_kernels.SparseLinear`.

    Returns:
        ``{module name: "nm" | "bitmap" | "dense (reason)"}``.
    """
    from safetensors.torch import save_file

    if format not in ("nm", "bitmap"):
        raise ValueError(f"format must be 'nm' or 'bitmap', got {format!r}")
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    chosen: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach().cpu()
        keep = w != 0
        if bool(keep.all()):
            chosen[name] = "dense (not pruned)"
            continue
        if format == "nm":
            if w.shape[1] % 4 or bool((keep.view(w.shape[0], -1, 4).sum(-1) > 2).any()):
                chosen[name] = "dense (not 2:4)"
                continue
            g = keep.view(w.shape[0], -1, 4)
            # two positions per group: the kept ones first, then free slots (zeros) in index order
            order = torch.sort((~g).to(torch.int8), dim=-1, stable=True).indices[..., :2]
            vals = torch.gather(w.view(w.shape[0], -1, 4), -1, order)
            out[f"{name}.__values__"] = vals.reshape(w.shape[0], -1).to(dtype).contiguous()
            out[f"{name}.__index__"] = pack_bits(order, width=2)
        else:
            out[f"{name}.__values__"] = w[keep].to(dtype).contiguous()
            out[f"{name}.__mask__"] = pack_bits(keep)
        layers[name] = {"format": format, "shape": list(w.shape)}
        chosen[name] = format
    skip = {f"{n}.weight" for n in layers}
    for k, v in model.state_dict().items():
        if k not in skip and isinstance(v, torch.Tensor):
            out[k] = (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
    meta = {"format": COMPRESSED, "layers": json.dumps(layers), "dtype": str(dtype).replace("torch.", "")}
    tmp = path + ".tmp"
    save_file(out, tmp, metadata=meta)
    os.replace(tmp, path)
    return chosen


def load_compressed(model: nn.Module, path: str, backend: str | None = None) -> dict[str, str]:
    """Load a file of :func:`save_compressed` into ``model`` (built as for the dense checkpoint):
    its compressed layers become :class:`ovit_kernels.SparseLinear` (same values, bit-exact in the
    file's dtype), the rest loads as usual; the model takes the file's dtype. All or nothing:
    a corrupt file or another architecture is refused before anything changes."""
    from safetensors import safe_open

    import ovit_kernels as ok

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    if meta.get("format") != COMPRESSED:
        raise ValueError(f"{path!r} is not an ovit compressed checkpoint")
    layers = json.loads(meta["layers"])
    mods = dict(model.named_modules())
    dense: dict[str, torch.Tensor] = {}
    for name, info in layers.items():
        m = mods.get(name)
        if not isinstance(m, nn.Linear) or list(m.weight.shape) != info["shape"]:
            raise ValueError(f"{path!r} belongs to another architecture: no Linear {name!r} of shape {info['shape']}")
        out_f, in_f = info["shape"]
        vals = tensors[f"{name}.__values__"]
        w = torch.zeros(out_f, in_f, dtype=vals.dtype)
        if info["format"] == "nm":
            idx = unpack_bits(tensors[f"{name}.__index__"], (out_f, in_f // 4, 2), width=2).long()
            w.view(out_f, -1, 4).scatter_(-1, idx, vals.view(out_f, -1, 2))
        else:
            w[unpack_bits(tensors[f"{name}.__mask__"], (out_f, in_f))] = vals
        dense[name] = w
    state = {k: v for k, v in tensors.items() if "__" not in k.rsplit(".", 1)[-1]}
    own = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in layers or
           not k.endswith(".weight")}  # fmt: skip
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shaped:
        raise ValueError(f"{path!r} belongs to another architecture: missing {missing[:2]}, unexpected "
                         f"{unexpected[:2]}, shaped differently {shaped[:2]}")  # fmt: skip
    dtype = getattr(torch, meta.get("dtype", "float16"))
    model.to(dtype)
    model.load_state_dict({**model.state_dict(), **state})
    chosen = {}
    for name, info in layers.items():
        parent, _, child = name.rpartition(".")
        lin = mods[name]
        packed = ok.pack(dense[name], info["format"])
        setattr(mods[parent] if parent else model, child, ok.SparseLinear(packed, lin.bias, backend=backend))
        chosen[name] = info["format"]
    return chosen
