"""oViT through torch.ao.pruning: used as the sparsifier docs use one (prepare, step, fine-tune,
step, squash_mask), equal to one_shot_prune at the same settings, masks and weights agreeing."""

import pytest
import torch
from torch import nn

import ovit
from ovit.ao import OViTSparsifier
from ovit.models import TinyViT

NAMES = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
KW = dict(block_size=16, num_grads=8, damp=1e-2, damp_mode="relative", progress=False)


def data_of():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(8)]


def test_a_step_equals_one_shot_prune():
    torch.manual_seed(0)
    ref = TinyViT(dim=32, depth=1, heads=2)
    model = TinyViT(dim=32, depth=1, heads=2)
    model.load_state_dict(ref.state_dict())
    ovit.one_shot_prune(ref, data_of(), 0.75, layers=NAMES, **KW)
    sp = OViTSparsifier(data_of(), 0.75, **KW)
    sp.prepare(model, config=[{"tensor_fqn": n + ".weight"} for n in NAMES])
    sp.step()
    mods = dict(model.named_modules())
    for n in NAMES:  # the parametrized weight, its original and the mask agree with one_shot_prune
        w_ref = dict(ref.named_modules())[n].weight
        assert torch.equal(mods[n].weight, w_ref)
        assert torch.equal(mods[n].parametrizations.weight.original, w_ref)
        assert torch.equal(sp.masks()[n + ".weight"], w_ref != 0)
    sp.squash_mask()
    assert not parametrize_left(model)
    got = model.state_dict()
    assert set(got) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got[k]), k


def parametrize_left(model):
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) for m in model.modules())


def test_the_docs_flow_with_fine_tuning_between_steps():
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    sp = OViTSparsifier(data_of(), 0.5, **KW)
    sp.prepare(model, config=[{"tensor_fqn": n + ".weight"} for n in NAMES[:2]] +
               [{"tensor_fqn": n + ".weight", "pattern": "2:4"} for n in NAMES[2:]])  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # built after prepare, as documented
    sp.step()
    first = {k: v.clone() for k, v in sp.masks().items()}
    originals = [dict(model.named_modules())[n].parametrizations.weight.original for n in NAMES]
    assert all(any(p is q for q in opt.param_groups[0]["params"]) for p in originals)  # the same Parameters
    after_step = [p.detach().clone() for p in originals]
    for x, y in data_of()[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n in NAMES:  # the parametrization keeps pruned weights at zero through training
            assert bool((dict(model.named_modules())[n].weight[~first[n + ".weight"]] == 0).all())
    assert all(not torch.equal(p, q) for p, q in zip(originals, after_step))  # training moved them
    for g in sp.groups:
        g["sparsity_level"] = 0.7
    sp.step()
    for k, m in sp.masks().items():
        assert bool((m <= first[k]).all()), f"{k}: a pruned weight came back"
    unstructured = sum(int((~sp.masks()[n + ".weight"]).sum()) for n in NAMES[:2])
    total = sum(sp.masks()[n + ".weight"].numel() for n in NAMES[:2])
    assert abs(unstructured / total - 0.7) < 1e-3
    for n in NAMES[2:]:  # 2:4 stays 2:4
        assert bool((sp.masks()[n + ".weight"].reshape(-1, 4).sum(1) == 2).all())
    assert len(sp.reports) == 4
    sp.squash_mask()
    with pytest.raises(TypeError, match="config"):
        OViTSparsifier(data_of(), layers=NAMES)
