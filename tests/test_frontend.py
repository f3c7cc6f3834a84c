"""The front-end ``ovit``: block layout, exact sparsity, the methods on a quadratic problem,
nothing changed on failure, timm models, memory planning, the demo and the CLI."""

import json
import math
import warnings

import pytest
import torch
from conftest import image_folder
from torch import nn

import ovit
from ovit.layers import PrunableLayer, block_layout
from ovit.models import TinyViT


def random_data(n_batches=12, batch=8, shape=(1, 8, 8), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]


def pruned_fraction(model, names):
    mods = dict(model.named_modules())
    tot = sum(mods[n].weight.numel() for n in names)
    zero = sum(int((mods[n].weight == 0).sum()) for n in names)
    return zero, tot


# --- SPEC §1 block layout ------------------------------------------------------------------------


def test_block_layout_rules():
    assert block_layout(64 * 192, 64) == ovit.Layout(64 * 192, 64, 192, 0)  # B divides
    assert block_layout(70 * 10, 64).block_size == 70  # smallest divisor >= B, within 2B
    lay = block_layout(131 * 137, 64)  # 131 and 137 are prime: no divisor in [64, 128]
    assert lay.block_size == 64 and lay.pad == lay.num_blocks * 64 - 131 * 137 and 0 < lay.pad < 64
    assert block_layout(30, 64) == ovit.Layout(30, 30, 1, 0)  # one block smaller than B
    # N:M: a divisor that is not a multiple of m is refused, padding is used instead
    lay = block_layout(66 * 7, 64, group=4)
    assert lay.block_size % 4 == 0 and lay.pad > 0


def test_padding_does_not_change_the_result(gen):
    """Padded entries (zero gradient, pre-pruned) are eliminated first at zero loss and leave
    the elimination, the counts and the reconstruction of the real entries unchanged."""
    lin = nn.Linear(7, 7)  # N = 49: no divisor in [8, 16], so blocks of 8 with 7 padded entries
    ly = PrunableLayer("x", lin, block_layout(49, 8))
    assert ly.layout == ovit.Layout(49, 8, 7, 7)
    wb = ly.blocks(lin.weight.detach().flatten().double())
    assert torch.equal(ly.unblock(wb).float(), lin.weight.detach())
    assert ly.pad_mask(torch.device("cpu")).sum() == 7

    from conftest import random_fisher_inverse

    import ovit_kernels as ok

    real = 5
    _, h5 = random_fisher_inverse(1, real, 12, 0.1, gen)
    h8 = torch.eye(8, dtype=torch.float64).unsqueeze(0) * 10.0  # padded rows: (1/λ) I, no coupling
    h8[:, :real, :real] = h5
    w5 = torch.randn(1, real, generator=gen, dtype=torch.float64)
    w8 = torch.cat([w5, torch.zeros(1, 3, dtype=torch.float64)], 1)
    pad = torch.tensor([[False] * real + [True] * 3])
    o5, l5 = ok.obs_prune_order(w5, h5)
    o8, l8 = ok.obs_prune_order(w8, h8, mask=pad)
    assert o8[0, :3].tolist() == [5, 6, 7] and (l8[0, :3] == 0).all()
    assert torch.equal(o8[:, 3:], o5)
    torch.testing.assert_close(l8[:, 3:], l5)
    c5 = ok.prune_counts(l5, 0.4)
    c8 = ok.prune_counts(l8, 0.4, exclude=torch.tensor([3]))
    assert int(c8) == int(c5) + 3
    r5, k5 = ok.obs_reconstruct(w5, h5, o5, c5)
    r8, k8 = ok.obs_reconstruct(w8, h8, o8, c8)
    torch.testing.assert_close(r8[:, :real], r5)
    assert torch.equal(k8[:, :real], k5) and not k8[:, real:].any()


