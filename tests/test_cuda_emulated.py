"""The CUDA kernels on the CPU, against the float64 reference and the dense product.

``csrc/woodbury.cu``, ``obs.cu``, ``packed.cu`` and ``spmm_nm.cu`` are compiled as host C++
against the SIMT emulator in ``tests/emu`` (one OS thread per CUDA thread, real block barriers
and warp shuffles, shared memory shared by the threads of a block, dynamic shared memory
poisoned with NaN, and emulated mma.sp / ldmatrix / cp.async for the 2:4 kernels, the latter
completing only at its wait) and called through ctypes. This checks the kernels' indexing, synchronisation and
algorithms without a GPU; it is not a GPU run (the compiler, the card and the timings are
checked by ``bench/gpu_check.py``). The packed shared-memory kernels, which a card runs only
past the register tile, are called directly at small B. Outputs are poisoned before the
kernels write them.
"""

import os
import subprocess

import pytest
import torch
from conftest import (
    diag_rel_err,
    elimination_inputs,
    inverse_past_float32_range_is_refused,
    linear_ref,
    nm_mask,
    original_woodbury_fp32,
    random_fisher_inverse,
    spmm_inputs,
    woodbury_accuracy_problems,
)
from emu.emulator import CSRC, EMU, KERNELS, compiler

import ovit_kernels as ok
from ovit_kernels import reference


@pytest.fixture(scope="module")
def emu(emu_lib):
    return emu_lib


def _fn(lib, name: str, dtype: torch.dtype):
    return getattr(lib, f"emu_{name}_{'f64' if dtype == torch.float64 else 'f32'}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _poisoned(*shape, dtype):
    t = torch.empty(*shape, dtype=dtype)
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7 if dtype != torch.uint8 else 0xAB)
    return t


# (nb, B, packed): register tiles of 4, 8 and 16 columns per lane, and the packed kernels
CASES = [(3, 5, False), (2, 12, False), (1, 24, False), (2, 40, False), (2, 9, True), (1, 20, True)]
# The paper's block sizes, as a card runs them (the launcher picks the instance): register tiles
# of 24, 32 and 48 columns per lane (float64 past 128 and float32 past 192: the packed kernels).
BIG = [pytest.param(1, b, False, marks=pytest.mark.slow, id=f"B{b}") for b in (72, 128, 192, 256)]


