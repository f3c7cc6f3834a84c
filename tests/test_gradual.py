"""Gradual pruning: the stateful Pruner (persistent, growing masks; exact K per step;
recomputations; all or nothing; state_dict), masks held through training (AdamW with weight
decay and old moments, clipping, bfloat16 autocast, torch.compile) and the schedules."""

import json
import math

import pytest
import torch
from torch import nn

import ovit
from ovit.models import TinyViT


def data_of(n_batches=10, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]  # fmt: skip


def small_pruner(model, **kw):
    args = dict(block_size=16, num_grads=10, damp=1e-2, damp_mode="relative", progress=False)
    args.update(kw)
    return ovit.Pruner(model, **args)


def zeros(model, names):
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach() == 0 for n in names}


# --- the Pruner ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ovit", "global_magnitude"])
def test_steps_only_add_to_the_mask_and_prune_exactly_k(method):
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    pruner = small_pruner(model, method=method)
    data = data_of()
    total = sum(k.numel() for k in pruner.masks.values())
    before = None
    for s in (0.3, 0.5, 0.7):
        pruner.step(data, s)
        pruned = {n: ~k for n, k in pruner.masks.items()}
        assert sum(int(p.sum()) for p in pruned.values()) == math.floor(s * total + 0.5)
        z = zeros(model, pruner.names)
        assert all(torch.equal(z[n], pruned[n]) for n in pruner.names), "masks and zero weights disagree"
        if before is not None:
            assert all(bool((before[n] & ~pruned[n]).sum() == 0) for n in pruner.names), "a pruned weight came back"
        before = pruned
    assert pruner.step_count == 3 and [round(h["sparsity"], 3) for h in pruner.history] == [0.3, 0.5, 0.7]
    with pytest.raises(ValueError, match="below the current"):
        pruner.step(data, 0.5)


def test_recomputations_end_at_the_same_sparsity():
    torch.manual_seed(1)
    ref = TinyViT(dim=32, depth=1, heads=2)
    model = TinyViT(dim=32, depth=1, heads=2)
    model.load_state_dict(ref.state_dict())
    pruner = small_pruner(model)
    pruner.step(data_of(), 0.6, recomputations=3)
    one = small_pruner(ref)
    one.step(data_of(), 0.6)
    assert pruner.sparsity == pytest.approx(one.sparsity, abs=1e-9)
    assert len(pruner.reports) == 3 and pruner.step_count == 1
    targets = [r.sparsity for r in pruner.reports]
    assert targets == pytest.approx([0.2, 0.4, 0.6])
    with pytest.raises(ValueError, match="recomputations"):
        pruner.step(data_of(), 0.7, recomputations=0)


