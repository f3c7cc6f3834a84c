"""The in-place elimination that leaves its factor in the inverses' storage, and the final
weights read from that factor, against the float64 reference (the replay of SPEC §3).

Every backend that has the two ops runs here (the reference and the C++ CPU kernels). The
factor is compared entry by entry, its zeros included, so an entry a kernel forgot to write
(it would still hold the inverse's value) cannot pass.
"""

import pytest
import torch
from conftest import elimination_inputs, random_fisher_inverse

import ovit
import ovit_kernels as ok

CPU = ok.available_backends()["cpu"].available


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    if request.param == "cpu" and not CPU:
        pytest.skip(f"the cpu backend is not built: {ok.available_backends()['cpu'].reason}")
    return request.param


def _reference_factor(w, h, mask, nm):
    """The factor by definition, from the reference elimination's own steps (float64)."""
    nb, b = w.shape
    order, _ = ok.obs_prune_order(w, h, mask=mask, nm=nm, backend="reference")
    fac = torch.zeros(nb, b, b, dtype=torch.float64)
    for i in range(nb):
        hh, ww = h[i].clone(), w[i].clone()
        if mask is not None:
            ww[mask[i]] = 0
        gone = torch.zeros(b, dtype=torch.bool)
        for t, q in enumerate(order[i].tolist()):
            col = hh[:, q] / hh[q, q]
            fac[i, :, t] = torch.where(gone, torch.zeros_like(col), col)
            fac[i, q, t] = ww[q]
            ww = ww - ww[q] * col
            gone[q] = True
            ww[gone] = 0
            hh = hh - torch.outer(hh[:, q], hh[q, :]) / hh[q, q]
    return order, fac


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["plain", "mask", "nm", "nm+mask"])
@pytest.mark.parametrize("nb,b", [(1, 12), (3, 5), (2, 24), (3, 20)])
def test_the_factor_and_the_final_weights_match_the_reference(backend, dtype, variant, nb, b, gen):
    if "nm" in variant and b % 4:
        pytest.skip("N:M needs m | B")
    w, h, mask, nm = elimination_inputs(nb, b, variant, gen)
    h = h.contiguous()  # the layout the in-place op needs, for both ops (the reference rounds by layout)
    o_ref, f_ref = _reference_factor(w, h, mask, nm)
    o_plain, l_plain = ok.obs_prune_order(w.to(dtype), h.to(dtype), mask=mask, nm=nm, backend=backend)
    fac = h.to(dtype).clone()  # (to(float64) of a float64 h would be h itself)
    order, loss = ok.obs_prune_order_(w.to(dtype), fac, mask=mask, nm=nm, backend=backend)
    assert torch.equal(order, o_plain) and torch.equal(loss, l_plain), "the in-place op changed the elimination"
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    if dtype == torch.float64:
        assert torch.equal(order, o_ref)
        torch.testing.assert_close(fac, f_ref, rtol=tol, atol=tol)
    steps = order.shape[1]
    wm = w if mask is None else w.masked_fill(mask, 0)
    for counts in (torch.zeros(nb, dtype=torch.int64), torch.full((nb,), steps),
                   torch.randint(0, steps + 1, (nb,), generator=gen)):  # fmt: skip
        w_ref, keep_ref = ok.obs_reconstruct(wm, h, order, counts, backend="reference")  # float64 replay
        w_new, keep = ok.obs_reconstruct_factored(w.to(dtype), fac, order, counts, mask=mask, backend=backend)
        assert torch.equal(keep, keep_ref)
        assert w_new.dtype == dtype and bool((w_new[~keep] == 0).all())
        torch.testing.assert_close(w_new.double(), w_ref, rtol=tol, atol=tol * w_ref.abs().max().item())


def test_reconstruction_from_a_cpu_factor_is_exact_for_every_prefix(gen):
    """Every prefix of one block's order: the factor gives the joint OBS solution of SPEC §3,
    w − H[:, S] H[S, S]⁻¹ w_S, computed here by a float64 solve (not by a replay)."""
    be = "cpu" if CPU else "reference"
    _, h = random_fisher_inverse(1, 9, 30, 0.05, gen)
    w = torch.randn(1, 9, generator=gen, dtype=torch.float64)
    fac = h.clone().contiguous()
    order, _ = ok.obs_prune_order_(w, fac, backend=be)
    for k in range(10):
        s = order[0, :k]
        want = w[0] - h[0][:, s] @ torch.linalg.solve(h[0][s][:, s], w[0, s]) if k else w[0].clone()
        want[s] = 0
        got, _ = ok.obs_reconstruct_factored(w, fac, order, torch.tensor([k]), backend=be)
        torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


