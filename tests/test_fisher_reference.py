"""The reference Fisher inverse against inv(λI + GᵀG/m) computed directly in float64."""

import pytest
import torch
from conftest import (
    diag_rel_err,
    original_woodbury_fp32,
    random_fisher_inverse,
    spd_inverse,
    woodbury_accuracy_problems,
)

import ovit_kernels as ok


def exact(g: torch.Tensor, b: int, damp: float, relative: bool = False) -> torch.Tensor:
    m, n = g.shape
    gb = g.double().view(m, n // b, b)
    f = torch.einsum("kni,knj->nij", gb, gb) / m
    lam = damp * f.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] if relative else damp
    return spd_inverse(f + lam * torch.eye(b, dtype=torch.float64))


@pytest.mark.parametrize("method", ["woodbury", "gram"])
@pytest.mark.parametrize("b,nb,m", [(8, 3, 5), (12, 1, 40), (7, 4, 20), (16, 2, 9)])
def test_fisher_inverse_matches_direct_inverse(method, b, nb, m, gen):
    g = torch.randn(m, nb * b, generator=gen, dtype=torch.float64)
    h = ok.fisher_inverse(g, b, 1e-2, method=method)
    assert h.shape == (nb, b, b) and h.dtype == torch.float64
    torch.testing.assert_close(h, exact(g, b, 1e-2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["woodbury", "gram", "auto"])
def test_chunked_equals_whole(method, gen):
    g = torch.randn(23, 60, generator=gen, dtype=torch.float64)
    whole = ok.fisher_inverse(g, 12, 1e-3, method=method)
    chunked = ok.fisher_inverse(iter(g.split(5)), 12, 1e-3, num_grads=23, method=method)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whole, exact(g, 12, 1e-3), rtol=1e-8, atol=1e-8)


def test_streaming_accumulator_one_row_at_a_time(gen):
    g = torch.randn(10, 32, generator=gen, dtype=torch.float64)
    acc = ok.FisherInverse(32, 8, 0.1, 10, method="woodbury", dtype=torch.float64)
    for row in g:
        acc.update(row)
    torch.testing.assert_close(acc.compute(), exact(g, 8, 0.1), rtol=1e-10, atol=1e-10)


def test_relative_damping_gram(gen):
    g = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    h = ok.fisher_inverse(g, 10, 1e-3, damp_mode="relative", method="gram")
    torch.testing.assert_close(h, exact(g, 10, 1e-3, relative=True), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="relative"):
        ok.fisher_inverse(g, 10, 1e-3, damp_mode="relative", method="woodbury")


def test_float32_gram_uses_float64_accumulation(gen):
    # λ/λ_max ≈ 1e-7: an fp32 Gram + Cholesky would lose percent-level accuracy here.
    g = torch.randn(64, 32, generator=gen, dtype=torch.float64) * 10
    ref = exact(g, 32, 1e-5)
    h = ok.fisher_inverse(g.float(), 32, 1e-5, method="gram")
    assert h.dtype == torch.float32
    rel = (h.double().diagonal(dim1=1, dim2=2) / ref.diagonal(dim1=1, dim2=2) - 1).abs().max()
    assert rel < 1e-5


def test_gram_update_in_pieces_equals_one_piece(monkeypatch, gen):
    """float32 chunks are widened to float64 a range of blocks at a time; the result is the same."""
    from ovit_kernels import reference

    g = torch.randn(9, 7 * 12, generator=gen)
    whole = torch.zeros(7, 12, 12, dtype=torch.float64)
    reference.gram_update_(whole, g)
    monkeypatch.setattr(reference, "GRAM_PIECE_BYTES", 9 * 12 * 8 * 2)  # two blocks per piece
    pieces = torch.zeros(7, 12, 12, dtype=torch.float64)
    reference.gram_update_(pieces, g)
    assert torch.equal(pieces, whole)
    gb = g.double().view(9, 7, 12)
    torch.testing.assert_close(whole, torch.einsum("kni,knj->nij", gb, gb))


def test_woodbury_update_in_place_row_order(gen):
    g, _ = random_fisher_inverse(2, 6, 4, 0.5, gen)
    h = torch.eye(6, dtype=torch.float64).repeat(2, 1, 1) / 0.5
    out = ok.woodbury_update_(h, g[:2], 4)
    assert out is h
    ok.woodbury_update_(h, g[2:], 4)
    torch.testing.assert_close(h, exact(g, 6, 0.5), rtol=1e-10, atol=1e-10)