def test_a_failed_step_leaves_model_and_masks_untouched(monkeypatch):
    torch.manual_seed(2)
    model = TinyViT(dim=32, depth=1, heads=2)
    pruner = small_pruner(model)
    pruner.step(data_of(), 0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    import ovit.gradual as gradual

    real, calls = gradual.run_step, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(gradual, "run_step", second_fails)
    with pytest.raises(RuntimeError, match="injected"):
        pruner.step(data_of(), 0.7, recomputations=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(pruner.masks[n], masks[n]) for n in masks) and pruner.step_count == 1
    # one sub-step keeps no copy unless re-applying the masks changes weights: trained without
    # hold, pruned weights drifted from zero; a failed step must leave the drift as it was
    with torch.no_grad():
        for n in pruner.names:
            dict(model.named_modules())[n].weight.add_(1e-3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(gradual, "run_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected")))
    with pytest.raises(RuntimeError, match="injected"):
        pruner.step(data_of(), 0.7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_state_dict_round_trip_and_saved_model_outputs(tmp_path):
    torch.manual_seed(3)
    model = TinyViT(dim=32, depth=1, heads=2)
    pruner = small_pruner(model)
    pruner.step(data_of(), 0.5)
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = TinyViT(dim=32, depth=1, heads=2)
    fresh.load_state_dict(ck["model"])
    again = small_pruner(fresh)
    again.load_state_dict(ck["pruner"])
    assert again.step_count == 1 and all(torch.equal(again.masks[n], pruner.masks[n]) for n in pruner.names)
    x = data_of(1)[0][0]
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    bad = dict(ck["pruner"])
    bad["masks"] = {n: m[:1] for n, m in bad["masks"].items()}
    with pytest.raises(ValueError, match="must be a bool tensor of shape"):
        again.load_state_dict(bad)


def test_a_layer_that_changed_shape_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    pruner = small_pruner(model, layers=["1", "3"])
    pruner.step(data_of(), 0.3)
    model[1] = nn.Linear(64, 16)
    model[3] = nn.Linear(16, 10)
    with pytest.raises(ValueError, match="changed shape"):
        pruner.step(data_of(), 0.5)
    with pytest.raises(ValueError, match="more than once"):
        small_pruner(model, layers=["1", "1"])


# --- masks held through training --------------------------------------------------------------


def train_steps(model, opt, data, n, *, amp=False, scaler=None, clip=None):
    for x, y in data[:n]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        yield grads


@pytest.mark.parametrize("amp", [False, True])
def test_pruned_weights_stay_zero_through_adamw_clipping_and_autocast(amp):
    torch.manual_seed(4)
    model = TinyViT(dim=32, depth=1, heads=2)
    data = data_of(12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    list(train_steps(model, opt, data, 3))  # Adam moments of every weight are non-zero now
    pruner = small_pruner(model)
    pruner.step(data, 0.6)
    pruner.hold(opt)
    scaler = torch.amp.GradScaler("cpu") if amp else None
    for grads in train_steps(model, opt, data, 6, amp=amp, scaler=scaler, clip=0.5):
        z = zeros(model, pruner.names)
        for n in pruner.names:
            assert torch.equal(z[n] | pruner.masks[n], torch.ones_like(z[n])), f"{n}: a pruned weight moved"
            assert bool((grads[n + ".weight"][~pruner.masks[n]] == 0).all()), f"{n}: a pruned weight has a gradient"
    st = opt.state[dict(model.named_modules())[pruner.names[0]].weight]
    assert bool((st["exp_avg"][~pruner.masks[pruner.names[0]]] == 0).all())
    # the next step adds to the held masks
    pruner.step(data, 0.8)
    for _ in train_steps(model, opt, data, 2):
        assert abs(ovit.MaskHolder(model, pruner.masks).sparsity() - 0.8) < 1e-3
        assert all(bool((~pruner.masks[n] <= zeros(model, [n])[n]).all()) for n in pruner.names)


def test_masks_hold_under_torch_compile():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    data = data_of(6)
    pruner = small_pruner(model, layers=["1", "3"], num_grads=6)
    pruner.step(data, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.hold(opt)
    compiled = torch.compile(model, backend="aot_eager")
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        for n in pruner.names:
            w = dict(model.named_modules())[n].weight
            assert bool((w.grad[~pruner.masks[n]] == 0).all())
        opt.step()
        assert all(bool((zeros(model, [n])[n] | pruner.masks[n]).all()) for n in pruner.names)


# --- schedules ---------------------------------------------------------------------------------


def test_sparsity_schedule_values():
    s = ovit.SparsitySchedule(0.5, 0.9, steps=5, every=3, start_epoch=1, hold=4, kind="cubic")
    assert s.prune_epochs == [1, 4, 7, 10, 13] and s.epochs == 1 + 15 + 4
    assert s.target(0) == pytest.approx(0.5) and s.target(4) == pytest.approx(0.9)
    assert s.target(2) == pytest.approx(0.9 - 0.4 * 0.5**3)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(5) == pytest.approx(s.target(1))
    assert s.sparsity_at(19) == pytest.approx(0.9) and s.step_at(7) == 2 and s.step_at(8) is None
    lin = ovit.SparsitySchedule(0.2, 0.8, steps=4, kind="linear")
    assert [lin.target(k) for k in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    targets = [s.target(k) for k in range(5)]
    assert all(b >= a for a, b in zip(targets, targets[1:]))
    for bad in (dict(initial=0.9, final=0.5, steps=2), dict(initial=0.1, final=1.0, steps=2),
                dict(initial=0.1, final=0.5, steps=0), dict(initial=0.1, final=0.5, steps=2, every=0),
                dict(initial=0.1, final=0.5, steps=2, kind="exp")):  # fmt: skip
        with pytest.raises(ValueError):
            ovit.SparsitySchedule(**bad)


def test_cyclic_linear_lr_restarts_at_every_step():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    sched = ovit.SparsitySchedule(0.5, 0.8, steps=3, every=2, start_epoch=0, hold=2)  # cycles 0-2, 2-4, 4-8
    lr = ovit.CyclicLinearLR(opt, sched, steps_per_epoch=4, min_lr=0.1)
    seen = []
    for _ in range(sched.epochs * 4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr.step()
    assert seen[0] == pytest.approx(1.0) and seen[4] == pytest.approx(0.55)  # halfway through cycle 0
    assert seen[8] == pytest.approx(1.0) and seen[16] == pytest.approx(1.0)  # restarts at epochs 2 and 4
    assert seen[7] == pytest.approx(1.0 - 0.9 * 7 / 8) and seen[-1] == pytest.approx(1.0 - 0.9 * 15 / 16)
    warm = ovit.CyclicLinearLR(torch.optim.SGD(model.parameters(), lr=1.0), [0], 1, epochs=10, warmup=2)
    assert warm.get_last_lr()[0] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="increase strictly"):
        ovit.CyclicLinearLR(torch.optim.SGD(model.parameters(), lr=1.0), [3, 3], 1, epochs=10)


# --- the training loop ---------------------------------------------------------------------------


def run_gradual(out_dir, log=None, **kw):
    torch.manual_seed(6)
    model = TinyViT(dim=16, depth=1, heads=2)
    data = data_of(6)
    sched = ovit.SparsitySchedule(0.3, 0.6, steps=2, every=2, hold=1)
    hist = ovit.gradual_prune(model, data, schedule=sched, eval_data=data[:2], out_dir=str(out_dir), log=log,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), block_size=16, num_grads=6,
                              damp=1e-2, damp_mode="relative", progress=False, **kw)  # fmt: skip
    return model, hist


def test_gradual_prune_logs_sweeps_and_resumes(tmp_path):
    model, hist = run_gradual(tmp_path / "a")
    assert [h["epoch"] for h in hist] == list(range(5))
    assert [h["target"] for h in hist] == pytest.approx([0.3, 0.3, 0.6, 0.6, 0.6])
    assert [h["sparsity"] for h in hist] == pytest.approx([0.3, 0.3, 0.6, 0.6, 0.6], abs=1e-3)
    assert all(h["accuracy"] is not None for h in hist)
    subs = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("sparsity="))
    assert subs == ["sparsity=0.3000", "sparsity=0.6000"]
    best = torch.load(tmp_path / "a" / "sparsity=0.6000" / "best.pt", weights_only=False)
    assert best["accuracy"] == max(h["accuracy"] for h in hist if h["target"] == pytest.approx(0.6))

    def stop_at_2(line):
        if line.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_gradual(tmp_path / "b", log=stop_at_2)
    lines = []
    resumed, hist_b = run_gradual(tmp_path / "b", log=lines.append)
    assert lines[0].startswith("resumed") and [h["epoch"] for h in hist_b] == list(range(5))
    for (k, v), (_, u) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v == 0, u == 0), k  # the same final mask
        torch.testing.assert_close(v, u, msg=k)


def test_gradual_prune_with_a_teacher_and_bad_input(tmp_path):
    torch.manual_seed(7)
    teacher = TinyViT(dim=16, depth=1, heads=2)
    model = TinyViT(dim=16, depth=1, heads=2)
    model.load_state_dict(teacher.state_dict())
    data = data_of(4)
    sched = ovit.SparsitySchedule(0.5, 0.5, steps=1, every=1)
    hist = ovit.gradual_prune(model, data, schedule=sched, teacher=teacher, log=None, block_size=16, num_grads=4,
                              damp=1e-2, damp_mode="relative", progress=False)  # fmt: skip
    assert len(hist) == 1 and hist[0]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="kd_weight"):
        ovit.gradual_prune(model, data, schedule=sched, teacher=teacher, kd_weight=2.0, log=None, progress=False)
    with pytest.raises(TypeError, match="length"):
        ovit.gradual_prune(model, iter(data), schedule=sched, log=None, progress=False)


