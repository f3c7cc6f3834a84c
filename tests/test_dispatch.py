"""One dispatch point: an explicit backend runs its own code or raises; ``auto`` falls back and
says so; the first-use self-check keeps a wrong kernel from reaching a user; every custom op
passes ``torch.library.opcheck``.

The CUDA backend's Python side runs here on a CPU: ``ovit_kernels._C`` is replaced by the
kernels built against the SIMT emulator (``tests/emu/emulator.py``), so its custom ops, fake
kernels, dispatch rules and self-check execute with every kernel emulated. On a machine where
the real extension is built these tests skip (the GPU tests cover it).
"""

import warnings

import pytest
import torch
from conftest import random_fisher_inverse

import ovit_kernels as ok
from ovit_kernels import _backend, _selfcheck, reference, triton_backend


@pytest.fixture(autouse=True)
def fresh_dispatch_state(monkeypatch):
    """Each test starts with no cached self-checks, events or warnings."""
    _selfcheck.clear()
    monkeypatch.setattr(_backend, "_events", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setenv("OVIT_SELF_CHECK", "1")
    yield
    _selfcheck.clear()


def _problem(nb, b, gen, dtype=torch.float64):
    _, h = random_fisher_inverse(nb, b, 3 * b, 0.05, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    return w.to(dtype), h.to(dtype)


# --- explicit backends never substitute ---------------------------------------------------------


def test_explicit_triton_raises_where_it_has_no_kernel(gen):
    w, h = _problem(1, 192, gen)
    with pytest.raises(ok.BackendUnavailableError, match="triton tiles hold blocks up to 128"):
        ok.obs_prune_order(w, h, backend="triton")
    dense = torch.randn(48, 64, generator=gen)
    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[:24, :32] = True
    p = ok.pack_bsr(dense, mask, block=(24, 32))
    with pytest.raises(ok.BackendUnavailableError, match="power-of-two blocks"):
        ok.spmm(torch.randn(5, 64, generator=gen), p, backend="triton")
    # auto on a CPU tensor takes the reference, which runs it
    torch.testing.assert_close(ok.spmm(torch.randn(5, 64, generator=gen), p).shape, torch.Size([5, 48]))


def test_shared_ops_are_declared_not_substituted():
    st = ok.available_backends()
    assert "gram_update_" not in st["triton"].ops and "prune_counts" not in st["triton"].ops
    assert set(_backend.SHARED_OPS) == {"gram_update_", "prune_counts"}
    case = _backend.Case("gram_update_", torch.device("cpu"), torch.float64, 8)
    name, fn = _backend.implementation(case, "triton")
    assert name == "triton" and fn is reference.gram_update_  # the shared GEMM, documented as such


def test_auto_falls_back_and_records_where(monkeypatch, gen):
    monkeypatch.setitem(_backend.AUTO_ORDER, "cpu", ("triton", "reference"))
    w, h = _problem(2, 136, gen)
    with pytest.warns(RuntimeWarning, match="triton tiles hold blocks up to 128"):
        order, _ = ok.obs_prune_order(w, h)
    assert torch.equal(order, ok.obs_prune_order(w, h, backend="reference")[0])
    ev = ok.available_backends()["triton"].events
    assert any("auto ran obs_prune_order float64 B=136 on cpu on reference" in e for e in ev), ev
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok.obs_prune_order(w, h)  # once per kind: no second warning


# --- the first-use self-check -------------------------------------------------------------------


def _wrong_scores(w, finv):
    out = reference.obs_scores(w, finv)
    out[0, 1] *= 1.5  # one entry off
    return out


def test_self_check_catches_a_wrong_kernel(monkeypatch, gen):
    monkeypatch.setitem(triton_backend.OPS, "obs_scores", _wrong_scores)
    w, h = _problem(3, 12, gen)
    with pytest.warns(RuntimeWarning, match=r"self-check FAILED.*obs_scores float64 B=12.*at \[0, 1\]"):
        with pytest.raises(ok.BackendUnavailableError, match="failed its first-use self-check"):
            ok.obs_scores(w, h, backend="triton")
    # auto uses the next backend for that case from then on, and says so in available_backends
    monkeypatch.setitem(_backend.AUTO_ORDER, "cpu", ("triton", "reference"))
    torch.testing.assert_close(ok.obs_scores(w, h), reference.obs_scores(w, h))
    ev = ok.available_backends()["triton"].events
    assert any(e.startswith("self-check FAILED") for e in ev)
    assert any("auto ran obs_scores float64 B=12 on cpu on reference: triton failed its self-check" in e for e in ev)
    # another block-size class is checked on its own
    w2, h2 = _problem(2, 40, gen)
    with pytest.raises(ok.BackendUnavailableError):
        ok.obs_scores(w2, h2, backend="triton")
    # with the check off, the wrong kernel would have reached the user
    monkeypatch.setenv("OVIT_SELF_CHECK", "0")
    got = ok.obs_scores(w, h, backend="triton")
    assert not torch.allclose(got, reference.obs_scores(w, h))


def test_self_check_catches_a_wrong_elimination_order(monkeypatch, gen):
    real = triton_backend.OPS["obs_prune_order"]

    def swapped(w, finv, mask, nm):
        order, loss, bad = real(w, finv, mask, nm)
        order[:, [3, 4]] = order[:, [4, 3]]
        return order, loss, bad

    monkeypatch.setitem(triton_backend.OPS, "obs_prune_order", swapped)
    w, h = _problem(2, 16, gen, torch.float32)
    with pytest.warns(RuntimeWarning, match="elimination order differs at block 0, step 3"):
        with pytest.raises(ok.BackendUnavailableError):
            ok.obs_prune_order(w, h, backend="triton")


def test_self_check_runs_once_per_case_and_is_listed(monkeypatch, gen):
    calls = []
    probe = _selfcheck.PROBES["obs_reconstruct"]
    monkeypatch.setitem(_selfcheck.PROBES, "obs_reconstruct", lambda *a: calls.append(1) or probe(*a))
    w, h = _problem(2, 10, gen)
    order, loss = ok.obs_prune_order(w, h, backend="reference")
    counts = torch.tensor([3, 10])
    for _ in range(3):
        ok.obs_reconstruct(w, h, order, counts, backend="triton")
    assert len(calls) == 1
    ev = ok.available_backends()["triton"].events
    assert any(
        e.startswith("self-check passed: obs_reconstruct float64 B=10 on cpu [one program per block") for e in ev
    )


def test_mismatch_says_where_and_finds_the_first_nan():
    want = torch.zeros(2, 3, 3, dtype=torch.float64) + 1.0
    got = want.clone()
    got[1, 2, 0] = 1.5
    got[0, 1, 2] = float("nan")
    r = _selfcheck.mismatch(got, want, 1e-3)
    assert not r["ok"] and r["first_nonfinite"] == [0, 1, 2] and r["nonfinite"] == 1
    got[0, 1, 2] = 1.0
    r = _selfcheck.mismatch(got, want, 1e-3)
    assert r["where"] == [1, 2, 0] and r["max_rel_err"] == pytest.approx(0.5) and "at [1, 2, 0]" in r["text"]
    assert _selfcheck.mismatch(want, want, 1e-12)["ok"]


# --- the CUDA backend's Python side, with the kernels emulated ----------------------------------


@pytest.fixture
def wrong_c(emulated_cuda, monkeypatch):
    """Makes the emulated elimination kernel return a wrong cumulative loss in one block."""
    real = emulated_cuda._C.obs_prune_order

    def wrong(w, finv, mask, nm_n, nm_m, order, loss, bad):
        real(w, finv, mask, nm_n, nm_m, order, loss, bad)
        loss[-1, -1] *= 1.01

    monkeypatch.setattr(emulated_cuda._C, "obs_prune_order", wrong)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_backend_on_the_emulator_matches_reference(emulated_cuda, dtype, gen):
    w, h = _problem(3, 20, gen, dtype)
    o, ls = ok.obs_prune_order(w, h, backend="cuda")
    o_ref, l_ref = ok.obs_prune_order(w.double(), h.double(), backend="reference")
    assert torch.equal(o[:, :10], o_ref[:, :10])
    counts = torch.tensor([0, 7, 20])
    wn, keep = ok.obs_reconstruct(w, h, o, counts, backend="cuda")
    wr, kr = ok.obs_reconstruct(w, h, o, counts, backend="reference")
    assert torch.equal(keep, kr)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(wn.double(), wr.double(), rtol=tol, atol=tol)
    g = torch.randn(41, 40, generator=gen, dtype=torch.float64)
    for method in ("woodbury", "gram"):
        got = ok.fisher_inverse(g.to(dtype), 20, 1e-2, method=method, backend="cuda")
        want = ok.fisher_inverse(g, 20, 1e-2, method=method, backend="reference")
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    ev = ok.available_backends()["cuda"].events
    assert any(
        e.startswith("self-check passed: obs_prune_order") and "register tile, 8 columns per lane" in e for e in ev
    )


def test_explicit_cuda_raises_instead_of_running_other_code(emulated_cuda, gen):
    w, h = _problem(1, 256, gen)
    with pytest.raises(ok.BackendUnavailableError, match="blocks up to 192 in float64"):
        ok.obs_prune_order(w, h, backend="cuda")
    with pytest.raises(ok.BackendUnavailableError, match="no kernel for obs_scores"):
        ok.obs_scores(w, h, backend="cuda")
    p = ok.pack_bitmap(torch.randn(16, 64, generator=gen))
    with pytest.raises(ok.BackendUnavailableError, match="float16/bfloat16 activations"):
        ok.spmm(torch.randn(3, 64, generator=gen), p, backend="cuda")
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[:16] = True
    p = ok.pack_bsr(torch.randn(32, 64, generator=gen).half(), mask, block=(16, 16))
    with pytest.raises(ok.BackendUnavailableError, match="no bsr kernel"):
        ok.spmm(torch.randn(3, 64, generator=gen).half(), p, backend="cuda")


def test_emulated_cuda_2_4_product_through_the_backend(emulated_cuda, gen):
    w = torch.randn(24, 64, generator=gen)
    g = w.abs().view(24, 16, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, dim=-1).indices, True).view(24, 64)
    p = ok.pack_nm(torch.where(keep, w, 0).half(), keep)
    x = torch.randn(7, 64, generator=gen).half()
    got = ok.spmm(x, p, activation="gelu", backend="cuda")
    want = torch.nn.functional.gelu(x.float() @ torch.where(keep, w, 0).half().float().T)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert any("2:4 mma.sp, simple kernel" in e for e in ok.available_backends()["cuda"].events)


def test_wrong_cuda_kernel_is_caught_and_auto_moves_on(emulated_cuda, wrong_c, monkeypatch, gen):
    monkeypatch.setitem(_backend.AUTO_ORDER, "cpu", ("cuda", "triton", "reference"))
    w, h = _problem(2, 24, gen)
    with pytest.warns(RuntimeWarning, match=r"self-check FAILED: the cuda kernel for obs_prune_order float64 B=24"):
        order, loss = ok.obs_prune_order(w, h)
    o_ref, l_ref = ok.obs_prune_order(w, h, backend="reference")
    assert torch.equal(order, o_ref)
    torch.testing.assert_close(loss, l_ref)  # computed by triton, the next backend
    ev = ok.available_backends()["cuda"].events
    assert any("auto ran obs_prune_order float64 B=24 on cpu on triton: cuda failed its self-check" in e for e in ev)
    with pytest.raises(ok.BackendUnavailableError, match="self-check"):
        ok.obs_prune_order(w, h, backend="cuda")


def test_every_custom_op_passes_opcheck(emulated_cuda, gen):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every custom op;
    the CUDA ops' fake kernels execute here, with the real kernels emulated."""
    cb = emulated_cuda
    w, h = _problem(2, 12, gen)
    h = h.contiguous()
    order, _ = ok.obs_prune_order(w, h, backend="reference")
    g = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    gram = torch.einsum("kni,knj->nij", g.view(5, 2, 12), g.view(5, 2, 12))
    mask8 = torch.zeros(2, 12, dtype=torch.uint8)
    mask8[0, 3] = 1
    cases = [
        (cb._woodbury_op, (h.clone(), g, 5.0)),
        (cb._woodbury_op, (h.float().clone(), g.float(), 5.0)),
        (cb._prune_order_op, (w, h, None, 12, 0, 0)),
        (cb._prune_order_op, (w.float(), h.float(), mask8, 6, 2, 4)),
        (cb._reconstruct_op, (w, h, order, torch.tensor([4, 12]))),
        (cb._damped_inverse_op, (gram, 0.2, 1e-2, False, True)),
        (cb._damped_inverse_op, (gram, 0.2, 1e-2, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    from ovit_kernels.sparse import _sparse_linear_op

    p = ok.pack_bitmap(torch.randn(16, 64, generator=gen))
    x = torch.randn(3, 64, generator=gen)
    torch.library.opcheck(_sparse_linear_op, (x, p.a, p.b, p.c, None, "bitmap", 16, 64, 0, 0, 0, 0, "", "reference"))
    w24 = torch.randn(16, 64, generator=gen)
    keep = torch.zeros(16, 16, 4, dtype=torch.bool)
    keep[..., 1:3] = True
    keep = keep.view(16, 64)
    p = ok.pack_nm(torch.where(keep, w24, 0).half(), keep)
    bias = torch.randn(16, generator=gen).half()
    torch.library.opcheck(_sparse_linear_op, (x.half(), p.a, p.b, p.c, bias, "nm", 16, 64, 2, 4, 0, 0, "gelu", "cuda"))
