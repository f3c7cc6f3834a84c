"""Quantization after pruning: int8 (weight-only and dynamic) keeps pruned weights exactly zero
and the quantized model runs close to the float one."""

import pytest
import torch

import ovit
from ovit.models import TinyViT
from ovit.quantize import Int8Linear, int8_dynamic, int8_weight_only, linear_weights


@pytest.mark.parametrize("quantize", [int8_weight_only, int8_dynamic])
def test_int8_keeps_zeros_and_runs(quantize):
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]
    ovit.one_shot_prune(model, data, 0.7, block_size=16, num_grads=6, damp=1e-2, damp_mode="relative", progress=False)
    before = linear_weights(model)
    q = quantize(model).eval()
    after = linear_weights(q)
    assert set(after) == set(before)
    for n, w in before.items():
        assert bool((after[n][w == 0] == 0).all()), f"{n}: a pruned weight became non-zero"
        assert float((after[n] - w).abs().max()) <= float(w.abs().max()) / 100  # int8 rounding
    x = data[0][0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
    if quantize is int8_weight_only:
        assert all(isinstance(m, Int8Linear) for n, m in q.named_modules() if n in before)
        assert all(m.qweight.dtype == torch.int8 for m in q.modules() if isinstance(m, Int8Linear))


def test_quant_demo_small(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from ovit.demo import DemoConfig, run_quant_demo

    out = run_quant_demo(DemoConfig(seeds=(0,), sparsities=(0.5,), epochs=1, num_grads=8, out=str(tmp_path / "o")),
                         log=lambda *_: None, damps=(("relative", 1e-2),))  # fmt: skip
    assert out["zeros_kept"] and set(out["results"]["0.5"]) == {"pruned", "int8 dynamic", "int8 weight-only"}
