"""Gradient sampling: per-sample and micro-batch gradients formed from batched passes equal a
loop of backward passes on the same samples; the Fisher built from them equals the Fisher of
the loop; masks and padding; what cannot be done per sample is refused."""

import warnings

import pytest
import torch
from torch import nn

import ovit
import ovit_kernels as ok
from ovit.layers import Layout, PrunableLayer, block_layout, select_layers
from ovit.models import TinyViT
from ovit.sampling import GRAD_MODES, per_sample_weight_grads, sample_gradients


class Rows:
    """Stands in for a FisherInverse: keeps every gradient row it is given."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def update(self, chunk: torch.Tensor) -> None:
        self.rows.append(chunk.clone())

    def all(self) -> torch.Tensor:
        return torch.cat(self.rows)


def conv_vit(seed: int = 0) -> nn.Module:
    """TinyViT whose patch embedding (a Conv2d) and every Linear are pruned, float64, with a
    few weights already zero (masks)."""
    torch.manual_seed(seed)
    model = TinyViT(dim=16, depth=1, heads=2, mlp_ratio=2.0).double()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, :5] = 0
        model.patch_embed.proj.weight[3] = 0
    return model


def layers_of(model: nn.Module, block: int = 24) -> list[PrunableLayer]:
    """Every layer; the head (160 weights) in blocks of 24 with 8 entries of padding."""
    chosen = select_layers(model, r"patch_embed\.proj|qkv|proj|fc1|fc2|head")
    out = [PrunableLayer(n, m, block_layout(m.weight.numel(), block)) for n, m in chosen if n != "head"]
    return out + [PrunableLayer("head", model.head, Layout(160, 24, 7, 8))]


def data_of(n: int, seed: int = 1, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def loop_gradients(model, samples, layers, group):
    """One backward pass per group of ``group`` consecutive samples: (m, numel) per layer, masked."""
    x = torch.cat([a for a, _ in samples])
    y = torch.cat([b for _, b in samples])
    out = {ly.name: [] for ly in layers}
    for i in range(0, x.shape[0] - group + 1, group):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + group]), y[i : i + group]).backward()
        for ly in layers:
            g = ly.weight.grad.flatten().clone()
            out[ly.name].append(g.masked_fill(ly.weight.detach().flatten() == 0, 0))
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("mode,group", [("per_sample", 1), ("micro_batch", 2), ("micro_batch", 3)])
def test_per_sample_gradients_equal_a_loop_of_backward_passes(mode, group):
    model = conv_vit()
    model.eval()
    layers = layers_of(model)
    data = data_of(24)
    m = 24 // group
    rows = {ly.name: Rows() for ly in layers}
    stats = sample_gradients(model, data, layers, rows, m, loss_fn=nn.functional.cross_entropy,
                             device=torch.device("cpu"), grad_mode=mode, grad_batch_size=group,
                             pass_batch_size=12 if group > 1 else None, chunk=5, progress=False)  # fmt: skip
    assert stats.gradients == m and stats.samples == 24
    want = loop_gradients(model, data, layers, group)
    for ly in layers:
        got = rows[ly.name].all()
        pad = ly.layout.num_blocks * ly.layout.block_size - ly.layout.numel
        assert got.shape == (m, ly.layout.numel + pad)
        assert torch.all(got[:, ly.layout.numel :] == 0), "padding must stay zero"
        zero = ly.weight.detach().flatten() == 0
        assert torch.all(got[:, : ly.layout.numel][:, zero] == 0), "pruned weights' gradients must be masked"
        torch.testing.assert_close(got[:, : ly.layout.numel], want[ly.name].float(), rtol=1e-4, atol=1e-6,
                                   msg=ly.name)  # fmt: skip
    assert any(ly.layout.num_blocks * ly.layout.block_size > ly.layout.numel for ly in layers), "no padded layer"
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_micro_batch_fisher_equals_the_mini_batch_fisher():
    """The Fisher accumulated from micro-batches of g = 2 equals the Fisher of mini-batch
    gradients of the same pairs of samples (the demo's setting)."""
    model = conv_vit(2)
    layers = layers_of(model, 16)
    data = data_of(40, seed=3, batch=2)

    def fisher(**kw):
        accs = {
            ly.name: ok.FisherInverse(
                ly.layout.num_blocks * ly.layout.block_size, ly.layout.block_size, 1e-3, dtype=torch.float64
            )  # fmt: skip
            for ly in layers
        }
        sample_gradients(model, data, layers, accs, 20, loss_fn=nn.functional.cross_entropy,
                         device=torch.device("cpu"), progress=False, **kw)  # fmt: skip
        return {k: a.gram().clone() for k, a in accs.items()}

    mini = fisher(grad_batch_size=2)
    micro = fisher(grad_mode="micro_batch", grad_batch_size=2, pass_batch_size=8)
    for k in mini:
        torch.testing.assert_close(micro[k], mini[k], rtol=1e-5, atol=1e-9, msg=k)


def test_per_sample_conv_with_groups_stride_and_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2).double()
    x = torch.randn(5, 4, 9, 9, dtype=torch.float64, requires_grad=False)
    out = conv(x)
    delta = torch.randn_like(out)
    got = per_sample_weight_grads(conv, x, delta, 5)
    for i in range(5):
        conv.zero_grad()
        (conv(x[i : i + 1]) * delta[i : i + 1]).sum().backward()
        torch.testing.assert_close(got[i], conv.weight.grad.flatten())