def test_a_float32_failure_leaves_the_block_and_the_float64_retry_writes_its_factor(backend, monkeypatch, gen):
    from ovit_kernels import obs

    w, h, _, _ = elimination_inputs(3, 8, "plain", gen)
    w, h = w.float().double(), h.float().double().contiguous()
    f64 = h.clone()
    o64, _ = ok.obs_prune_order_(w, f64, backend=backend)
    real = obs._backend.implementation

    def flaky(case, be=None):
        name, fn = real(case, be)
        if case.dtype != torch.float32 or case.op != "obs_prune_order_":
            return name, fn

        def wrapped(w_, finv_, *a):
            keep = finv_[1].clone()
            o, ls, bad = fn(w_, finv_, *a)
            finv_[1] = keep  # a kernel leaves a failed block as it was
            bad = bad.clone()
            bad[1] = True
            return o, ls, bad

        wrapped.scans_inputs = getattr(fn, "scans_inputs", False)
        return name, wrapped

    monkeypatch.setattr(obs._backend, "implementation", flaky)
    fac = h.float().contiguous()
    o32, _ = ok.obs_prune_order_(w.float(), fac, backend=backend)
    assert torch.equal(o32[1], o64[1])
    torch.testing.assert_close(fac[1], f64[1].float(), rtol=0, atol=0)


@pytest.mark.skipif(not CPU, reason="the cpu backend is not built")
def test_a_cpu_block_that_fails_keeps_its_input(gen):
    """A block the kernel flags (here: a positive diagonal, but not positive definite, so the
    first downdate makes a pivot negative and no float64 retry can save it) raises, and that
    block still holds its input: nothing half-written in it."""
    w, h, _, _ = elimination_inputs(3, 8, "plain", gen)
    h = h.contiguous()
    h[2] = 2 * torch.ones(8, 8, dtype=h.dtype) - torch.eye(8, dtype=h.dtype)  # eigenvalues 15 and −1
    fac = h.clone()
    with pytest.raises(ok.NotPositiveDefiniteError) as ei:
        ok.obs_prune_order_(w, fac, backend="cpu")
    assert 2 in ei.value.blocks
    assert torch.equal(fac[2], h[2])
    assert not torch.equal(fac[0], h[0])  # the blocks that succeeded hold their factor


def test_bad_arguments_are_refused_and_touch_nothing(backend, gen):
    w, h, _, _ = elimination_inputs(2, 8, "plain", gen)
    h = h.contiguous()
    t = h.transpose(1, 2)  # symmetric values, not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        ok.obs_prune_order_(w, t, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        ok.obs_prune_order_(w[:, :7], h.clone(), backend=backend)
    fac = h.clone()
    order, _ = ok.obs_prune_order_(w, fac, backend=backend)
    counts = torch.tensor([3, 8])
    with pytest.raises(ValueError, match="counts"):
        ok.obs_reconstruct_factored(w, fac, order, torch.tensor([3, 9]), backend=backend)
    with pytest.raises(ValueError, match="repeats"):
        ok.obs_reconstruct_factored(w, fac, torch.zeros_like(order), counts, backend=backend)
    with pytest.raises(ValueError, match="factor must have shape"):
        ok.obs_reconstruct_factored(w, fac[:, :7, :7], order, counts, backend=backend)
    broken = fac.clone()
    broken[0, order[0, 0], 0] = float("nan")  # a multiplier the first step reads
    with pytest.raises(ValueError, match="NaN/Inf"):
        ok.obs_reconstruct_factored(w, broken, order, counts, backend=backend)
    ok.obs_reconstruct_factored(w, broken, order, torch.tensor([0, 8]), backend=backend)  # block 0 reads none


def test_a_cpu_step_with_and_without_the_factor_gives_the_same_model():
    """The one-shot step on CPU uses the in-place elimination when it owns the inverses; with a
    fisher_cache (inverses kept for later calls) it uses the factorisation path. Same model."""
    from test_frontend import TinyViT, random_data

    outs = []
    for cache in (None, {}):
        torch.manual_seed(3)
        model = TinyViT(dim=32, depth=1, heads=2)
        ovit.one_shot_prune(model, random_data(n_batches=16), 0.6, block_size=16, num_grads=16,
                            fisher_dtype=torch.float64, damp=1e-3, progress=False, fisher_cache=cache)  # fmt: skip
        outs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_reference_factor_on_a_gpu_matches_the_cpu(gen):
    """CUDA tensors take the reference implementation of both ops (no GPU kernel has them):
    same factor and final weights as on the CPU, in float64."""
    w, h, mask, nm = elimination_inputs(3, 24, "mask", gen)
    h = h.contiguous()
    counts = torch.tensor([0, 9, 24])
    f_cpu, f_gpu = h.clone(), h.cuda()
    o_cpu, _ = ok.obs_prune_order_(w, f_cpu, mask=mask, backend="reference")
    o_gpu, _ = ok.obs_prune_order_(w.cuda(), f_gpu, mask=mask.cuda())
    assert torch.equal(o_gpu.cpu(), o_cpu)
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-10, atol=1e-10)
    w_cpu, k_cpu = ok.obs_reconstruct_factored(w, f_cpu, o_cpu, counts, mask=mask, backend="reference")
    w_gpu, k_gpu = ok.obs_reconstruct_factored(w.cuda(), f_gpu, o_gpu, counts.cuda(), mask=mask.cuda())
    assert torch.equal(k_gpu.cpu(), k_cpu)
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-10, atol=1e-10)