# --- exact sparsity ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ovit.METHODS)
def test_exact_global_sparsity(method):
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=2, heads=2)
    names = [n for n, _ in ovit.select_layers(model)]
    rep = ovit.one_shot_prune(
        model,
        random_data(),
        0.6,
        method=method,
        block_size=16,
        num_grads=12,
        damp=1e-2,
        damp_mode="relative",
        progress=False,
    )
    zero, tot = pruned_fraction(model, names)
    k = math.floor(0.6 * tot + 0.5)
    assert rep.total_params == tot and rep.total_pruned == k
    assert zero >= k  # every pruned weight is zero (a kept weight may also happen to be 0)
    assert abs(rep.achieved_sparsity - 0.6) < 1e-3
    if method == "magnitude":
        assert all(abs(lr.sparsity - 0.6) < 1e-3 for lr in rep.layers)
    if method in ("ovit", "woodfisher"):
        assert rep.est_loss_increase is not None and rep.est_loss_increase >= 0
        assert rep.num_grads == 12 and rep.passes == 1
        assert set(rep.times) >= {"sampling", "fisher_inverse", "selection", "reconstruction", "total"}
    json.loads(rep.to_json())


@pytest.mark.parametrize("method", ["ovit", "woodfisher", "magnitude"])
def test_nm_pattern(method):
    torch.manual_seed(1)
    model = TinyViT(dim=32, depth=1, heads=2)
    rep = ovit.one_shot_prune(
        model,
        random_data(),
        method=method,
        pattern="2:4",
        block_size=16,
        num_grads=8,
        damp=1e-2,
        damp_mode="relative",
        progress=False,
    )
    assert rep.sparsity == 0.5 and rep.achieved_sparsity == 0.5
    for name, mod in ovit.select_layers(model):
        nz = (mod.weight.reshape(-1, 4) != 0).sum(1)
        assert (nz <= 2).all(), name
    with pytest.raises(ValueError, match="fixes the sparsity"):
        ovit.one_shot_prune(TinyViT(dim=32, depth=1, heads=2), random_data(), 0.7, pattern="2:4", progress=False)


# --- the methods on a quadratic problem ----------------------------------------------------------


