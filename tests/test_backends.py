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
    inverse_past_float32_range_is_refused,
    original_woodbury_fp32,
    random_fisher_inverse,
    woodbury_accuracy_problems,
)

import ovit_kernels as ok
from ovit_kernels import _backend

HAS_CUDA = torch.cuda.is_available()


def _cuda_ready() -> bool:
    return HAS_CUDA and ok.available_backends()["cuda"].available


@pytest.fixture(params=["triton", "cuda", "cuda-emulated", "cpu"])
def backend(request):
    """Each kernel backend: Triton (interpreter on a CPU), CUDA on a GPU, on a CPU the CUDA
    backend with its kernels emulated (tests/emu), and the C++ CPU kernels."""
    if request.param == "cuda" and not _cuda_ready():
        pytest.skip("needs a GPU and ovit_kernels._C")
    if request.param == "cpu" and not ok.available_backends()["cpu"].available:
        pytest.skip(f"the cpu backend is not built: {ok.available_backends()['cpu'].reason}")
    if request.param == "cuda-emulated":
        if HAS_CUDA:
            pytest.skip("a GPU is here: the cuda tests run the real kernels")
        request.getfixturevalue("emulated_cuda")
        if "b" in request.fixturenames and request.getfixturevalue("b") > 64:
            pytest.skip("large blocks on the emulator: tests/test_cuda_emulated.py runs them")
        return "cuda"
    return request.param


SHAPES = [(3, 5), (1, 12), (2, 16), (3, 24)]
# Blocks past the Triton tile: the CUDA backend runs them (150: fp32 register tile, fp64 packed;
# 200 and 256: fp32 packed, fp64 256 is refused), so does the CPU backend; Triton refuses them.
BIG = [(2, 150), (1, 200), (1, 256)]


def refusal(backend: str, op: str, dtype: torch.dtype, b: int) -> str | None:
    """Why ``backend`` does not run ``op`` at this dtype and block size (None if it does): the
    tests then check that it raises instead of handing the work to other code."""
    fn, why = _backend.candidate(backend, _backend.Case(op, torch.device(device_for(backend)), dtype, b))
    return None if fn is not None else why


def device_for(backend: str) -> str:
    return "cuda" if HAS_CUDA and backend != "cpu" else "cpu"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
def test_woodbury_update_matches_reference(backend, dtype, nb, b, gen):
    dev = device_for(backend)
    g = torch.randn(7, nb * b, generator=gen, dtype=torch.float64)
    h0 = torch.eye(b, dtype=torch.float64).repeat(nb, 1, 1) * 10
    if refusal(backend, "woodbury_update_", dtype, b):
        with pytest.raises(ok.BackendUnavailableError):
            ok.woodbury_update_(h0.to(dtype).to(dev), g.to(dtype).to(dev), 7, backend=backend)
        return
    ref = ok.woodbury_update_(h0.clone(), g, 7, backend="reference")
    out = ok.woodbury_update_(h0.to(dtype).to(dev), g.to(dtype).to(dev), 7, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())


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


@pytest.mark.parametrize("method", ["woodbury", "gram"])
@pytest.mark.parametrize("damp_mode", ["absolute", "relative"])
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
def test_fisher_inverse_matches_reference(backend, method, damp_mode, nb, b, gen):
    if method == "woodbury" and damp_mode == "relative":
        pytest.skip("relative damping is a Gram-only mode")
    dev = device_for(backend)
    g = torch.randn(2 * b + 1, nb * b, generator=gen, dtype=torch.float64)
    ref = ok.fisher_inverse(g, b, 1e-2, method=method, damp_mode=damp_mode, backend="reference")
    op = "woodbury_update_" if method == "woodbury" else "gram_inverse"
    for dtype in (torch.float64, torch.float32):
        gd = g.to(dtype).to(dev)
        if refusal(backend, op, dtype, b):
            with pytest.raises(ok.BackendUnavailableError):
                ok.fisher_inverse(gd, b, 1e-2, method=method, damp_mode=damp_mode, backend=backend)
            continue
        out = ok.fisher_inverse(gd, b, 1e-2, method=method, damp_mode=damp_mode, backend=backend)
        if dtype == torch.float64:
            torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)
        else:
            rel = (out.double().cpu().diagonal(dim1=1, dim2=2) / ref.diagonal(dim1=1, dim2=2) - 1).abs().max()
            assert rel < 1e-4


