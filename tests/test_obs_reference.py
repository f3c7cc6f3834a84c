"""The reference OBS ops against the closed forms of SPEC §3."""

import math

import pytest
import torch
from conftest import random_fisher_inverse

import ovit_kernels as ok


def joint_obs(w: torch.Tensor, h: torch.Tensor, s: list[int]) -> tuple[torch.Tensor, float]:
    """w − H[:,S] H[S,S]⁻¹ w_S and ½ w_Sᵀ H[S,S]⁻¹ w_S for one block."""
    idx = torch.tensor(s, dtype=torch.int64)
    hss = h[idx][:, idx]
    x = torch.cholesky_solve(w[idx].unsqueeze(-1), torch.linalg.cholesky(hss)).squeeze(-1)
    out = w - h[:, idx] @ x
    out[idx] = 0
    return out, 0.5 * float(w[idx] @ x)


@pytest.mark.parametrize("nb,b", [(3, 8), (1, 12), (4, 5)])
def test_greedy_elimination_is_joint_obs(nb, b, gen):
    _, h = random_fisher_inverse(nb, b, 3 * b, 0.1, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    w_in = w.clone()
    order, loss = ok.obs_prune_order(w, h)
    assert torch.equal(w, w_in)
    assert order.shape == (nb, b) and order.dtype == torch.int64 and loss.dtype == torch.float64
    assert (loss[:, 1:] >= loss[:, :-1]).all()
    for blk in range(nb):
        assert sorted(order[blk].tolist()) == list(range(b))
        # the first step picks argmin of w² / diag(H)
        assert order[blk, 0] == torch.argmin(w[blk] ** 2 / h[blk].diagonal())
        for t in (1, b // 2, b - 1):
            s = order[blk, :t].tolist()
            w_joint, c_joint = joint_obs(w[blk], h[blk], s)
            assert math.isclose(loss[blk, t - 1].item(), c_joint, rel_tol=1e-8, abs_tol=1e-12)
            counts = torch.zeros(nb, dtype=torch.int64)
            counts[blk] = t
            w_rec, keep = ok.obs_reconstruct(w, h, order, counts)
            torch.testing.assert_close(w_rec[blk], w_joint, rtol=1e-8, atol=1e-10)
            assert keep[blk].sum() == b - t and not keep[blk, order[blk, :t]].any()


def test_each_greedy_step_is_the_best_single_step(gen):
    """Step t+1 picks the entry with the smallest joint-OBS loss increase given S_t."""
    _, h = random_fisher_inverse(1, 10, 30, 0.05, gen)
    w = torch.randn(1, 10, generator=gen, dtype=torch.float64)
    order, loss = ok.obs_prune_order(w, h)
    chosen = order[0].tolist()
    for t in range(1, 10):
        base = chosen[:t]
        cands = [j for j in range(10) if j not in base]
        costs = [joint_obs(w[0], h[0], base + [j])[1] for j in cands]
        assert cands[min(range(len(cands)), key=costs.__getitem__)] == chosen[t]


def test_scores_and_independent_update(gen):
    _, h = random_fisher_inverse(2, 6, 12, 0.1, gen)
    w = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    rho = ok.obs_scores(w, h)
    torch.testing.assert_close(rho, w**2 / (2 * h.diagonal(dim1=1, dim2=2)))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, 0] = True
    out = ok.obs_update_independent(w, h, mask)
    for blk in range(2):
        s = mask[blk].nonzero().flatten()
        d = h[blk].diagonal()
        exp = w[blk] - h[blk][:, s] @ (w[blk, s] / d[s])
        exp[s] = 0
        torch.testing.assert_close(out[blk], exp)
    # a single pruned entry: the independent update is the exact OBS step
    mask1 = torch.zeros(2, 6, dtype=torch.bool)
    mask1[:, 2] = True
    torch.testing.assert_close(ok.obs_update_independent(w, h, mask1)[0], joint_obs(w[0], h[0], [2])[0])


def test_mask_entries_are_eliminated_first_in_index_order(gen):
    _, h = random_fisher_inverse(3, 8, 20, 0.1, gen)
    w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, [6, 1, 3]] = True
    mask[2, 7] = True
    order, loss = ok.obs_prune_order(w, h, mask=mask)
    assert order[0, :3].tolist() == [1, 3, 6] and (loss[0, :3] == 0).all()
    assert order[2, 0] == 7 and loss[2, 0] == 0
    # the rest equals greedy elimination on weights with the masked entries zeroed and
    # the joint OBS solution for the whole set
    w0 = w.masked_fill(mask, 0)
    s = order[0, :5].tolist()
    _, c = joint_obs(w0[0], h[0], s)
    assert math.isclose(loss[0, 4].item(), c, rel_tol=1e-8)


