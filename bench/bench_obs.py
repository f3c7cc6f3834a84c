"""OBS benchmarks: greedy elimination + global selection + reconstruction (needs a GPU).

    pytest bench/bench_obs.py --benchmark-only

A slice of N_SLICE parameters (scale linearly to a model). The baseline is the original
code's approach with per-step weight traces in host memory (bench/baselines.py), on a
smaller slice (BASELINE_FRACTION of the blocks).
"""

import pytest
import torch
from baselines import greedy_with_traces, select_and_rebuild_loop

import ovit_kernels as ok

N_SLICE = 2**22
BASELINE_FRACTION = 8


def _problem(b: int):
    nb = N_SLICE // b
    x = torch.randn(nb, b, 2 * b, device="cuda")
    f = x @ x.transpose(1, 2) / (2 * b) + 0.1 * torch.eye(b, device="cuda")
    h = torch.cholesky_inverse(torch.linalg.cholesky(f))
    return torch.randn(nb, b, device="cuda"), h


@pytest.mark.parametrize("b", [64, 128, 192])
def test_baseline_greedy_with_traces(benchmark, b):
    w, h = _problem(b)
    k = w.shape[0] // BASELINE_FRACTION
    benchmark.extra_info.update(blocks=k, of_blocks=w.shape[0])

    def run():
        losses, _, trace = greedy_with_traces(w[:k], h[:k])
        select_and_rebuild_loop(losses, trace, 0.5)

    benchmark.pedantic(run, rounds=1)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("b", [64, 128, 192])
def test_prune_select_reconstruct(benchmark, b, backend):
    w, h = _problem(b)
    n = w.numel()
    benchmark.extra_info.update(floor_s=max(2.0 * n * b * b / 51e12, n * b * 4 / 3.0e12))

    def run():
        order, loss = ok.obs_prune_order(w, h, backend=backend)
        counts = ok.prune_counts(loss, 0.5, backend=backend)
        ok.obs_reconstruct(w, h, order, counts, backend=backend)
        torch.cuda.synchronize()

    try:
        benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    except ok.BackendUnavailableError as e:
        pytest.skip(str(e))