def test_second_order_methods_beat_magnitude_on_a_quadratic_problem():
    """Least squares with inputs of very different scales, mildly correlated: the loss is
    exactly quadratic in the weights, so OBS-based pruning must lose less than magnitude
    pruning, and the correlation-aware oViT no more than WoodFisher."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 32, 4, 4096
    mix = torch.randn(d_in, d_in, generator=g) * 0.02 + torch.eye(d_in)
    scales = torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=g)]
    x = (torch.randn(n, d_in, generator=g) * scales) @ mix
    w_true = torch.randn(d_out, d_in, generator=g)
    y = x @ w_true.T + 0.5 * torch.randn(n, d_out, generator=g)
    w_opt = torch.linalg.lstsq(x, y).solution.T

    def loss_of(model):
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x), y))

    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]
    losses = {}
    for method in ("ovit", "woodfisher", "magnitude", "global_magnitude"):
        model = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            model.weight.copy_(w_opt)
        ovit.one_shot_prune(
            model,
            data,
            0.5,
            method=method,
            layers=[model],
            block_size=32,
            num_grads=128,
            damp=1e-3,
            damp_mode="relative",
            loss_fn=nn.functional.mse_loss,
            progress=False,
        )
        losses[method] = loss_of(model)
    assert losses["ovit"] < losses["magnitude"] and losses["ovit"] < losses["global_magnitude"]
    assert losses["woodfisher"] < losses["magnitude"]
    assert losses["ovit"] <= losses["woodfisher"]
    assert losses["woodfisher"] < 0.2 * losses["magnitude"]


# --- failure leaves the model untouched ------------------------------------------------------------


def test_failed_run_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    data = random_data()
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])
    with pytest.raises(ValueError, match="NaN"):
        ovit.one_shot_prune(model, data, 0.5, block_size=16, num_grads=8, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ovit.one_shot_prune(model, data, 1.0, progress=False)
    with pytest.raises(ValueError, match="method"):
        ovit.one_shot_prune(model, data, 0.5, method="random", progress=False)
    with pytest.raises(ValueError, match="no Linear/Conv2d"):
        ovit.one_shot_prune(model, data, 0.5, layers="nothing_matches", progress=False)


# --- timm models ---------------------------------------------------------------------------------

TIMM_MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=1)),
    ("deit_tiny_patch16_224", dict(img_size=32, depth=1)),
    ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=32, window_size=7)),
]


@pytest.mark.parametrize("name,kw", TIMM_MODELS, ids=[m[0] for m in TIMM_MODELS])
def test_timm_models(name, kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw)
    names = [n for n, _ in ovit.select_layers(model)]
    assert any(n.endswith("attn.qkv") for n in names) and any(n.endswith("mlp.fc2") for n in names)
    s = kw["img_size"]
    data = random_data(n_batches=4, batch=2, shape=(3, s, s), classes=5)
    rep = ovit.one_shot_prune(
        model, data, 0.5, block_size=32, num_grads=4, damp=1e-3, damp_mode="relative", progress=False
    )
    zero, tot = pruned_fraction(model, names)
    assert rep.total_pruned == math.floor(0.5 * tot + 0.5) and zero >= rep.total_pruned
    assert torch.isfinite(model(data[0][0])).all()


# --- memory planning -------------------------------------------------------------------------------


def test_layer_groups_when_the_fisher_does_not_fit():
    torch.manual_seed(0)
    ref = TinyViT(dim=32, depth=2, heads=2)
    data = random_data()
    a = TinyViT(dim=32, depth=2, heads=2)
    a.load_state_dict(ref.state_dict())
    b = TinyViT(dim=32, depth=2, heads=2)
    b.load_state_dict(ref.state_dict())
    kw = dict(block_size=16, num_grads=8, damp=1e-2, damp_mode="relative", progress=False)
    r1 = ovit.one_shot_prune(a, data, 0.5, **kw)
    r2 = ovit.one_shot_prune(b, data, 0.5, memory_budget=5_000_000, **kw)
    assert r1.passes == 1 and r2.passes > 1 and any("passes" in n for n in r2.notes)
    assert r2.planned_peak_bytes <= 5_000_000
    for (k, v), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6, msg=k)


# --- demo and CLI ----------------------------------------------------------------------------------


def test_demo_fast_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from ovit.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        seeds=(0,),
        sparsities=(0.5,),
        epochs=1,
        num_grads=8,
        damps=(("absolute", 1e-6), ("relative", 1e-2)),
        out=str(tmp_path / "out"),
    )
    out = run_demo(cfg, log=lambda *_: None)
    assert set(out["results"]) == set(ovit.METHODS)
    for m in ("ovit", "woodfisher"):  # each second-order method at its own λ from the grid, named
        assert out["chosen_damp"][m]["0.5"] in ("abs 1e-06", "rel 1e-02")
        assert set(out["search"][m]["0.5"]) == {"abs 1e-06", "rel 1e-02"}
    assert out["chosen_damp"]["magnitude"]["0.5"] == "-"
    assert (tmp_path / "out" / "digits_accuracy.png").stat().st_size > 1000
    assert list((tmp_path / "cache" / "ovit").glob("digits_vit_*.pt"))


def test_cli_prune_on_an_image_folder(tmp_path):
    pytest.importorskip("timm")
    from ovit.cli import main

    image_folder(tmp_path, ("a", "b"), 4, 32)
    out = tmp_path / "pruned.pt"
    rc = main(
        [
            "prune",
            "--model",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            json.dumps({"img_size": 32, "depth": 1, "num_classes": 2}),
            "--data",
            str(tmp_path / "data"),
            "--sparsity",
            "0.5",
            "--method",
            "ovit",
            "--block-size",
            "32",
            "--num-grads",
            "4",
            "--grad-batch-size",
            "2",
            "--damp",
            "1e-3",
            "--damp-mode",
            "relative",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads((tmp_path / "pruned.json").read_text())
    assert rep["method"] == "ovit" and abs(rep["achieved_sparsity"] - 0.5) < 1e-3
    sd = torch.load(out, weights_only=True)
    assert (sd["blocks.0.mlp.fc1.weight"] == 0).float().mean() > 0.2


def test_the_pruner_runs_on_the_triton_backend_too():
    """The front-end only talks to the public API: the same pruning through the Triton kernels
    (interpreted on CPU) gives the same model as through the reference."""
    torch.manual_seed(0)
    ref = TinyViT(dim=32, depth=1, heads=2)
    data = random_data(n_batches=6)
    out = {}
    for backend in ("reference", "triton"):
        m = TinyViT(dim=32, depth=1, heads=2)
        m.load_state_dict(ref.state_dict())
        rep = ovit.one_shot_prune(
            m,
            data,
            0.5,
            block_size=16,
            num_grads=6,
            damp=1e-2,
            damp_mode="relative",
            layers=["blocks.0.attn.proj"],
            backend=backend,
            progress=False,
        )
        out[backend] = (m.state_dict(), rep)
    (sd_r, rep_r), (sd_t, rep_t) = out["reference"], out["triton"]
    assert rep_r.total_pruned == rep_t.total_pruned
    for k in sd_r:
        torch.testing.assert_close(sd_t[k], sd_r[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("method", ["ovit", "woodfisher", "magnitude"])
def test_nm_with_padded_blocks(method):
    """N = 4·131 has no divisor in [64, 128]: blocks of 64 with 52 padded entries (whole
    groups of 4). Every real group still keeps exactly 2 of 4."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 131)
    x = torch.randn(256, 4)
    data = [(x[i : i + 16], torch.randn(16, 131)) for i in range(0, 256, 16)]
    rep = ovit.one_shot_prune(
        lin,
        data,
        method=method,
        pattern="2:4",
        layers=[lin],
        block_size=64,
        num_grads=16,
        damp=1e-2,
        damp_mode="relative",
        loss_fn=nn.functional.mse_loss,
        progress=False,
    )
    assert rep.layers[0].pad == 52
    assert rep.total_pruned == 2 * 131
    assert ((lin.weight != 0).sum(1) == 2).all()