def _skip_if_refused(dtype: torch.dtype, b: int) -> None:
    if dtype == torch.float64 and b > 192:
        pytest.skip("float64 blocks past 192 have no CUDA kernel (refused: test_bad_launches_are_refused)")


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb,b,packed", CASES + BIG)
def test_woodbury_kernel(emu, dtype, nb, b, packed, gen):
    _skip_if_refused(dtype, b)
    k = 7
    g = torch.randn(k, nb * b, generator=gen, dtype=torch.float64)
    h0 = torch.eye(b, dtype=torch.float64).repeat(nb, 1, 1) * 10
    ref = h0.clone()
    reference.woodbury_update_(ref, g, float(k))
    h = h0.to(dtype).contiguous()
    gd = g.to(dtype).contiguous()
    assert _fn(emu, "woodbury", dtype)(_ptr(h), _ptr(gd), nb, b, k, nb * b, float(k), int(packed)) == 0
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(h.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("packed", [False, True])
def test_woodbury_kernel_float32_accuracy(emu, packed, gen):
    """float32 Woodbury in the original's arithmetic (H -= v vᵀ, v = u/√(m + gᵀu)): exactly
    symmetric, and within rounding noise of the original's accuracy where float32 loses digits."""
    b = 24
    problems = list(woodbury_accuracy_problems(b, gen))
    for g, lam, ref in problems[::2] if packed else problems:  # 512 emulated threads: half the cases
        m = g.shape[0]
        h = (torch.eye(b) / lam).repeat(2, 1, 1).contiguous()
        for chunk in g.float().split(32):
            c = chunk.contiguous()
            assert _fn(emu, "woodbury", torch.float32)(_ptr(h), _ptr(c), 2, b, c.shape[0], 2 * b, m, int(packed)) == 0
        assert torch.equal(h, h.transpose(1, 2))
        ours, orig = diag_rel_err(h, ref), diag_rel_err(original_woodbury_fp32(g, b, lam), ref)
        assert ours <= 3 * orig + 1e-6, (lam, m, ours, orig)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb,b,packed", CASES + BIG)
@pytest.mark.parametrize("variant", ["plain", "mask", "nm", "nm+mask"])
def test_elimination_kernel(emu, dtype, nb, b, packed, variant, gen):
    _skip_if_refused(dtype, b)
    if "nm" in variant and b % 4:
        pytest.skip("N:M needs m | B")
    w, h, mask, nm = elimination_inputs(nb, b, variant, gen)
    o_ref, l_ref = ok.obs_prune_order(w, h, mask=mask, nm=nm, backend="reference")
    steps = reference.prune_steps(b, nm)
    order, loss, bad = (
        _poisoned(nb, steps, dtype=torch.int64),
        _poisoned(nb, steps, dtype=dtype),
        _poisoned(nb, dtype=torch.int32),
    )
    wd, hd = w.to(dtype).contiguous(), h.to(dtype).contiguous()
    m8 = None if mask is None else mask.to(torch.uint8).contiguous()
    n_, m_ = nm if nm is not None else (0, 0)
    rc = _fn(emu, "prune_order", dtype)(
        _ptr(wd), _ptr(hd), _ptr(m8), nb, b, steps, n_, m_, _ptr(order), _ptr(loss), _ptr(bad), int(packed)
    )
    assert rc == 0
    assert not bad.any()
    # float32 rounding may reorder near-ties late in a long elimination: compare a prefix there
    k = steps if dtype == torch.float64 or b <= 40 else steps // 2
    assert torch.equal(order[:, :k], o_ref[:, :k])
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(loss.double()[:, :k], l_ref[:, :k], rtol=tol, atol=tol * l_ref.abs().max().item())
    assert torch.equal(wd.double(), w.to(dtype).double())  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb,b,packed", CASES + BIG)
def test_reconstruct_kernel(emu, dtype, nb, b, packed, gen):
    _skip_if_refused(dtype, b)
    _, h = random_fisher_inverse(nb, b, 3 * b, 0.05, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    order, _ = ok.obs_prune_order(w, h, backend="reference")
    counts = torch.randint(0, b + 1, (nb,), generator=gen)
    counts[0] = b  # a block replayed to the end
    w_ref, keep_ref = ok.obs_reconstruct(w, h, order, counts, backend="reference")
    w_out, pruned, bad = (
        _poisoned(nb, b, dtype=dtype),
        _poisoned(nb, b, dtype=torch.uint8),
        _poisoned(nb, dtype=torch.int32),
    )
    wd, hd = w.to(dtype).contiguous(), h.to(dtype).contiguous()
    rc = _fn(emu, "reconstruct", dtype)(
        _ptr(wd), _ptr(hd), _ptr(order), _ptr(counts), nb, b, b, _ptr(w_out), _ptr(pruned), _ptr(bad), int(packed)
    )
    assert rc == 0
    assert not bad.any()
    assert torch.equal(pruned == 0, keep_ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(w_out.double(), w_ref, rtol=tol, atol=tol * w_ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb,b,packed", CASES + BIG)
@pytest.mark.parametrize("relative", [False, True])
def test_damped_inverse_kernel(emu, dtype, nb, b, packed, relative, gen):
    _skip_if_refused(torch.float64, b)  # it computes in float64 whatever it writes
    g = torch.randn(2 * b + 1, nb * b, generator=gen, dtype=torch.float64)
    gram = torch.zeros(nb, b, b, dtype=torch.float64)
    reference.gram_update_(gram, g)
    if nb > 1:
        gram[nb - 1] -= 1e3 * torch.eye(b, dtype=torch.float64)  # the last block is indefinite
    m = float(g.shape[0])
    mode = "relative" if relative else "absolute"
    ref, ok_ref = reference.gram_inverse(gram, m, 1e-2, mode, torch.float64)
    out, okf = _poisoned(nb, b, b, dtype=dtype), _poisoned(nb, dtype=torch.int32)
    rc = _fn(emu, "damped_inverse", dtype)(
        _ptr(gram), nb, b, 1.0 / m, 1e-2, int(relative), _ptr(out), _ptr(okf), int(packed)
    )
    assert rc == 0
    assert torch.equal(okf.bool(), ok_ref) and bool(okf[nb - 1]) == (nb == 1)
    good = ok_ref.nonzero().flatten()
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out[good].double(), ref[good], rtol=tol, atol=tol * ref[good].abs().max().item())


def test_bad_launches_are_refused(emu):
    """Sizes outside what the kernels hold are refused with an error, nothing written."""
    h = _poisoned(1, 4, 4, dtype=torch.float32)
    g = torch.zeros(1, 4)
    assert _fn(emu, "woodbury", torch.float32)(_ptr(h), _ptr(g), 1, 257, 1, 4, 1.0, 0) != 0
    assert torch.isnan(h).all()


@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,out,inp",
    [(5, 24, 64), (130, 136, 128), (70, 100, 192)],  # partial tiles; out % 8 != 0 last
)
def test_spmm24_kernels(emu, variant, dtype, tokens, out, inp, gen):
    """The 2:4 kernels (1 = simple, 2 = pipelined, 3 = pipelined with 256-token tiles) against
    the dense product of the packed weight."""
    w = torch.randn(out, inp, generator=gen)
    mask = nm_mask(w)
    mask[1, 4:8] = torch.tensor([False, True, False, False])  # a group keeping one value
    p = ok.pack_nm(w.to(dtype), mask)
    dense, x, bias = spmm_inputs(w, mask, dtype, tokens, gen)
    for gelu in (0, 1):
        got = _poisoned(tokens, out, dtype=dtype)
        rc = emu.emu_spmm24(
            _ptr(x),
            _ptr(p.a),
            _ptr(p.c),
            _ptr(bias),
            _ptr(got),
            tokens,
            out,
            inp,
            gelu,
            int(dtype == torch.bfloat16),
            variant,
        )
        assert rc == 0
        want = linear_ref(x, dense, bias, bool(gelu))
        tol = 1e-2 if dtype == torch.float16 else 5e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    if variant >= 2:  # in_features % 64 != 0 is refused by the pipelined kernel
        assert emu.emu_spmm24(_ptr(x), _ptr(p.a), _ptr(p.c), None, _ptr(got), tokens, out, inp - 32, 0, 0, 2) != 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,out,inp,density",
    # output tiles of 64, 32 and 16 rows (from K), partial token and output tiles, out % 8 != 0,
    # an empty weight
    [(5, 24, 64, 0.2), (70, 100, 128, 0.3), (130, 40, 1600, 0.2), (3, 16, 832, 0.5), (9, 8, 64, 0.0)],
)
def test_spmm_bitmap_kernel(emu, dtype, tokens, out, inp, density, gen):
    """The bitmap kernel (weight tile decompressed into shared memory, dense mma) against the
    dense product of the packed weight."""
    w = torch.randn(out, inp, generator=gen)
    mask = torch.rand(out, inp, generator=gen) < density
    mask[0, :32] = True  # a full chunk
    if density == 0.0:
        mask[:] = False
    p = ok.pack_bitmap(w.to(dtype), mask)
    dense, x, bias = spmm_inputs(w, mask, dtype, tokens, gen)
    smem = [2 * (bo * (inp + 8) + 3 * 64 * 72) + 8 * bo * (inp // 32) for bo in (64, 32, 16)]
    assert emu.emu_spmm_bitmap_tile(inp) == next(bo for bo, b in zip((64, 32, 16), smem) if b <= 128 * 1024)
    vals = p.c if p.c.numel() else torch.zeros(1, dtype=dtype)
    for gelu in (0, 1):
        got = _poisoned(tokens, out, dtype=dtype)
        rc = emu.emu_spmm_bitmap(
            _ptr(x),
            _ptr(p.a),
            _ptr(p.b),
            _ptr(vals),
            _ptr(bias),
            _ptr(got),
            tokens,
            out,
            inp,
            gelu,
            int(dtype == torch.bfloat16),
        )
        assert rc == 0
        want = linear_ref(x, dense, bias, bool(gelu))
        tol = 1e-2 if dtype == torch.float16 else 5e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item() / 10))
    assert emu.emu_spmm_bitmap_tile(96) == 0  # K % 64 != 0: not this kernel


@pytest.mark.slow
def test_no_data_races_under_thread_sanitizer(tmp_path):
    """Every emulated kernel once under ThreadSanitizer: no shared-memory access unordered by a
    barrier against another thread's write (tests/emu/race_check.cpp)."""
    cxx = compiler()
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++ or clang++)")
    exe = tmp_path / "race_check"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-fsanitize=thread", "-I", EMU, "-I", CSRC, "-x", "c++"]
    sources = [os.path.join(CSRC, f) for f in KERNELS] + [os.path.join(EMU, "race_check.cpp")]
    r = subprocess.run([*cmd, *sources, "-o", str(exe)], capture_output=True, text=True)
    if r.returncode and "tsan" in r.stderr.lower():
        pytest.skip("no ThreadSanitizer runtime for this compiler")
    assert r.returncode == 0, r.stderr[-4000:]
    run = subprocess.run(
        [str(exe)], capture_output=True, text=True, env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1")
    )
    report = run.stdout + run.stderr
    assert "ThreadSanitizer" not in report, report[-6000:]
    assert run.returncode == 0 and "launch status 0" in report, report[-2000:]


@pytest.mark.slow
def test_packed_inverse_past_float32_range_is_refused(emulated_cuda, gen):
    """The packed damped-inverse kernel (B > 128) checks its entries as stored, as the register
    tile does (tests/test_backends.py): a float32 inverse past the range is refused."""
    inverse_past_float32_range_is_refused("cuda", "cpu", gen, b=136)