def test_one_shot_prune_per_sample_mode_runs_and_reports():
    model = TinyViT(dim=16, depth=1, heads=2)
    data = [(x.float(), y) for x, y in data_of(64, batch=16)]
    rep = ovit.one_shot_prune(model, data, 0.5, block_size=16, num_grads=32, grad_mode="per_sample",
                              damp=1e-2, damp_mode="relative", progress=False)  # fmt: skip
    assert rep.grad_mode == "per_sample" and rep.num_grads == 32 and rep.samples == 32
    assert abs(rep.achieved_sparsity - 0.5) < 1e-3
    with pytest.raises(ValueError, match="micro_batch"):
        ovit.one_shot_prune(model, data, 0.5, grad_mode="per_sample", grad_batch_size=4, progress=False)
    with pytest.raises(ValueError, match="needs grad_batch_size"):
        ovit.one_shot_prune(model, data, 0.5, grad_mode="micro_batch", progress=False)
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        ovit.one_shot_prune(model, data, 0.5, grad_mode="per-sample", progress=False)
    assert set(GRAD_MODES) == {"mini_batch", "per_sample", "micro_batch"}


class Shuffle(nn.Module):
    """Mixes the samples of a batch (a permutation along dim 0) before a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.out(h.roll(1, 0) if x.shape[0] > 1 else h)


def test_what_cannot_be_done_per_sample_is_refused():
    torch.manual_seed(0)
    model = Shuffle()
    data = [(torch.randn(4, 8), torch.arange(4) % 3) for _ in range(3)]  # neighbours differ in label
    layers = [PrunableLayer(n, m, block_layout(m.weight.numel(), 8)) for n, m in select_layers(model, [model.fc])]
    rows = {ly.name: Rows() for ly in layers}
    with pytest.raises(ValueError, match="mixes the samples"):
        sample_gradients(model, data, layers, rows, 8, loss_fn=nn.functional.cross_entropy,
                         device=torch.device("cpu"), grad_mode="per_sample", progress=False)  # fmt: skip
    # a loss that sums over the batch instead of averaging
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    layers = [PrunableLayer(n, m, block_layout(m.weight.numel(), 8)) for n, m in select_layers(model, [model[0]])]
    rows = {ly.name: Rows() for ly in layers}

    def summed(out, y):
        return nn.functional.cross_entropy(out, y, reduction="sum")

    with pytest.raises(ValueError, match="does not average"):
        sample_gradients(model, data, layers, rows, 8, loss_fn=summed, device=torch.device("cpu"),
                         grad_mode="per_sample", progress=False)  # fmt: skip


def test_repeats_are_counted_in_gradients_per_sample():
    model = TinyViT(dim=16, depth=1, heads=2)
    data = [(x.float(), y) for x, y in data_of(12, batch=4)]
    layers = layers_of(model, 16)
    rows = {ly.name: Rows() for ly in layers}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stats = sample_gradients(model, data, layers, rows, 20, loss_fn=nn.functional.cross_entropy,
                                 device=torch.device("cpu"), grad_mode="per_sample", progress=False)  # fmt: skip
    assert stats.gradients == 20 and stats.distinct_gradients == 12 and stats.repeats
    assert any("only 12 gradients for 20" in str(x.message) for x in w)


def test_grad_modes_demo_small(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from ovit.demo import DemoConfig, GradModesConfig, run_grad_modes_demo

    cfg = GradModesConfig(base=DemoConfig(seeds=(0,), epochs=1), seeds=(0,), sparsities=(0.5,),
                          runs=(("mini", "mini_batch", 4, 6), ("per-sample", "per_sample", 1, 6)),
                          damps=(("relative", 1e-2),), out=str(tmp_path / "out"))  # fmt: skip
    out = run_grad_modes_demo(cfg, log=lambda *_: None)
    assert out["images"] == {"mini": 24, "per-sample": 6}
    assert set(out["results"]) == {"mini", "per-sample"} and (tmp_path / "out" / "digits_grad_modes.json").exists()


def test_absolute_damping_with_per_sample_gradients_is_warned():
    model = TinyViT(dim=16, depth=1, heads=2)
    data = [(x.float(), y) for x, y in data_of(16, batch=8)]
    with pytest.warns(RuntimeWarning, match="damp_mode='relative' follows the estimator"):
        ovit.one_shot_prune(model, data, 0.5, block_size=16, num_grads=8, grad_mode="per_sample", damp=1e-6,
                            progress=False)  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ovit.one_shot_prune(TinyViT(dim=16, depth=1, heads=2), data, 0.5, block_size=16, num_grads=8,
                            grad_mode="per_sample", damp=1e-2, damp_mode="relative", progress=False)  # fmt: skip