def test_fisher_errors(gen):
    g = torch.randn(4, 30, generator=gen)
    with pytest.raises(ValueError, match="does not divide"):
        ok.fisher_inverse(g, 7)
    with pytest.raises(TypeError, match="floating"):
        ok.fisher_inverse(g.to(torch.int32), 6)
    bad = g.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ok.fisher_inverse(bad, 6)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        ok.fisher_inverse(bad, 6, method="woodbury")
    with pytest.raises(ValueError, match="damp"):
        ok.fisher_inverse(g, 6, 0.0)
    with pytest.raises(ValueError, match="num_grads"):
        ok.fisher_inverse(iter([g]), 6, method="woodbury")
    acc = ok.FisherInverse(30, 6, 1.0, num_grads=5)
    acc.update(g)
    with pytest.raises(ValueError, match="expected num_grads=5"):
        acc.compute()
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.randn(2, 31))
    with pytest.raises(ValueError, match="no gradients"):
        ok.FisherInverse(30, 6, 1.0).compute()


def test_not_positive_definite_is_reported():
    # A Woodbury state that is not positive definite (as after an fp32 breakdown) is caught.
    acc = ok.FisherInverse(8, 4, 1e-8, 1, method="woodbury", dtype=torch.float64, name="blocks.0.mlp.fc1")
    g = torch.zeros(1, 8, dtype=torch.float64)
    acc.update(g)
    acc._state[1, 2, 2] = -1.0
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"blocks.0.mlp.fc1.*\[1\]"):
        acc.compute()
    # A Gram block whose damped Fisher is indefinite fails its Cholesky and is named.
    acc = ok.FisherInverse(8, 4, 1e-3, method="gram", dtype=torch.float64)
    acc.update(torch.ones(1, 8, dtype=torch.float64))
    acc._state[0] = -torch.eye(4, dtype=torch.float64)
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"\[0\]"):
        acc.compute()


def test_damping_sweep_never_returns_nan_silently(gen):
    """λ/λ_max from 1e-2 to 1e-8: float64 Gram holds 1e-8 relative on diag(F⁻¹) everywhere;
    float32 Woodbury either holds 1e-3 or raises, it never returns NaN."""
    m, b = 48, 16
    g = torch.randn(m, 2 * b, generator=gen, dtype=torch.float64)
    gb = g.view(m, 2, b)
    lam_max = torch.linalg.eigvalsh(torch.einsum("kni,knj->nij", gb, gb) / m).max().item()
    for ratio in (1e-2, 1e-4, 1e-6, 1e-8):
        damp = ratio * lam_max
        ref = exact(g, b, damp).diagonal(dim1=1, dim2=2)
        h = ok.fisher_inverse(g.float(), b, damp, method="gram")
        assert (h.double().diagonal(dim1=1, dim2=2) / ref - 1).abs().max() < 1e-5
        try:
            h32 = ok.fisher_inverse(g.float(), b, damp, method="woodbury")
        except ok.NotPositiveDefiniteError:
            continue
        assert torch.isfinite(h32).all()
        if ratio >= 1e-4:
            assert (h32.double().diagonal(dim1=1, dim2=2) / ref - 1).abs().max() < 1e-3


@pytest.mark.parametrize("method", ["woodbury", "gram"])
def test_block_ranges_shard_the_inverse(method, gen):
    """Blocks are independent: accumulators holding disjoint block ranges of the same
    gradients, concatenated, give the whole inverse (how ranks of a distributed job split it)."""
    g = torch.randn(9, 7 * 6, generator=gen, dtype=torch.float64)
    whole = ok.fisher_inverse(g, 6, 1e-2, method=method)
    parts = []
    for rng in [(0, 3), (3, 4), (4, 7)]:
        acc = ok.FisherInverse(42, 6, 1e-2, 9, method=method, dtype=torch.float64, block_range=rng)
        for c in g.split(4):
            acc.update(c)
        parts.append(acc.compute())
    assert [p.shape[0] for p in parts] == [3, 1, 3]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="block_range"):
        ok.FisherInverse(42, 6, 1e-2, 9, block_range=(5, 9))


