"""Fisher-inverse benchmarks at ViT shapes (pytest-benchmark; needs a GPU).

    pytest bench/bench_fisher.py --benchmark-only --benchmark-group-by=param:shape

Each shape is a slice of N_SLICE parameters (scale linearly to a whole model: blocks are
independent). The baseline is the original code's approach (bench/baselines.py), timed on
fewer gradients: compare per-gradient times. The floor is printed in ``extra_info``.
"""

import pytest
import torch
from baselines import fisher_rank_one

import ovit_kernels as ok

N_SLICE = 2**22
SHAPES = [(64, 256), (128, 256), (192, 256)]
CHUNK = 64


def _grads(b: int) -> torch.Tensor:
    return torch.randn(CHUNK, N_SLICE // b * b, device="cuda")


def _floor(n: int, b: int, m: int, fp64: bool) -> float:
    """Seconds at the H100/H200 anchors of SPEC §5 (fp32 51 TFLOP/s, fp64 63, copy 3 TB/s)."""
    flops = (2.0 if fp64 else 4.0) * n * b * m
    return max(flops / ((63e12) if fp64 else 51e12), n * b * (8 if fp64 else 4) / 3.0e12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}_m{s[1]}")
def test_baseline_rank_one(benchmark, shape):
    b, m = shape
    g = _grads(b)
    k = 8
    benchmark.extra_info.update(per_gradient=True, gradients=k, floor_s_per_grad=_floor(g.shape[1], b, 1, False))
    benchmark.pedantic(lambda: (fisher_rank_one(g[:k], b, 1e-4, m), torch.cuda.synchronize()), rounds=3)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("method", ["woodbury", "gram"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}_m{s[1]}")
def test_fisher_inverse(benchmark, shape, method, backend):
    b, m = shape
    g = _grads(b)
    n = g.shape[1]
    benchmark.extra_info.update(gradients=m, floor_s=_floor(n, b, m, method == "gram"))

    def run():
        acc = ok.FisherInverse(n, b, 1e-4, m, method=method, backend=backend)
        for _ in range(m // CHUNK):
            acc.update(g)
        acc.compute()
        torch.cuda.synchronize()

    try:
        benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    except ok.BackendUnavailableError as e:
        pytest.skip(str(e))
