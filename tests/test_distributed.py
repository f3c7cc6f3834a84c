"""Pruning across the ranks of a torch.distributed job (gloo on loopback, 2 processes): the same
model on every rank, equal to a single process's; a failing rank makes every rank raise,
naming it, with no model changed."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import image_folder

import ovit
from ovit.models import TinyViT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """This spawned process joins a gloo group on loopback, one thread per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def data_of(n=16, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]  # fmt: skip


KW = dict(block_size=16, num_grads=12, damp=1e-2, damp_mode="relative", fisher_dtype=torch.float64, grad_chunk=4)


def _worker(rank, world, port, method, fail_rank, where, budget, pattern, out, extra):
    join_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = TinyViT(dim=32, depth=1, heads=2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if fail_rank == rank and where == "elimination":
            from ovit import stages

            def broken(*a, **k):
                raise ovit_kernels_error("block 3 is not positive definite")

            stages.eliminate = broken
        if fail_rank == rank and where == "weights":
            with torch.no_grad():
                model.head.bias += 1e-3
            before = {k: v.clone() for k, v in model.state_dict().items()}
        if fail_rank == rank and where == "sampling":
            real, calls = model.forward, []

            def flaky(x):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("out of memory in the forward pass")
                return real(x)

            model.forward = flaky
        try:
            sparsity = None if pattern != "unstructured" else 0.6
            kw = {**KW, **extra}
            rep = ovit.distributed.distributed_prune(model, data_of(), sparsity, method=method, debug=True,
                                                     memory_budget=budget, pattern=pattern, **kw)  # fmt: skip
            torch.save({"state": model.state_dict(), "pruned": rep.total_pruned, "est": rep.est_loss_increase,
                        "passes": rep.passes, "notes": rep.notes, "grad_mode": rep.grad_mode, "samples": rep.samples},
                       os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
        except ovit.distributed.RankFailure as e:
            same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            torch.save({"error": str(e), "unchanged": same}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # leave together: gloo aborts a rank whose peers are gone
    finally:
        dist.destroy_process_group()


def ovit_kernels_error(msg):
    import ovit_kernels as ok

    return ok.NotPositiveDefiniteError(msg, [3])


def run(method, fail_rank, tmp_path, world=2, where="elimination", budget=None, pattern="unstructured", extra=None):
    args = (world, free_port(), method, fail_rank, where, budget, pattern, str(tmp_path), extra or {})
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize(
    "method,budget,world,pattern",
    [("ovit", None, 2, "unstructured"), ("woodfisher", None, 2, "unstructured"), ("ovit", 3_500_000, 2, "unstructured"),
     ("ovit", None, 3, "unstructured"), ("ovit", None, 2, "2:4")],
)  # fmt: skip
def test_ranks_equal_one_process(method, budget, world, pattern, tmp_path):
    """2 and 3 ranks (uneven layer shards), N:M, and a memory budget that makes a rank take
    several passes (layer groups): the same masks as one process on the same gradients."""
    outs = run(method, None, tmp_path, budget=budget, world=world, pattern=pattern)
    if budget is not None:
        assert all(o["passes"] > 1 for o in outs)
    torch.manual_seed(0)
    ref = TinyViT(dim=32, depth=1, heads=2)
    # one process on the same 12 gradients: rank r took batches r, r + 2, …
    data = data_of()
    order = [data[i] for i in range(12)]
    kw = {k: v for k, v in KW.items() if k != "grad_chunk"}
    sparsity = None if pattern != "unstructured" else 0.6
    rep = ovit.one_shot_prune(ref, order, sparsity, method=method, pattern=pattern, progress=False, **kw)
    for o in outs:
        assert o["pruned"] == rep.total_pruned
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(o["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
            assert torch.equal(o["state"][k] == 0, outs[0]["state"][k] == 0)
    assert outs[0]["est"] == pytest.approx(rep.est_loss_increase, rel=1e-6)


@pytest.mark.parametrize("extra", [dict(fisher_method="woodbury", damp_mode="absolute", damp=1e-3),
                                   dict(grad_mode="per_sample", pass_batch_size=4)])  # fmt: skip
def test_woodbury_and_per_sample_gradients_across_ranks(extra, tmp_path):
    """Woodbury updates on the owners (gradients in rank order per chunk: equal up to rounding,
    the sequence being order-free in exact arithmetic) and per-sample gradients formed by each
    rank on its share: the masks and weights of one process on the same gradients."""
    outs = run("ovit", None, tmp_path, extra=extra)
    torch.manual_seed(0)
    ref = TinyViT(dim=32, depth=1, heads=2)
    data = data_of()
    if extra.get("grad_mode") == "per_sample":  # 6 samples per rank: rank r took batch r whole, 2 of batch r + 2
        order = [data[0], (data[2][0][:2], data[2][1][:2]), data[1], (data[3][0][:2], data[3][1][:2])]
    else:
        order = [data[i] for i in range(12)]
    kw = {**{k: v for k, v in KW.items() if k != "grad_chunk"}, **extra}
    rep = ovit.one_shot_prune(ref, order, 0.6, method="ovit", progress=False, **kw)
    for o in outs:
        assert o["pruned"] == rep.total_pruned
        assert f"by {extra.get('fisher_method', 'gram')} updates" in o["notes"][0]
        assert o["grad_mode"] == rep.grad_mode and o["samples"] == rep.samples
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(o["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
            assert torch.equal(o["state"][k] == 0, v == 0), k


def test_a_failing_rank_fails_every_rank_and_changes_nothing(tmp_path):
    outs = run("ovit", 1, tmp_path)
    for o in outs:
        assert "rank 1 failed" in o["error"] and "not positive definite" in o["error"] and o["unchanged"]


def test_a_rank_failing_while_sampling_is_named_by_every_rank(tmp_path):
    outs = run("ovit", 0, tmp_path, where="sampling")
    for o in outs:
        assert "rank 0 failed during the gradient sampling" in o["error"] and "out of memory" in o["error"]
        assert o["unchanged"]


class _DiesOnSecondBatch:
    """The data of a rank whose process exits outright (no exception, no goodbye) mid-sampling."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        for i, item in enumerate(self.data):
            if i == 2:
                os._exit(3)
            yield item


def _dying_worker(rank, world, port, out, timeout_s):
    import datetime
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    torch.manual_seed(0)
    model = TinyViT(dim=32, depth=1, heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _DiesOnSecondBatch(data_of()) if rank == 1 else data_of()
    t0 = time.perf_counter()
    try:
        ovit.distributed.distributed_prune(model, data, 0.6, **KW)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - what the survivor saw, whatever it was
        same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        result = {"error": f"{type(e).__name__}: {e}", "unchanged": same, "seconds": time.perf_counter() - t0}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    os._exit(0)  # no barrier or teardown: the peer is gone


def test_a_rank_that_dies_outright_fails_the_others_within_the_timeout(tmp_path):
    """Rank 1's process exits mid-sampling without a word: rank 0 raises a RankFailure saying it
    lost contact (when the transport notices, at the latest at the group's timeout), its model
    unchanged — it does not hang."""
    ctx = mp.get_context("spawn")
    port, timeout_s = free_port(), 20
    procs = [ctx.Process(target=_dying_worker, args=(r, 2, port, str(tmp_path), timeout_s)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung after its peer died"
    assert procs[1].exitcode == 3 and not (tmp_path / "rank1.pt").exists()
    out = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert out["error"] is not None and out["error"].startswith("RankFailure: lost contact with the other ranks")
    assert out["unchanged"] and out["seconds"] < timeout_s + 30


def test_plan_a_job_on_the_meta_device(capsys, tmp_path):
    pytest.importorskip("timm")
    import json

    import timm

    from ovit.cli import main
    from ovit.distributed import plan_job

    with torch.device("meta"):
        model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    p = plan_job(model, gpus=3, gpu_memory=2e9, block_size=64, num_grads=256)
    assert sum(r["weights"] for r in p["ranks"]) == p["pruned_weights"] == sum(
        m.weight.numel() for n, m in ovit.select_layers(model))  # fmt: skip
    assert p["bytes_per_gradient"] == 4 * p["pruned_weights"] and all(r["passes"] >= 1 for r in p["ranks"])
    sizes = [r["weights"] for r in p["ranks"]]
    assert max(sizes) < 1.5 * min(sizes)  # balanced
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "deit_tiny_patch16_224", "--gpus", "2", "--gpu-memory", "4GB", "--block-size",
                 "64", "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "exchanged per gradient" in text and "estimate:" in text and json.loads(out.read_text())["gpus"] == 2


def _cli_worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from ovit.cli import main

    assert main(argv) == 0


@pytest.mark.parametrize("grads", [["--grad-batch-size", "2"], ["--grad-mode", "per_sample", "--pass-batch-size", "2"]])
def test_cli_prune_under_torchrun_style_launch(grads, tmp_path):
    """What `torchrun --nproc_per_node=2 -m ovit prune ...` does: each rank runs the CLI, which
    initialises the process group; rank 0 writes the pruned model. Mini-batch and per-sample."""
    pytest.importorskip("timm")
    import json

    image_folder(tmp_path, ("a", "b"), 4, 32)
    out = tmp_path / "pruned.pt"
    argv = ["prune", "--model", "vit_tiny_patch16_224", "--model-kwargs",
            json.dumps({"img_size": 32, "depth": 1, "num_classes": 2}), "--data", str(tmp_path / "data"),
            "--sparsity", "0.5", "--block-size", "32", "--num-grads", "4", *grads,
            "--damp", "1e-3", "--damp-mode", "relative", "--workers", "0", "--out", str(out)]  # fmt: skip
    mp.spawn(_cli_worker, args=(2, free_port(), argv), nprocs=2, join=True)
    rep = json.loads((tmp_path / "pruned.json").read_text())
    assert abs(rep["achieved_sparsity"] - 0.5) < 1e-3 and "2 ranks" in rep["notes"][0]
    assert rep["grad_mode"] == ("per_sample" if "per_sample" in grads else "mini_batch")
    sd = torch.load(out, weights_only=True)
    assert (sd["blocks.0.mlp.fc1.weight"] == 0).float().mean() > 0.2


def test_ranks_with_different_weights_are_refused(tmp_path):
    outs = run("ovit", 1, tmp_path, where="weights")
    for o in outs:
        assert "different weights before pruning" in o["error"] and o["unchanged"]


def _ddp_worker(rank, world, port, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    join_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = TinyViT(dim=32, depth=1, heads=2)
        pruner = ovit.Pruner(model, process_group=dist.group.WORLD, block_size=16, num_grads=12, damp=1e-2,
                             damp_mode="relative", grad_chunk=4)  # fmt: skip
        ddp = DDP(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
        pruner.hold(opt)
        data = data_of()
        for target in (0.4, 0.7):
            pruner.step(data, target)
            for x, y in data[rank::world][:3]:  # each rank trains on its own batches; DDP averages
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
        masks = {n: k.clone() for n, k in pruner.masks.items()}
        zeros_ok = all(bool((dict(model.named_modules())[n].weight[~k] == 0).all()) for n, k in masks.items())
        torch.save({"masks": masks, "same": ovit.distributed.checksum(model), "zeros_ok": zeros_ok,
                    "sparsity": pruner.sparsity}, os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
        dist.barrier()  # leave together: gloo aborts a rank whose peers are gone
    finally:
        dist.destroy_process_group()


def test_gradual_steps_across_ranks_under_ddp(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for o in outs:
        assert o["same"] and o["zeros_ok"] and abs(o["sparsity"] - 0.7) < 1e-3
    assert all(torch.equal(outs[0]["masks"][n], outs[1]["masks"][n]) for n in outs[0]["masks"])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_block_shards_cover_every_block_once_and_balance_the_bytes(world):
    from ovit.distributed import shard_blocks
    from ovit.layers import PrunableLayer, block_layout

    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 96), torch.nn.Linear(96, 10))
    layers = [PrunableLayer(n, m, block_layout(m.weight.numel(), b))  # blocks of different sizes, one padded
              for (n, m), b in zip(ovit.select_layers(model, ["0", "1", "2"]), (32, 16, 48))]  # fmt: skip
    shards = shard_blocks(layers, world)
    seen = {ly.name: [] for ly in layers}
    for sh in shards:
        for pc in sh:
            seen[pc.layer.name] += list(range(pc.start, pc.stop))
    assert all(seen[ly.name] == list(range(ly.layout.num_blocks)) for ly in layers)
    total = sum(ly.layout.num_blocks * ly.layout.block_size**2 for ly in layers)
    biggest = max(ly.layout.block_size**2 for ly in layers)
    for sh in shards:  # each rank's Fisher state: at most 1/W of the total plus one block
        assert sum(pc.layout.num_blocks * pc.layout.block_size**2 for pc in sh) <= total / world + biggest
    if world == 3:
        assert any(len({r for r, sh in enumerate(shards) for pc in sh if pc.layer is ly}) > 1 for ly in layers)