def test_conv_layers_regex_and_short_data():
    """A regex selecting a Conv2d and a Linear; a one-shot iterator that runs out before
    num_grads (the Gram method uses what it got and says so); re-cut gradient batches."""
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    names = [n for n, _ in ovit.select_layers(model, r"patch_embed\.proj|mlp\.fc1")]
    assert names == ["patch_embed.proj", "blocks.0.mlp.fc1"]
    data = iter(random_data(n_batches=5, batch=8))
    rep = ovit.one_shot_prune(
        model,
        data,
        0.5,
        layers=r"patch_embed\.proj|mlp\.fc1",
        block_size=16,
        num_grads=20,
        grad_batch_size=4,
        damp=1e-2,
        damp_mode="relative",
        progress=False,
    )
    assert rep.num_grads == 10  # 5 batches of 8 re-cut into 10 gradients of 4
    assert any("ran out" in n for n in rep.notes)
    zero, tot = pruned_fraction(model, names)
    assert rep.total_pruned == math.floor(0.5 * tot + 0.5) and zero >= rep.total_pruned


def test_batches_recut_and_cycle():
    from ovit.sampling import batches

    data = random_data(n_batches=3, batch=5)
    it = batches(data, grad_batch_size=4)
    sizes = [next(it)[0].shape[0] for _ in range(6)]  # a list is iterated again: never runs out
    assert sizes == [4] * 6
    with pytest.raises(TypeError, match="pairs"):
        next(batches([torch.zeros(3)]))


def test_gradient_chunking_does_not_change_the_result():
    """The accumulator update size is a speed knob only: default (auto) and 5-gradient chunks
    give the same pruned model."""
    from ovit.pruner import _auto_chunk

    torch.manual_seed(0)
    base = TinyViT(dim=32, depth=1, heads=2)
    models = [base, TinyViT(dim=32, depth=1, heads=2)]
    models[1].load_state_dict(base.state_dict())
    for mdl, chunk in zip(models, (None, 5)):
        ovit.one_shot_prune(
            mdl, random_data(), 0.5, block_size=16, num_grads=12, damp=1e-2, grad_chunk=chunk, progress=False
        )
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(a == 0, b == 0), name
    with pytest.raises(ValueError, match="grad_chunk"):
        ovit.one_shot_prune(TinyViT(dim=32, depth=1, heads=2), random_data(), 0.5, block_size=16, grad_chunk=0)
    # the default sizes chunks from the block size: B = 192 → 128 (float64 Gram), 64 (float32 Woodbury)
    fake = type("L", (), {"layout": type("Lay", (), {"block_size": 192})()})()
    assert _auto_chunk([fake], "gram") == 128 and _auto_chunk([fake], "woodbury") == 64