@pytest.mark.parametrize("nm,b", [((2, 4), 8), ((1, 4), 12), ((3, 8), 16)])
def test_nm_every_group_keeps_exactly_n(nm, b, gen):
    n, m = nm
    nb = 3
    _, h = random_fisher_inverse(nb, b, 2 * b, 0.1, gen)
    w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
    mask = torch.zeros(nb, b, dtype=torch.bool)
    mask[1, 0] = True
    order, loss = ok.obs_prune_order(w, h, nm=nm, mask=mask)
    steps = b * (m - n) // m
    assert order.shape == (nb, steps)
    assert order[1, 0] == 0
    assert (loss[:, 1:] >= loss[:, :-1]).all()
    w_rec, keep = ok.obs_reconstruct(w, h, order, torch.full((nb,), steps))
    assert (keep.view(nb, b // m, m).sum(-1) == n).all()
    assert (w_rec[~keep] == 0).all()


def test_nm_mask_that_breaks_the_pattern_is_refused(gen):
    _, h = random_fisher_inverse(1, 8, 10, 0.1, gen)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="N:M group"):
        ok.obs_prune_order(torch.randn(1, 8, dtype=torch.float64), h, nm=(2, 4), mask=mask)
    with pytest.raises(ValueError, match="tile"):
        ok.obs_prune_order(torch.randn(1, 8, dtype=torch.float64), h, nm=(2, 3))


def test_prune_counts_exact_k_prefix_and_layers(gen):
    layers = []
    for nb, b in [(3, 8), (5, 4), (1, 16)]:
        _, h = random_fisher_inverse(nb, b, 2 * b, 0.1, gen)
        w = torch.randn(nb, b, generator=gen, dtype=torch.float64)
        layers.append(ok.obs_prune_order(w, h)[1])
    total = sum(x.numel() for x in layers)
    for s in (0.0, 0.1, 0.5, 0.77, 0.999):
        counts = ok.prune_counts(layers, s)
        assert sum(int(c.sum()) for c in counts) == math.floor(s * total + 0.5)
        # prefix: every selected loss is <= every unselected loss (global threshold)
        sel = torch.cat([x[torch.arange(x.shape[1]) < c[:, None]] for x, c in zip(layers, counts)])
        rest = torch.cat([x[torch.arange(x.shape[1]) >= c[:, None]] for x, c in zip(layers, counts)])
        if sel.numel() and rest.numel():
            assert sel.max() <= rest.min()
    single = ok.prune_counts(layers[0], 0.5)
    assert isinstance(single, torch.Tensor) and int(single.sum()) == 12


def test_prune_counts_ties_and_exclude():
    loss = torch.zeros(2, 4, dtype=torch.float64)
    # all tied: (layer, block, step) order decides, so block 0 fills first
    assert ok.prune_counts(loss, 0.5).tolist() == [4, 0]
    c = ok.prune_counts([loss, loss], 0.25)
    assert c[0].tolist() == [4, 0] and c[1].tolist() == [0, 0]
    # excluded (padding) entries are pruned anyway and do not count in N_total
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 5.0, 6.0]])
    c = ok.prune_counts(x, 0.5, exclude=torch.tensor([1, 2]))
    assert c.tolist() == [4, 2]  # N_total = 3 + 2 = 5, K = 3: losses 1, 2, 3, plus the padding


def test_obs_errors(gen):
    _, h = random_fisher_inverse(2, 4, 8, 0.1, gen)
    w = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        ok.obs_prune_order(w[:, :3], h)
    with pytest.raises(TypeError, match="floating"):
        ok.obs_scores(w.long(), h)
    with pytest.raises(TypeError, match="float32, float64"):
        ok.obs_scores(w, h.half())
    with pytest.raises(TypeError, match="bool"):
        ok.obs_prune_order(w, h, mask=torch.zeros(2, 4))
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            ok.prune_counts(torch.zeros(2, 4), s)
    with pytest.raises(ValueError, match="NaN"):
        ok.prune_counts(torch.tensor([[float("nan")]]), 0.5)
    order, _ = ok.obs_prune_order(w, h)
    with pytest.raises(ValueError, match="counts"):
        ok.obs_reconstruct(w, h, order, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="repeats"):
        ok.obs_reconstruct(w, h, torch.zeros(2, 4, dtype=torch.int64), torch.tensor([1, 1]))
    bad_h = h.clone()
    bad_h[1, 2, 2] = -1.0
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"\[1\]"):
        ok.obs_prune_order(w, bad_h)
    if torch.cuda.is_available():  # mixed devices
        with pytest.raises(ValueError, match="same device"):
            ok.obs_scores(w.cuda(), h)


