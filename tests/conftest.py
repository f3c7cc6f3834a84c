"""Test configuration: Triton kernels run through the interpreter on CPU (set before any
``triton.jit`` decorates a kernel); CUDA tests skip where there is no GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OVIT_POISON", "1")
os.environ.pop("OVIT_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


@pytest.fixture
def gen():
    """A seeded generator: every test draws fresh but reproducible random inputs."""
    return torch.Generator().manual_seed(1234)


def random_fisher_inverse(nb: int, b: int, m: int, damp: float, gen: torch.Generator, dtype=torch.float64):
    """Exact float64 H = (λI + GᵀG/m)⁻¹ per block from random gradients; returns (grads, H)."""
    g = torch.randn(m, nb * b, generator=gen, dtype=torch.float64)
    gb = g.view(m, nb, b)
    f = torch.einsum("kni,knj->nij", gb, gb) / m + damp * torch.eye(b, dtype=torch.float64)
    return g.to(dtype), torch.linalg.inv(f).to(dtype)


def linear_ref(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """float32 act(x @ denseᵀ + bias): what every sparse × dense kernel must reproduce."""
    y = x.float() @ dense.float().T
    if bias is not None:
        y = y + bias.float()
    return torch.nn.functional.gelu(y) if gelu else y