def test_repeated_data_is_reported_and_warned():
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    data = random_data(n_batches=3)
    kw = dict(block_size=16, damp=1e-2, damp_mode="relative", progress=False)
    with pytest.warns(RuntimeWarning, match="gives only 3 gradients for 7"):
        rep = ovit.one_shot_prune(model, data, 0.5, num_grads=7, **kw)
    assert rep.num_grads == 7 and rep.distinct_batches == 3 and any("distinct ones" in n for n in rep.notes)
    # re-cut batches: 3 batches of 8 samples give 6 batches of 4
    with pytest.warns(RuntimeWarning, match="gives only 6 gradients"):
        rep = ovit.one_shot_prune(TinyViT(dim=32, depth=1, heads=2), data, 0.5, num_grads=8, grad_batch_size=4, **kw)
    assert rep.distinct_batches == 6
    # enough data: no warning, nothing went round
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = ovit.one_shot_prune(TinyViT(dim=32, depth=1, heads=2), random_data(n_batches=5), 0.5, num_grads=5, **kw)
    assert rep.distinct_batches in (None, 5)
    with pytest.raises(ValueError, match="fewer samples than one batch"):
        ovit.one_shot_prune(TinyViT(dim=32, depth=1, heads=2), data, 0.5, num_grads=4, grad_batch_size=100, **kw)


def test_fisher_cache_applies_each_calls_damping():
    """The cache holds the damping-free Gram: a second damping reuses the gradients and equals a
    fresh run at that damping (a damping search samples once)."""
    torch.manual_seed(0)
    ref = TinyViT(dim=32, depth=1, heads=2)
    data = random_data(n_batches=8)
    kw = dict(block_size=16, num_grads=8, progress=False)
    cache: dict = {}
    for damp in (1e-4, 1e-1):
        a = TinyViT(dim=32, depth=1, heads=2)
        a.load_state_dict(ref.state_dict())
        ovit.one_shot_prune(a, data, 0.6, damp=damp, fisher_cache=cache, **kw)
        b = TinyViT(dim=32, depth=1, heads=2)
        b.load_state_dict(ref.state_dict())
        ovit.one_shot_prune(b, data, 0.6, damp=damp, **kw)
        for (k, v), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(v, u, msg=k)
    assert all({"gram", "num_grads"} <= set(e) and e["last"][1] == 1e-1 for e in cache.values())