def test_mixed_devices_are_refused_without_a_gpu(gen):
    _, h = random_fisher_inverse(1, 4, 8, 0.1, gen)
    w = torch.randn(1, 4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="same device"):
        ok.obs_scores(w, h)


def test_indefinite_pivot_is_retried_in_float64_then_reported(gen):
    """A float32 block whose downdates break down is recomputed in float64; an indefinite
    block that even float64 cannot handle is reported by index."""
    _, h = random_fisher_inverse(2, 6, 12, 0.1, gen)
    w = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    # positive diagonal but indefinite: the second pivot goes negative
    bad = h.clone()
    bad[1] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64).kron(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[1\]"):
        ok.obs_prune_order(w.float(), bad.float())
    order64, loss64 = ok.obs_prune_order(w, h)
    order32, loss32 = ok.obs_prune_order(w.float(), h.float())
    assert torch.equal(order32, order64)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-4, atol=1e-6)


def test_reference_works_a_range_of_blocks_at_a_time(monkeypatch, gen):
    """The reference bounds its temporaries by processing ranges of blocks: one block per range
    gives the same results as all blocks at once."""
    from conftest import elimination_inputs

    from ovit_kernels import reference

    w, h, mask, nm = elimination_inputs(5, 12, "nm+mask", gen)
    counts = torch.tensor([0, 3, 7, 8, 5])
    g = torch.randn(30, 60, generator=gen, dtype=torch.float64)
    gram = torch.einsum("kni,knj->nij", g.view(30, 5, 12), g.view(30, 5, 12))
    whole = (
        reference.obs_prune_order(w, h, mask, nm),
        reference.gram_inverse(gram, 30.0, 1e-2, "relative", torch.float64),
    )
    o_whole = reference.obs_prune_order(w, h, None, None)[0]
    r_whole = reference.obs_reconstruct(w, h, o_whole, counts)
    monkeypatch.setattr(reference, "PIECE_BYTES", 1)
    pieces = (
        reference.obs_prune_order(w, h, mask, nm),
        reference.gram_inverse(gram, 30.0, 1e-2, "relative", torch.float64),
    )
    for a, b in zip([*whole[0], *whole[1]], [*pieces[0], *pieces[1]]):
        assert torch.equal(a, b)
    for a, b in zip(r_whole, reference.obs_reconstruct(w, h, o_whole, counts)):
        assert torch.equal(a, b)


def test_prune_counts_equals_a_stable_sort_with_many_ties(gen):
    """The selection (k-th value, then ties in (layer, block, step) order) picks exactly what a
    stable sort of all cumulative losses would, on losses quantised to force many ties."""
    layers = [torch.randint(0, 6, (nb, 12), generator=gen).double().cumsum(1) for nb in (5, 3, 7)]
    flat = torch.cat([x.flatten() for x in layers])
    owner = torch.cat([torch.arange(x.shape[0]).repeat_interleave(12) + off for x, off in zip(layers, (0, 5, 8))])
    for s in (0.1, 0.37, 0.5, 0.83, 0.99):
        k = math.floor(s * flat.numel() + 0.5)
        want = torch.bincount(owner[torch.sort(flat, stable=True).indices[:k]], minlength=15)
        got = torch.cat(ok.prune_counts(layers, s, backend="reference"))
        assert torch.equal(got, want), s


def test_scores_and_independent_update_refuse_an_indefinite_inverse(gen):
    """A block with a positive diagonal that is not positive definite (or not symmetric) is
    refused by name; check_pd=False skips the factorisation for inverses known to be fine."""
    _, h = random_fisher_inverse(3, 6, 12, 0.1, gen)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    prune = torch.zeros(3, 6, dtype=torch.bool)
    prune[:, :2] = True
    bad = h.clone()
    bad[2] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64).kron(torch.eye(3, dtype=torch.float64))
    for fn in (lambda x: ok.obs_scores(w, x), lambda x: ok.obs_update_independent(w, x, prune)):
        with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[2\]"):
            fn(bad)
        asym = h.clone()
        asym[0, 0, 1] += 0.5
        with pytest.raises(ok.NotPositiveDefiniteError, match=r"block\(s\) \[0\]"):
            fn(asym)
        fn(h)
        fn(h.float())
    ok.obs_scores(w, bad, check_pd=False)  # the caller vouches for it