def test_float32_woodbury_beats_the_original_rank_one_path(gen):
    """The reference applies a call's gradients as rank-k steps in float64 and rounds the float32
    state once per call: on problems where the original's float32 rank-one path loses digits
    (λ/λ_max down to 1e-6), it stays at float32 rounding, and the state is exactly symmetric."""
    for g, lam, ref in woodbury_accuracy_problems(24, gen):
        b, m = 24, g.shape[0]
        h = (torch.eye(b) / lam).repeat(2, 1, 1)
        for chunk in g.float().split(32):
            ok.woodbury_update_(h, chunk, m, backend="reference")
        ours, orig = diag_rel_err(h, ref), diag_rel_err(original_woodbury_fp32(g, b, lam), ref)
        assert ours <= min(orig, 1e-5), (lam, m, ours, orig)
        assert torch.equal(h, h.transpose(1, 2))


def test_woodbury_rank_k_matches_rank_one_steps_in_float64(gen):
    """Rank-k chunks are the rank-one sequence in exact arithmetic: compare in float64 with a
    direct rank-one loop, across the chunk boundary (k = 150 > WOODBURY_RANK)."""
    from ovit_kernels import reference

    g = torch.randn(150, 3 * 10, generator=gen, dtype=torch.float64)
    h = torch.eye(10, dtype=torch.float64).repeat(3, 1, 1) * 4.0
    loop = h.clone()
    for row in g.view(150, 3, 10):
        u = torch.bmm(loop, row.unsqueeze(-1))
        loop -= u @ u.transpose(1, 2) / (150 + (row.unsqueeze(-1) * u).sum((1, 2))).view(3, 1, 1)
    reference.woodbury_update_(h, g, 150.0)
    torch.testing.assert_close(h, loop, rtol=1e-10, atol=1e-12)


def test_woodbury_block_that_lost_definiteness_becomes_nan(gen):
    """A state that is not positive definite makes the block NaN (which compute() reports)."""
    from ovit_kernels import reference

    h = torch.eye(6, dtype=torch.float64).repeat(2, 1, 1)
    h[1] *= -1.0
    reference.woodbury_update_(h, torch.ones(1, 12, dtype=torch.float64) * 10, 1.0)
    assert torch.isfinite(h[0]).all() and torch.isnan(h[1]).all()


@pytest.mark.parametrize("damp_mode", ["absolute", "relative"])
def test_fisher_quadratic_is_half_delta_f_delta(damp_mode, gen):
    """½ δᵀFδ from the Gram equals the same form with F = inverse of what FisherInverse returns
    for that Gram and damping (and a fully masked block takes the plain λ in relative mode)."""
    g = torch.randn(30, 5 * 8, generator=gen, dtype=torch.float64)
    g[:, 8:16] = 0  # a block that saw no gradient
    acc = ok.FisherInverse(40, 8, 1e-2, damp_mode=damp_mode, dtype=torch.float64)
    acc.update(g)
    gram = acc.gram().clone()
    f = spd_inverse(acc.compute())
    delta = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    want = 0.5 * torch.einsum("ni,nij,nj->n", delta, f, delta)
    torch.testing.assert_close(ok.fisher_quadratic(delta, gram, 30, 1e-2, damp_mode=damp_mode), want)
    with pytest.raises(ValueError, match="delta must have shape"):
        ok.fisher_quadratic(delta[:4], gram, 30, 1e-2)
    with pytest.raises(TypeError):
        ok.fisher_quadratic(delta, gram.float(), 30, 1e-2)


@pytest.mark.parametrize("damp", [1e-3, 1e-1])
def test_woodbury_with_fewer_gradients_than_announced(damp, gen):
    """A Woodbury state built for m gradients that saw only m' converts exactly to the inverse
    for m' (allow_fewer); without it, compute refuses."""
    g = torch.randn(7, 4 * 12, generator=gen, dtype=torch.float64)
    acc = ok.FisherInverse(48, 12, damp, 11, method="woodbury", dtype=torch.float64)
    acc.update(g)
    with pytest.raises(ValueError, match="expected num_grads=11"):
        acc.compute()
    got = acc.compute(allow_fewer=True)
    want = ok.fisher_inverse(g, 12, damp, method="gram", dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
