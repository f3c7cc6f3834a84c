"""Every kernel backend against the float64 reference, on fresh random inputs.

Triton runs under TRITON_INTERPRET=1 on CPU (conftest); CUDA runs where a GPU is present and
is skipped otherwise. Outputs are poisoned before the kernels write them (OVIT_POISON=1).
Shapes include B not a power of two, nb = 1, and B not a multiple of the tile.
"""

import pytest
import torch
from conftest import (
    diag_rel_err,
    elimination_inputs,
    original_woodbury_fp32,
    random_fisher_inverse,
    woodbury_accuracy_problems,
)

import ovit_kernels as ok

HAS_CUDA = torch.cuda.is_available()


def _cuda_ready() -> bool:
    return HAS_CUDA and ok.available_backends()["cuda"].available


BACKENDS = [
    pytest.param("triton", id="triton"),
    pytest.param(
        "cuda", id="cuda", marks=pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and ovit_kernels._C")
    ),
]
SHAPES = [(3, 5), (1, 12), (2, 16), (3, 24)]
# On a GPU the CUDA backend also runs blocks past the register tile (packed shared memory):
# 150 (fp32 register tile, fp64 packed), 200 and 256 (fp32 packed; fp64 256 falls back).
BIG = [
    pytest.param(nb, b, marks=pytest.mark.skipif(not _cuda_ready(), reason="CUDA-only sizes"))
    for nb, b in [(2, 150), (1, 200), (1, 256)]
]


def skip_unsupported(backend: str, b: int) -> None:
    if backend == "triton" and b > 128:
        pytest.skip("Triton tiles hold blocks up to 128")


def device_for(backend: str) -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
def test_woodbury_update_matches_reference(backend, dtype, nb, b, gen):
    skip_unsupported(backend, b)
    dev = device_for(backend)
    g = torch.randn(7, nb * b, generator=gen, dtype=torch.float64)
    h0 = torch.eye(b, dtype=torch.float64).repeat(nb, 1, 1) * 10
    ref = ok.woodbury_update_(h0.clone(), g, 7, backend="reference")
    out = ok.woodbury_update_(h0.to(dtype).to(dev), g.to(dtype).to(dev), 7, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_woodbury_kernel_keeps_the_original_accuracy(backend, gen):
    """The kernels apply v = u/√(m + gᵀu), H -= v vᵀ, the original code's float32 arithmetic: the
    state stays exactly symmetric (u (u/denom)ᵀ drifted by ~1e-4) and the diagonal error stays
    within rounding noise of the original's on problems where float32 loses digits."""
    dev = device_for(backend)
    for g, lam, ref in woodbury_accuracy_problems(24, gen):
        b, m = 24, g.shape[0]
        h = (torch.eye(b) / lam).repeat(2, 1, 1).to(dev)
        for chunk in g.float().to(dev).split(32):
            ok.woodbury_update_(h, chunk, m, backend=backend)
        assert torch.equal(h, h.transpose(1, 2))
        ours, orig = diag_rel_err(h, ref), diag_rel_err(original_woodbury_fp32(g, b, lam), ref)
        assert ours <= 3 * orig + 1e-6, (lam, m, ours, orig)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["woodbury", "gram"])
@pytest.mark.parametrize("damp_mode", ["absolute", "relative"])
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
def test_fisher_inverse_matches_reference(backend, method, damp_mode, nb, b, gen):
    skip_unsupported(backend, b)
    if method == "woodbury" and damp_mode == "relative":
        pytest.skip("relative damping is a Gram-only mode")
    dev = device_for(backend)
    g = torch.randn(2 * b + 1, nb * b, generator=gen, dtype=torch.float64)
    ref = ok.fisher_inverse(g, b, 1e-2, method=method, damp_mode=damp_mode, backend="reference")
    out = ok.fisher_inverse(g.to(dev), b, 1e-2, method=method, damp_mode=damp_mode, backend=backend)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
    out32 = ok.fisher_inverse(g.float().to(dev), b, 1e-2, method=method, damp_mode=damp_mode, backend=backend)
    rel = (out32.double().cpu().diagonal(dim1=1, dim2=2) / ref.diagonal(dim1=1, dim2=2) - 1).abs().max()
    assert rel < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_inverse_reports_indefinite_block(backend, gen):
    dev = device_for(backend)
    acc = ok.FisherInverse(24, 12, 1e-3, method="gram", dtype=torch.float64, backend=backend, name="fc")
    acc.update(torch.randn(3, 24, generator=gen, dtype=torch.float64).to(dev))
    acc._state[1] -= 10 * torch.eye(12, dtype=torch.float64, device=dev)
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"'fc': block\(s\) \[1\]"):
        acc.compute()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