def test_gram_inverse_reports_indefinite_block(backend, gen):
    dev = device_for(backend)
    acc = ok.FisherInverse(24, 12, 1e-3, method="gram", dtype=torch.float64, backend=backend, name="fc")
    acc.update(torch.randn(3, 24, generator=gen, dtype=torch.float64).to(dev))
    acc._state[1] -= 10 * torch.eye(12, dtype=torch.float64, device=dev)
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"'fc': block\(s\) \[1\]"):
        acc.compute()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's cast
def test_gram_inverse_past_float32_range_is_refused(backend, gen):
    inverse_past_float32_range_is_refused(backend, device_for(backend), gen)


def test_reference_gram_inverse_past_float32_range_is_refused(gen):
    inverse_past_float32_range_is_refused("reference", "cpu", gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nb,b", SHAPES + BIG)
@pytest.mark.parametrize("variant", ["plain", "mask", "nm", "nm+mask"])
def test_prune_order_matches_reference(backend, dtype, nb, b, variant, gen):
    if "nm" in variant and b % 4:
        pytest.skip("N:M needs m | B")
    dev = device_for(backend)
    w, h, mask, nm = elimination_inputs(nb, b, variant, gen)
    w_d, h_d = w.to(dtype).to(dev), h.to(dtype).to(dev)
    m_d = None if mask is None else mask.to(dev)
    if refusal(backend, "obs_prune_order", dtype, b):
        with pytest.raises(ok.BackendUnavailableError):
            ok.obs_prune_order(w_d, h_d, mask=m_d, nm=nm, backend=backend)
        return
    o_ref, l_ref = ok.obs_prune_order(w, h, mask=mask, nm=nm, backend="reference")
    o, loss = ok.obs_prune_order(w_d, h_d, mask=m_d, nm=nm, backend=backend)
    assert o.dtype == torch.int64 and loss.dtype == dtype
    # float32 rounding may reorder near-ties late in a long elimination: compare a prefix there
    k = o.shape[1] if dtype == torch.float64 or b <= 32 else o.shape[1] // 2
    assert torch.equal(o.cpu()[:, :k], o_ref[:, :k])
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(loss.double().cpu()[:, :k], l_ref[:, :k], rtol=tol, atol=tol * l_ref.abs().max().item())
    # inputs are untouched
    assert torch.equal(w_d.double().cpu(), w.to(dtype).double())


@pytest.mark.parametrize("nb,b", SHAPES + BIG)
def test_reconstruct_scores_update_match_reference(backend, nb, b, gen):
    dev = device_for(backend)
    _, h = random_fisher_inverse(nb, b, 3 * b, 0.05, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    order, loss = ok.obs_prune_order(w, h, backend="reference")
    counts = torch.randint(0, b + 1, (nb,), generator=gen)
    mask = torch.rand(nb, b, generator=gen) < 0.5
    wd, hd = w.to(dev), h.to(dev)
    calls = {
        "obs_reconstruct": lambda be: ok.obs_reconstruct(wd, hd, order.to(dev), counts.to(dev), backend=be),
        "obs_scores": lambda be: (ok.obs_scores(wd, hd, backend=be),),
        "obs_update_independent": lambda be: (ok.obs_update_independent(wd, hd, mask.to(dev), backend=be),),
    }
    for op, call in calls.items():
        if refusal(backend, op, torch.float64, b):  # e.g. the cuda backend has no kernel for the scores
            with pytest.raises(ok.BackendUnavailableError):
                call(backend)
            continue
        for got, want in zip(call(backend), call("reference")):
            if got.dtype == torch.bool:
                assert torch.equal(got.cpu(), want.cpu())
            else:
                torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-10, atol=1e-10)


def test_selection_rules(monkeypatch):
    st = ok.available_backends()
    assert set(st) == {"cuda", "triton", "cpu", "reference"} and st["reference"].available
    on_cpu = "cpu" if st["cpu"].available else "reference"  # auto's choice for CPU tensors
    from ovit_kernels import _backend

    cpu = torch.device("cpu")

    def resolve(op, backend=None, **kw):
        return _backend.implementation(_backend.Case(op, cpu, torch.float64, **kw), backend)[0]

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("obs_scores", block=8) == on_cpu
    assert resolve("obs_scores", "triton", block=8) == "triton"  # interpreter on
    with pytest.raises(ok.BackendUnavailableError, match="cuda"):
        resolve("obs_scores", "cuda", block=8)
    with pytest.raises(ok.BackendUnavailableError, match="up to 128"):
        resolve("obs_prune_order", "triton", block=192)
    monkeypatch.setenv("OVIT_BACKEND", "triton")
    assert resolve("obs_scores", block=8) == "triton"
    assert resolve("obs_scores", "reference", block=8) == "reference"  # argument beats env
    monkeypatch.setenv("OVIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="OVIT_BACKEND"):
        resolve("obs_scores", block=8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("OVIT_BACKEND")
    if not HAS_CUDA:
        with pytest.raises(ok.BackendUnavailableError, match="TRITON_INTERPRET"):
            resolve("obs_scores", "triton", block=8)


@pytest.mark.skipif(not ok.available_backends()["cpu"].available, reason="the cpu backend is not built")
def test_cpu_kernels_give_the_same_results_on_one_and_two_threads(gen):
    """Blocks are independent: the thread count (torch.get_num_threads) changes who computes a
    block, never what it computes."""
    w, h, mask, nm = elimination_inputs(7, 24, "nm+mask", gen)
    g = torch.randn(40, 7 * 24, generator=gen, dtype=torch.float64)
    counts = torch.randint(0, 13, (7,), generator=gen)
    saved = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            order, loss = ok.obs_prune_order(w.float(), h.float(), mask=mask, nm=nm, backend="cpu")
            rec = ok.obs_reconstruct(w, h, order, counts, backend="cpu")
            fac = h.float().contiguous()
            ok.obs_prune_order_(w.float(), fac, mask=mask, nm=nm, backend="cpu")
            rec_f = ok.obs_reconstruct_factored(w.float(), fac, order, counts, mask=mask, backend="cpu")
            gram = ok.fisher_inverse(g, 24, 1e-2, method="gram", backend="cpu")
            wood = ok.fisher_inverse(g.float(), 24, 1e-2, method="woodbury", backend="cpu")
            outs.append((order, loss, *rec, fac, *rec_f, gram, wood))
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ok.available_backends()["cpu"].available, reason="the cpu backend is not built")
@pytest.mark.parametrize("b", [1, 9, 16, 37, 203])
def test_cpu_gram_writes_its_fresh_state_then_accumulates(b, gen):
    """The CPU Gram kernel writes the first chunk into an uninitialised (poisoned) state and adds
    the later ones: chunks (an empty one first) equal the whole on the reference. Block sizes
    around the kernels' vector, tile and sweep-panel widths (4 or 8, 12 or 24, 16 pivots)."""
    g = torch.randn(23, 5 * b, generator=gen, dtype=torch.float64)
    acc = ok.FisherInverse(5 * b, b, 1e-2, dtype=torch.float64, backend="cpu")
    for lo, hi in ((0, 0), (0, 7), (7, 8), (8, 23)):
        acc.update(g[lo:hi])
    want = ok.FisherInverse(5 * b, b, 1e-2, dtype=torch.float64, backend="reference")
    want.update(g)
    torch.testing.assert_close(acc.gram(), want.gram(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.compute(), want.compute(), rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not ok.available_backends()["cpu"].available, reason="the cpu backend is not built")
def test_cpu_kernels_report_nan_inputs_they_read(gen):
    """The CPU kernels check the entries they read (no separate scan): a NaN gradient is
    refused with its count, and the accumulator that took part of it refuses to go on; a NaN
    entry of an inverse fails the elimination, the replay and the WoodFisher update."""
    g = torch.randn(6, 48, generator=gen)
    g[2, 30] = float("nan")
    g[4, 3] = float("inf")
    for method in ("gram", "woodbury"):
        acc = ok.FisherInverse(48, 12, 1e-2, 6, method=method, backend="cpu", name="fc1")
        with pytest.raises(ValueError, match="'fc1' contains 2 NaN/Inf"):
            acc.update(g)
        with pytest.raises(RuntimeError, match="make a new one"):
            acc.compute()
    w, h = torch.randn(3, 12, generator=gen, dtype=torch.float64), random_fisher_inverse(3, 12, 40, 0.1, gen)[1]
    h[1, 7, 2] = h[1, 2, 7] = float("nan")
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[1\]"):
        ok.obs_prune_order(w, h, backend="cpu")
    order = torch.arange(12).repeat(3, 1)
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[1\]"):
        ok.obs_reconstruct(w, h, order, torch.tensor([2, 3, 4]), backend="cpu")
    prune = torch.zeros(3, 12, dtype=torch.bool)
    prune[:, 0] = True  # the NaN lies off the pruned column's pivot: only the whole read finds it
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[1\]"):
        ok.obs_update_independent(w, h, prune, check_pd=False, backend="cpu")
    h[1, 7, 2] = h[1, 2, 7] = 0.0
    h[2, 5, 5] = -1.0  # a non-positive pivot is refused before the kernel
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[2\]"):
        ok.obs_update_independent(w, h, prune, check_pd=False, backend="cpu")


@pytest.mark.skipif(not ok.available_backends()["cpu"].available, reason="the cpu backend is not built")
@pytest.mark.parametrize("b", [1, 5, 37, 203])
def test_cpu_reconstruct_every_count_matches_the_replay(b, gen):
    """The CPU kernel solves H[S,S] v = w_S by a blocked Cholesky instead of replaying the
    elimination: every count from 0 to B (panel and tile edges, S in elimination order with
    pre-pruned entries first) against the float64 replay; float32 within rounding."""
    nb = 3
    _, h = random_fisher_inverse(nb, b, 2 * b + 3, 0.05, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    mask = torch.rand(nb, b, generator=gen) < 0.2
    order, _ = ok.obs_prune_order(w, h, mask=mask, backend="reference")
    ks = range(b + 1) if b <= 40 else [0, 1, 7, 8, 9, 63, 64, 100, 150, 195, 202, 203]
    for k in ks:
        counts = torch.tensor([k, max(0, k - 1), min(b, k + 3)])
        want, keep_want = ok.obs_reconstruct(w, h, order, counts, backend="reference")
        got, keep = ok.obs_reconstruct(w, h, order, counts, backend="cpu")
        assert torch.equal(keep, keep_want)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        got32, keep32 = ok.obs_reconstruct(w.float(), h.float(), order, counts, backend="cpu")
        assert torch.equal(keep32, keep_want)
        torch.testing.assert_close(got32.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.skipif(not ok.available_backends()["cpu"].available, reason="the cpu backend is not built")
def test_cpu_reconstruct_checks_what_it_reads(gen):
    """The kernel validates the order and scans the inputs itself (the caller skips its scans):
    positions outside [0, B) and repeats are refused as on the other backends; NaN in the part of
    H the Cholesky never reads (survivors × survivors), and a non-positive diagonal there, fail."""
    w, h = torch.randn(3, 12, generator=gen, dtype=torch.float64), random_fisher_inverse(3, 12, 40, 0.1, gen)[1]
    order = torch.stack([torch.randperm(12, generator=gen) for _ in range(3)])
    counts = torch.tensor([4, 4, 4])
    for backend in ("cpu", "reference"):
        bad = order.clone()
        bad[1, 11] = 12
        with pytest.raises(ValueError, match="outside"):
            ok.obs_reconstruct(w, h, bad, counts, backend=backend)
        bad[1, 11] = bad[1, 10]
        with pytest.raises(ValueError, match="repeats"):
            ok.obs_reconstruct(w, h, bad, counts, backend=backend)
        survivors = order[2, 4:]
        i, j = int(survivors.max()), int(survivors.min())
        for value, where in ((float("nan"), (i, j)), (-1.0, (i, i))):
            hb = h.clone()
            hb[2, where[0], where[1]] = hb[2, where[1], where[0]] = value
            with pytest.raises(ok.NotPositiveDefiniteError, match=r"\[2\]"):
                ok.obs_reconstruct(w, hb, order, counts, backend=backend)


@pytest.mark.skipif(not ok.available_backends()["cpu"].available, reason="the cpu backend is not built")
def test_cpu_global_selection_matches_the_reference(gen):
    """Exactly K taken with the reference's tie-breaking (loss, layer, block, step), padding
    excluded, float32 and float64 layers together; a NaN loss names its layer."""
    for trial in range(20):
        layers = []
        for li in range(3):
            nb, steps = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
            x = torch.randint(0, 3, (nb, steps), generator=gen).double().cumsum(1)
            if trial % 3 == 0:
                x[:, 1:] -= 1e-3 * (torch.rand(nb, steps - 1, generator=gen) < 0.2)  # dips: the running maximum
            layers.append(x.float() if li == 1 else x)
        exclude = [torch.randint(0, x.shape[1] + 1, (x.shape[0],), generator=gen) for x in layers]
        for s in (0.0, 0.25, 0.5, 0.9):
            for ex in (None, exclude):
                want = ok.prune_counts(layers, s, exclude=ex, backend="reference")
                got = ok.prune_counts(layers, s, exclude=ex, backend="cpu")
                for g, wt in zip(got, want):
                    assert g.dtype == torch.int64 and torch.equal(g, wt)
    layers[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"losses\[2\] contains 1 NaN"):
        ok.prune_counts(layers, 0.5, backend="cpu")
