"""Test configuration: Triton kernels run through the interpreter on CPU (set before any
``triton.jit`` decorates a kernel); CUDA tests skip where there is no GPU."""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OVIT_POISON", "1")
os.environ.pop("OVIT_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory):
    """The CUDA kernel sources built as host C++ against the SIMT emulator (tests/emu)."""
    from emu.emulator import build

    lib = build(str(tmp_path_factory.mktemp("emu")))
    if isinstance(lib, str):
        pytest.skip(lib)
    return lib


_emulated_cuda_module = None


@pytest.fixture
def emulated_cuda(request, monkeypatch):
    """``ovit_kernels.cuda_backend`` over the emulated ``_C`` (tests/emu/emulator.py), accepting
    CPU tensors for the duration of the test: its custom ops, dispatch rules and self-check run
    with every kernel emulated. Skips where the real extension is built (the GPU tests cover it)."""
    global _emulated_cuda_module
    import importlib

    from ovit_kernels import _backend

    if _emulated_cuda_module is None:
        try:
            importlib.import_module("ovit_kernels._C")
            pytest.skip("the real CUDA extension is built here: the GPU tests cover the cuda backend")
        except ImportError:
            pass
        from emu.emulator import EmulatedC

        import ovit_kernels

        shim = EmulatedC(request.getfixturevalue("emu_lib"))  # built only where it is needed
        sys.modules["ovit_kernels._C"] = shim
        ovit_kernels._C = shim
        _backend._cache.pop("cuda", None)
        try:
            mod = _backend._load("cuda")
        finally:  # later imports see the real state again: no extension built
            del sys.modules["ovit_kernels._C"]
            del ovit_kernels._C
            sys.modules.pop("ovit_kernels.cuda_backend", None)
            ovit_kernels.__dict__.pop("cuda_backend", None)
            _backend._cache.pop("cuda", None)
        assert not isinstance(mod, str), mod
        _emulated_cuda_module = mod
    mod = _emulated_cuda_module
    monkeypatch.setitem(_backend._cache, "cuda", mod)
    monkeypatch.setattr(mod, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(mod, "status", lambda: _backend.BackendStatus(True, "ovit_kernels._C over the SIMT emulator"))
    return mod


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same global random state, so a model a test builds with random
    weights (timm, torch.nn) is the same whichever tests ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def gen():
    """A seeded generator: every test draws fresh but reproducible random inputs."""
    return torch.Generator().manual_seed(1234)


def spd_inverse(f: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive definite (..., B, B) blocks by Cholesky. Not torch.linalg.inv:
    MKL's batched LU (getrf) has hung on such inputs after the thread count changed in the same
    process, and has returned wrong values with a DLASWP parameter error."""
    return torch.cholesky_inverse(torch.linalg.cholesky(f))


def random_fisher_inverse(nb: int, b: int, m: int, damp: float, gen: torch.Generator, dtype=torch.float64):
    """Exact float64 H = (λI + GᵀG/m)⁻¹ per block from random gradients; returns (grads, H)."""
    g = torch.randn(m, nb * b, generator=gen, dtype=torch.float64)
    gb = g.view(m, nb, b)
    f = torch.einsum("kni,knj->nij", gb, gb) / m + damp * torch.eye(b, dtype=torch.float64)
    return g.to(dtype), spd_inverse(f).to(dtype)


def linear_ref(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """float32 act(x @ denseᵀ + bias): what every sparse × dense kernel must reproduce."""
    y = x.float() @ dense.float().T
    if bias is not None:
        y = y + bias.float()
    return torch.nn.functional.gelu(y) if gelu else y


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest |w| of every group of m consecutive inputs (True = kept)."""
    out, k = w.shape
    g = w.abs().view(out, k // m, m)
    idx = g.topk(n, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).view(out, k)


def spmm_inputs(w: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, tokens: int, gen: torch.Generator):
    """(dense, x, bias) for a sparse × dense check: the masked weight in ``dtype`` (as float32),
    and random activations (tokens, in) and bias (out) in ``dtype``."""
    dense = torch.where(mask, w.to(dtype), 0).float()
    x = torch.randn(tokens, w.shape[1], generator=gen).to(dtype)
    bias = torch.randn(w.shape[0], generator=gen).to(dtype)
    return dense, x, bias


def elimination_inputs(nb: int, b: int, variant: str, gen: torch.Generator):
    """(w, h, mask, nm) in float64 for an elimination check; ``variant`` is "plain", "mask",
    "nm" or "nm+mask" (masked weights in the first and last blocks)."""
    _, h = random_fisher_inverse(nb, b, 3 * b, 0.05, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    mask = None
    if "mask" in variant:
        mask = torch.zeros(nb, b, dtype=torch.bool)
        mask[0, b - 1] = True
        mask[nb - 1, 0] = True
        mask[0, b // 2] = True
    return w, h, mask, ((2, 4) if "nm" in variant else None)


def conditioned_gradients(nb: int, b: int, m: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """(m, nb·b) float64 gradients whose blocks' Fisher (1/m) Σ g gᵀ has eigenvalues spread
    over [1/cond, 1] (for m >= b), in a random basis per block."""
    q, _ = torch.linalg.qr(torch.randn(nb, b, b, generator=gen, dtype=torch.float64))
    ev = torch.logspace(0, -math.log10(cond), b, dtype=torch.float64)
    z = torch.randn(nb, m, b, generator=gen, dtype=torch.float64)
    return ((z * ev.sqrt()) @ q.transpose(1, 2)).permute(1, 0, 2).reshape(m, nb * b)


def lambda_max(g: torch.Tensor, b: int) -> float:
    """The largest eigenvalue of any block's (1/m) Σ g gᵀ."""
    m = g.shape[0]
    gb = g.view(m, -1, b)
    return float(torch.linalg.eigvalsh(torch.einsum("kni,knj->nij", gb, gb) / m).max())


def woodbury_accuracy_problems(b: int, gen: torch.Generator, nb: int = 2):
    """Problems on which float32 streaming Woodbury loses digits (λ/λ_max ∈ {1e-6, 1e-4}, m/B ∈
    {2, 6}, cond(F) ∈ {5, 1e3}): yields (grads (m, nb·b) float64, λ, exact float64 inverse)."""
    for ratio in (1e-6, 1e-4):
        for mb in (2, 6):
            for cond in (5.0, 1e3):
                g = conditioned_gradients(nb, b, mb * b, cond, gen)
                lam = ratio * lambda_max(g, b)
                m = g.shape[0]
                gb = g.view(m, nb, b)
                f = torch.einsum("kni,knj->nij", gb, gb) / m + lam * torch.eye(b, dtype=torch.float64)
                yield g, lam, spd_inverse(f)


def diag_rel_err(h: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error on the diagonals (NaN counts as infinite)."""
    e = (h.double().cpu().diagonal(dim1=1, dim2=2) / ref.diagonal(dim1=1, dim2=2) - 1).abs()
    return float("inf") if bool(torch.isnan(e).any()) else float(e.max())


def original_woodbury_fp32(g: torch.Tensor, b: int, lam: float) -> torch.Tensor:
    """The original code's float32 path: H = I/λ, then per gradient u = H g, v = u/√(m + gᵀu),
    H -= v vᵀ (``bench/baselines.py``)."""
    from baselines import fisher_rank_one

    return fisher_rank_one(g.float(), b, lam, g.shape[0])


def inverse_past_float32_range_is_refused(backend: str, dev: str, gen: torch.Generator, b: int = 12) -> None:
    """A relative λ on a block whose gradients nearly vanish (a dead unit) is as small as that
    block's Fisher, so its inverse (~1e43 here) lies past float32's range: compute() must refuse
    the block, naming it, instead of returning ±Inf, and the same Gram in float64 gives it."""
    import ovit_kernels as ok

    g = torch.randn(4, 3 * b, generator=gen, dtype=torch.float64)
    g[:, b : 2 * b] *= 1e-20
    acc = ok.FisherInverse(3 * b, b, 1e-3, damp_mode="relative", backend=backend, name="fc1")
    acc.update(g.to(dev))
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"'fc1': block\(s\) \[1\]\..*dtype=torch\.float64"):
        acc.compute()
    h = ok.FisherInverse.from_gram(acc.gram(), 4, 1e-3, damp_mode="relative", dtype=torch.float64,
                                   backend=backend).compute()  # fmt: skip
    assert torch.isfinite(h).all()
    assert h[1].diagonal().min() > 1e30 and h[0].diagonal().max() < 1e10


def image_folder(root, classes=("a", "b"), per_class: int = 4, size: int = 32, seed: int = 0) -> str:
    """An ImageFolder of random RGB PNGs under ``root/data``; returns its path."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    base = os.path.join(str(root), "data")
    for cls in classes:
        os.makedirs(os.path.join(base, cls), exist_ok=True)
        for i in range(per_class):
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(base, cls, f"{i}.png"))
    return base