@pytest.mark.parametrize("method", ["ovit", "woodfisher"])
@pytest.mark.parametrize("cached", [False, True])
def test_reported_loss_is_the_quadratic_model_of_the_change(method, cached):
    """``est_loss_increase`` equals ½ Σ_b δ_bᵀ F_b δ_b computed independently: F from a loop of
    mini-batch gradients, δ the change the run made to the weights (with and without the cache,
    which takes WoodFisher's loss from the Gram instead of factorising the inverse)."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out, b, m, lam = 24, 3, 12, 40, 1e-2
    x = torch.randn(m * 4, d_in, generator=g) * torch.logspace(-0.5, 0.5, d_in)
    y = torch.randn(m * 4, d_out, generator=g)
    data = [(x[i : i + 4], y[i : i + 4]) for i in range(0, m * 4, 4)]
    layer = nn.Linear(d_in, d_out, bias=False)
    w0 = layer.weight.detach().clone()
    grads = []
    for xb, yb in data:
        layer.zero_grad()
        nn.functional.mse_loss(layer(xb), yb).backward()
        grads.append(layer.weight.grad.detach().flatten().double())
    gm = torch.stack(grads).view(m, -1, b)
    fisher = torch.einsum("mni,mnj->nij", gm, gm) / m + lam * torch.eye(b, dtype=torch.float64)
    kw = dict(method=method, block_size=b, num_grads=m, damp=lam, loss_fn=nn.functional.mse_loss,
              progress=False, fisher_dtype=torch.float64)  # fmt: skip
    cache: dict | None = {} if cached else None
    if cached:  # fill the cache on a copy, then prune from it
        other = nn.Linear(d_in, d_out, bias=False)
        other.load_state_dict(layer.state_dict())
        ovit.one_shot_prune(other, data, 0.3, layers=[other], fisher_cache=cache, **kw)
    rep = ovit.one_shot_prune(layer, data, 0.5, layers=[layer], fisher_cache=cache, **kw)
    delta = (layer.weight.detach() - w0).flatten().double().view(-1, b)
    want = 0.5 * float(torch.einsum("ni,nij,nj->", delta, fisher, delta))
    assert rep.est_loss_increase == pytest.approx(want, rel=1e-6)


# --- what a new user hit ---------------------------------------------------------------------------


def test_bad_arguments_and_weights_are_refused_clearly():
    model = TinyViT(dim=32, depth=1, heads=2)
    data = random_data(n_batches=4)
    kw = dict(block_size=16, num_grads=4, progress=False)
    for bad in (dict(num_grads=2.7), dict(num_grads=0), dict(block_size=0), dict(block_size=1.5)):
        with pytest.raises(ValueError, match="must be a positive int"):
            ovit.one_shot_prune(model, data, 0.5, **{**kw, **bad})
    for g in (0, -1, 2.5):
        with pytest.raises(ValueError, match="grad_batch_size must be a positive int"):
            ovit.one_shot_prune(model, data, 0.5, grad_batch_size=g, **kw)
    with pytest.raises(ValueError, match="more than once"):
        ovit.one_shot_prune(model, data, 0.5, layers=["blocks.0.mlp.fc1", "blocks.0.mlp.fc1"], **kw)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, 0] = float("nan")
    for method in ovit.METHODS:  # magnitude used to prune around NaN silently
        with pytest.raises(ValueError, match="'blocks.0.mlp.fc2' has NaN/Inf weights"):
            ovit.one_shot_prune(model, data, 0.5, method=method, **kw)


def test_nm_groups_must_not_straddle_rows():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 10))  # rows of 6 weights
    data = random_data(n_batches=4)
    with pytest.raises(ValueError, match="straddle rows"):
        ovit.one_shot_prune(model, data, pattern="2:4", layers=["1", "3"], block_size=16, num_grads=4, progress=False)
    rep = ovit.one_shot_prune(model, data, pattern="2:4", layers=["1"], block_size=16, num_grads=4, progress=False)
    assert rep.total_pruned == 64 * 6 // 2


def test_an_interrupted_commit_leaves_the_model_untouched(monkeypatch):
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = PrunableLayer.unblock, []

    def interrupted(self, blocks):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, blocks)

    monkeypatch.setattr(PrunableLayer, "unblock", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ovit.one_shot_prune(model, random_data(n_batches=4), 0.5, method="magnitude", block_size=16, progress=False)
    assert len(calls) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_answers_mistakes_in_one_line(tmp_path, capsys):
    pytest.importorskip("timm")
    from ovit.cli import main

    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    base = ["prune", "--data", str(folder), "--out", str(tmp_path / "o.pt")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--model", "vit_tiny_patch16_224", "--sparsity", "50"])
    assert e.value.code == 2 and "did you mean 0.5?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--model", "vit_tiny_patch16_224"])
    assert "--sparsity is required" in capsys.readouterr().err
    assert main([*base, "--model", "no_such_model_xyz", "--sparsity", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'no_such_model_xyz'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    ck = tmp_path / "ck.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, ck)
    assert main([*base, "--model", "vit_tiny_patch16_224", "--checkpoint", str(ck), "--sparsity", "0.5",
                 "--model-kwargs", '{"img_size": 32, "depth": 1}']) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "does not fit the model" in err and len(err.strip().splitlines()) == 1


# --- stages that must not be subtly wrong ------------------------------------------------------------


@pytest.mark.parametrize("method", ["ovit", "woodfisher", "global_magnitude"])
def test_exact_k_with_padded_layers_and_an_already_sparse_model(method, monkeypatch):
    """A layer that needs padding (49 weights in blocks of 8) and weights that are already zero:
    exactly K = ⌊s·N + ½⌋ real weights end pruned, the old zeros among them; the elimination is
    told the old zeros are pruned (its mask covers them)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 10))
    with torch.no_grad():
        model[1].weight[:, :20] = 0  # 140 of 448 already pruned
        model[3].weight[0] = 0
    old = {n: dict(model.named_modules())[n].weight.detach() == 0 for n in ("1", "3", "5")}
    masks_seen = []
    import ovit.pruner as pruner_mod

    real = {name: getattr(pruner_mod.ok, name) for name in ("obs_prune_order", "obs_prune_order_")}
    for name in real:  # the step owns its inverses: on CPU, the in-place one runs

        def spy(w, h, *, mask=None, _real=real[name], **kw):
            masks_seen.append((w.detach().clone(), mask))
            return _real(w, h, mask=mask, **kw)

        monkeypatch.setattr(pruner_mod.ok, name, spy)
    rep = ovit.one_shot_prune(model, random_data(), 0.55, method=method, layers=["1", "3", "5"], block_size=8,
                              num_grads=12, damp=1e-2, damp_mode="relative", progress=False)  # fmt: skip
    assert [lr.pad for lr in rep.layers] == [0, 7, 0]
    zero, tot = pruned_fraction(model, ["1", "3", "5"])
    assert tot == 448 + 49 + 70 and rep.total_pruned == math.floor(0.55 * tot + 0.5) == zero
    mods = dict(model.named_modules())
    assert all(bool((mods[n].weight[old[n]] == 0).all()) for n in old), "an old zero came back"
    if method == "ovit":
        assert len(masks_seen) == 3
        for w, mask in masks_seen:
            assert mask is not None and bool(mask[w == 0].all()), "old zeros not given as pre-pruned"