@pytest.mark.parametrize("variant", ["plain", "mask", "nm", "nm+mask"])
def test_prune_order_matches_reference(backend, dtype, nb, b, variant, gen):
    skip_unsupported(backend, b)
    if "nm" in variant and b % 4:
        pytest.skip("N:M needs m | B")
    dev = device_for(backend)
    w, h, mask, nm = elimination_inputs(nb, b, variant, gen)
    o_ref, l_ref = ok.obs_prune_order(w, h, mask=mask, nm=nm, backend="reference")
    w_d, h_d = w.to(dtype).to(dev), h.to(dtype).to(dev)
    m_d = None if mask is None else mask.to(dev)
    o, loss = ok.obs_prune_order(w_d, h_d, mask=m_d, nm=nm, backend=backend)
    assert o.dtype == torch.int64 and loss.dtype == dtype
    # float32 rounding may reorder near-ties late in a long elimination: compare a prefix there
    k = o.shape[1] if dtype == torch.float64 or b <= 32 else o.shape[1] // 2
    assert torch.equal(o.cpu()[:, :k], o_ref[:, :k])
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(loss.double().cpu()[:, :k], l_ref[:, :k], rtol=tol, atol=tol * l_ref.abs().max().item())
    # inputs are untouched
    assert torch.equal(w_d.double().cpu(), w.to(dtype).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
def test_reconstruct_scores_update_match_reference(backend, nb, b, gen):
    skip_unsupported(backend, b)
    dev = device_for(backend)
    _, h = random_fisher_inverse(nb, b, 3 * b, 0.05, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    order, loss = ok.obs_prune_order(w, h, backend="reference")
    counts = torch.randint(0, b + 1, (nb,), generator=gen)
    w_ref, keep_ref = ok.obs_reconstruct(w, h, order, counts, backend="reference")
    w_k, keep = ok.obs_reconstruct(w.to(dev), h.to(dev), order.to(dev), counts.to(dev), backend=backend)
    torch.testing.assert_close(w_k.cpu(), w_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(keep.cpu(), keep_ref)
    torch.testing.assert_close(
        ok.obs_scores(w.to(dev), h.to(dev), backend=backend).cpu(), ok.obs_scores(w, h, backend="reference")
    )
    mask = torch.rand(nb, b, generator=gen) < 0.5
    torch.testing.assert_close(
        ok.obs_update_independent(w.to(dev), h.to(dev), mask.to(dev), backend=backend).cpu(),
        ok.obs_update_independent(w, h, mask, backend="reference"),
    )


def test_selection_rules(monkeypatch):
    st = ok.available_backends()
    assert set(st) == {"cuda", "triton", "reference"} and st["reference"].available
    from ovit_kernels import _backend

    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("obs_scores", cpu) == "reference"
    assert _backend.resolve("obs_scores", cpu, "triton") == "triton"  # interpreter on
    with pytest.raises(ok.BackendUnavailableError, match="cuda"):
        _backend.resolve("obs_scores", cpu, "cuda")
    with pytest.raises(ok.BackendUnavailableError, match="up to 128"):
        _backend.resolve("obs_prune_order", cpu, "triton", block=192)
    monkeypatch.setenv("OVIT_BACKEND", "triton")
    assert _backend.resolve("obs_scores", cpu) == "triton"
    assert _backend.resolve("obs_scores", cpu, "reference") == "reference"  # argument beats env
    monkeypatch.setenv("OVIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="OVIT_BACKEND"):
        _backend.resolve("obs_scores", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("OVIT_BACKEND")
    if not HAS_CUDA:
        with pytest.raises(ok.BackendUnavailableError, match="TRITON_INTERPRET"):
            _backend.resolve("obs_scores", cpu, "triton")