def test_gradual_demo_small(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from ovit.demo import DemoConfig, GradualConfig, run_gradual_demo

    base = DemoConfig(seeds=(0,), epochs=1, num_grads=8, out=str(tmp_path / "out"))
    cfg = GradualConfig(base=base, seeds=(0,), initial=0.5, final=0.7, steps=3, every=1, hold=0, report=(0.6, 0.7),
                        num_grads=8, one_shot_damps=(("relative", 1e-2),), out=str(tmp_path / "out"))  # fmt: skip
    out = run_gradual_demo(cfg, log=lambda *_: None)
    assert set(out["results"]) == {"ovit", "global_magnitude", "one-shot ovit"}
    assert all(len(v[s]) == 1 for v in out["results"].values() for s in ("0.6", "0.7"))
    assert all(len(v[s]) == 1 for v in out["sweep_to_final"].values() for s in ("0.6", "0.7"))
    # 60% has its own run (0.5 → 0.6, then the hold): its log ends at 60%; the run to 70% passes it
    for m in ("ovit", "global_magnitude"):
        own = json.loads((tmp_path / "out" / "gradual" / f"{m}_to0.60_seed0" / "log.json").read_text())
        assert max(e["sparsity"] for e in own) == pytest.approx(0.6, abs=1e-3)
        assert out["results"][m]["0.7"] == out["sweep_to_final"][m]["0.7"]
    assert (tmp_path / "out" / "digits_gradual.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="never reaches"):
        run_gradual_demo(GradualConfig(base=base, seeds=(0,), report=(0.93,), out=str(tmp_path / "out")))


# --- the stages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ovit", "woodfisher"])
def test_stages_on_slices_of_the_layers_equal_one_run(method):
    """Eliminate/score and reconstruct each run on one slice of the layers (as a shard or a
    layer group would), the selection over all of them: the model equals one_shot_prune's."""
    import ovit_kernels as ok
    from ovit import stages
    from ovit.layers import PrunableLayer, block_layout

    torch.manual_seed(8)
    ref = TinyViT(dim=32, depth=1, heads=2)
    data = data_of(8)
    kw = dict(method=method, block_size=16, num_grads=8, damp=1e-2, damp_mode="relative",
              fisher_dtype=torch.float64, progress=False)  # fmt: skip
    a = TinyViT(dim=32, depth=1, heads=2)
    a.load_state_dict(ref.state_dict())
    cache: dict = {}
    rep = ovit.one_shot_prune(a, data, 0.6, fisher_cache=cache, **kw)
    b = TinyViT(dim=32, depth=1, heads=2)
    b.load_state_dict(ref.state_dict())
    layers = [PrunableLayer(n, m, block_layout(m.weight.numel(), 16)) for n, m in ovit.select_layers(b)]
    finvs = {ly.name: ok.FisherInverse.from_gram(cache[ly.name]["gram"], 8, 1e-2, damp_mode="relative",
                                                 dtype=torch.float64).compute() for ly in layers}  # fmt: skip
    spec = stages.StepSpec(method, 0.6, None, torch.float64, 1e-2, "relative", None, torch.device("cpu"))
    slices = [layers[:1], layers[1:3], layers[3:]]
    orders, losses, scores = {}, {}, {}
    for sl in slices:
        if method == "ovit":
            o, ls = stages.eliminate(sl, finvs, spec)
            orders.update(o)
            losses.update(ls)
        else:
            scores.update(stages.score(sl, finvs, spec))
    selection = stages.select(layers, spec, losses=losses, scores=scores)
    for sl in slices:
        new_w, keep, _ = stages.reconstruct(sl, spec, selection, finvs=finvs, orders=orders, losses=losses)
        stages.commit(sl, new_w, keep)
    for (k, v), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, u, msg=k)
    assert rep.total_pruned == sum(int((~kp).sum()) for kp in [ly.weight.detach() != 0 for ly in layers])