def test_a_float32_failure_is_retried_in_float64(monkeypatch, gen):
    """Blocks a float32 kernel flags (a pivot lost to rounding) are recomputed in float64 and the
    run goes on with the float64 result for them."""
    from conftest import random_fisher_inverse

    import ovit_kernels as ok
    from ovit_kernels import obs

    _, h = random_fisher_inverse(3, 8, 20, 0.1, gen)
    w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    w, h = w.float().double(), h.float().double()  # the float64 retry sees the float32 inputs
    o64, l64 = ok.obs_prune_order(w, h)
    real = obs._backend.implementation

    def flaky(case, backend=None):
        name, fn = real(case, backend)
        if case.dtype != torch.float32 or case.op not in ("obs_prune_order", "obs_reconstruct"):
            return name, fn

        def wrapped(*a):
            *out, bad = fn(*a)
            bad = bad.clone()
            bad[1] = True  # as if block 1 met a non-positive pivot in float32
            return (*out, bad)

        wrapped.scans_inputs = getattr(fn, "scans_inputs", False)
        return name, wrapped

    monkeypatch.setattr(obs._backend, "implementation", flaky)
    o32, l32 = ok.obs_prune_order(w.float(), h.float())
    assert torch.equal(o32[1], o64[1]) and torch.equal(l32[1], l64[1].float())
    counts = torch.tensor([2, 5, 3])
    w32, _ = ok.obs_reconstruct(w.float(), h.float(), o64, counts)
    w64, _ = ok.obs_reconstruct(w, h, o64, counts)
    torch.testing.assert_close(w32[1], w64[1].float(), rtol=0, atol=0)


def test_woodbury_run_whose_data_runs_short_uses_what_it_got():
    torch.manual_seed(2)
    model = TinyViT(dim=32, depth=1, heads=2)
    data = iter(random_data(n_batches=5))  # a one-shot iterator: 5 gradients for 8 asked
    rep = ovit.one_shot_prune(model, data, 0.5, block_size=16, num_grads=8, fisher_method="woodbury",
                              fisher_dtype=torch.float64, damp=1e-2, progress=False)  # fmt: skip
    assert rep.num_grads == 5 and any("ran out after 5 of 8" in n for n in rep.notes)
    assert abs(rep.achieved_sparsity - 0.5) < 1e-3


def test_cli_gradual_on_an_image_folder(tmp_path):
    pytest.importorskip("timm")
    from ovit.cli import main

    image_folder(tmp_path, ("a", "b"), 4, 32)
    run = tmp_path / "run"
    args = ["gradual", "--model", "vit_tiny_patch16_224", "--model-kwargs",
            json.dumps({"img_size": 32, "depth": 1, "num_classes": 2}), "--data", str(tmp_path / "data"),
            "--eval-data", str(tmp_path / "data"), "--initial", "0.3", "--final", "0.5", "--steps", "2",
            "--kind", "linear", "--batch-size", "4", "--grad-batch-size", "2", "--num-grads", "4",
            "--block-size", "32", "--damp", "1e-3", "--damp-mode", "relative", "--workers", "0",
            "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    log = json.loads((run / "log.json").read_text())
    assert [round(r["target"], 2) for r in log] == [0.3, 0.5]
    assert abs(log[-1]["sparsity"] - 0.5) < 1e-3 and (run / "sparsity=0.5000" / "best.pt").exists()
    assert main([*args[:-1], str(run)]) == 0  # finished: resuming does nothing more
