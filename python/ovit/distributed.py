"""One-shot pruning across the ranks of a ``torch.distributed`` job (NCCL on GPUs, gloo on CPU),
launched as usual (``torchrun``); the process group must be initialised by the caller.

The blocks of all pruned layers, in order, are cut into one contiguous range per rank, balanced
by Fisher bytes (a layer may straddle ranks: one piece on each); every rank samples gradients on
its share of the data; each chunk of gradients of a layer is cut by pieces and every piece's
columns gathered to its owner (every gradient entry travels once, to one rank: N·4 bytes per
gradient over the job, no rank ever holds all m gradients), which holds only the Fisher
inverses of its pieces (≤ 1/W of the total plus one block), eliminates their blocks and
reconstructs them. The global selection is exact across ranks: the per-block cumulative losses (small: N/B·B values)
are broadcast from their owners and every rank runs the same selection over all layers, so the
counts, K and the tie-breaking equal a single process's. Before anything is written, the ranks
agree: if any rank fails (an exception while sampling — heard before every exchange —, a
non-positive-definite block, too little data), every rank raises an error naming that rank and
its cause, and no model is changed. A rank that dies outright makes the others raise
:class:`RankFailure` ("lost contact") as soon as the transport notices (gloo: the peer's
connection closing) or at the latest at the process group's timeout
(``init_process_group(timeout=...)``), their models unchanged. The new
weights and masks are broadcast from the owners, so every rank ends with the same model
(``checksum`` compares them).

The Fisher inverses come from the Gram (default) or from Woodbury updates on the owner (each
owner applies the gathered gradients in rank order per chunk: the same inverse as one process up
to rounding, since the Woodbury sequence is order-free in exact arithmetic); the gradients are
mini-batch, per-sample or micro-batch ones (``grad_mode``, :mod:`ovit.sampling`), each rank
forming its own share's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ovit_kernels as ok

from . import stages
from .layers import Layout, PrunableLayer, block_layout, select_layers
from .pruner import LayerReport, PruneReport, _memory_budget, _parse_pattern, plan_memory
from .sampling import grad_group, sample_gradients


class RankFailure(RuntimeError):
    """A rank of the job failed during a pruning step; raised on every rank."""


@contextmanager
def _comm(what: str) -> Iterator[None]:
    """Collectives of a step: a transport error (a peer gone, the group's timeout) becomes a
    RankFailure that says so; nothing has been written to the model before the last of them."""
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as e:
        raise RankFailure(
            f"lost contact with the other ranks during {what} ({type(e).__name__}: {e}); a rank died or the "
            "process group's timeout passed; this rank's model was not changed"
        ) from e


@dataclass(frozen=True)
class Piece:
    """A contiguous range ``[start, stop)`` of one layer's blocks, owned by one rank. It offers
    what the stages read of a layer (``name``, ``layout``, ``weight``, ``blocks``, ``pad_mask``),
    restricted to its blocks, so every stage runs on it as on a layer."""

    layer: PrunableLayer
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.layer.name}[{self.start}:{self.stop}]"

    @property
    def layout(self) -> Layout:
        lay = self.layer.layout
        last = self.stop == lay.num_blocks
        n = self.stop - self.start
        return Layout(n * lay.block_size - (lay.pad if last else 0), lay.block_size, n, lay.pad if last else 0)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def blocks(self, flat: torch.Tensor) -> torch.Tensor:
        return self.layer.blocks(flat)[self.start : self.stop]

    def pad_mask(self, device: torch.device) -> torch.Tensor:
        return self.layer.pad_mask(device)[self.start : self.stop]

    def columns(self) -> slice:
        b = self.layer.layout.block_size
        return slice(self.start * b, self.stop * b)


def shard_blocks(layers: list[PrunableLayer], world: int) -> list[list[Piece]]:
    """The blocks of all layers, in order, cut into ``world`` contiguous ranges balanced by
    Fisher bytes (B² per block; blocks of different layers may differ in size): each rank holds
    at most 1/W of the total plus one block. A layer may straddle ranks (one piece on each)."""
    total = sum(ly.layout.num_blocks * ly.layout.block_size**2 for ly in layers)
    out: list[list[Piece]] = [[] for _ in range(world)]
    acc, r = 0, 0
    for ly in layers:
        b2 = ly.layout.block_size**2
        start = 0
        for i in range(ly.layout.num_blocks):
            while r < world - 1 and acc + b2 / 2 > total * (r + 1) / world:
                if i > start:
                    out[r].append(Piece(ly, start, i))
                start = i
                r += 1
            acc += b2
        out[r].append(Piece(ly, start, ly.layout.num_blocks))
    return out


class _ToOwners:
    """Stands in for a layer's FisherInverse on every rank: each chunk of the layer's gradients
    is cut by pieces and every piece's columns gathered to its owner (each entry travels once),
    whose accumulator takes the columns of all ranks in rank order."""

    def __init__(self, pieces: list[tuple[Piece, int]], accs: dict[str, ok.FisherInverse], group) -> None:
        self.pieces, self.accs, self.group = pieces, accs, group

    def update(self, chunk: torch.Tensor) -> None:
        rank = dist.get_rank(self.group)
        world = dist.get_world_size(self.group)
        _agree(None, self.group, "the gradient sampling")  # a rank that failed meanwhile is heard here
        for piece, owner in self.pieces:
            part = chunk[:, piece.columns()].contiguous()
            dst = _global(self.group, owner)
            if rank == owner:
                got = [torch.empty_like(part) for _ in range(world)]
                with _comm("the gradient exchange"):
                    dist.gather(part, got, dst=dst, group=self.group)
                self.accs[piece.name].update(torch.cat(got))
            else:
                with _comm("the gradient exchange"):
                    dist.gather(part, None, dst=dst, group=self.group)


def _my_share(data: Iterable, rank: int, world: int) -> Iterator:
    """Every world-th batch, starting at ``rank`` (a DistributedSampler-style split of batches)."""
    while True:
        got = False
        for i, item in enumerate(data):
            if i % world == rank:
                got = True
                yield item
        if not got or iter(data) is data:
            return


def _agree(error: BaseException | None, group, what: str) -> None:
    """Every rank learns whether any rank failed; all raise the first failure, naming its rank."""
    world = dist.get_world_size(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    everyone: list = [None] * world
    with _comm(what):
        dist.all_gather_object(everyone, mine, group=group)
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if failed:
        r, e = failed[0]
        raise RankFailure(f"rank {r} failed during {what}: {e}; no rank's model was changed") from error


def broadcast_model(model: nn.Module, src: int = 0, group=None) -> None:
    """Give every rank rank ``src``'s parameters and buffers (e.g. a randomly initialised model)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=_global(group, src), group=group)


def checksum(model: nn.Module, group=None) -> bool:
    """True when every rank holds exactly the same parameters (a float64 sum and a weighted sum
    of each parameter, compared across ranks)."""
    parts = []
    for i, p in enumerate(model.parameters()):
        v = p.detach().double().flatten()
        parts += [v.sum(), (v * torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)).sum() + i]
    mine = torch.stack(parts)  # on the parameters' device (NCCL takes only GPU tensors)
    world = dist.get_world_size(group)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return all(torch.equal(everyone[0], e) for e in everyone[1:])


def distributed_prune(
    model: nn.Module,
    data: Iterable,
    sparsity: float | None = None,
    *,
    method: str = "ovit",
    block_size: int = 192,
    num_grads: int = 4096,
    damp: float = 1e-8,
    damp_mode: str = "absolute",
    grad_batch_size: int | None = None,
    grad_mode: str = "mini_batch",
    pass_batch_size: int | None = None,
    pattern: str = "unstructured",
    layers: str | Iterable[nn.Module | str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    fisher_method: str = "gram",
    fisher_dtype: torch.dtype = torch.float32,
    grad_chunk: int = 16,
    memory_budget: int | None = None,
    backend: str | None = None,
    group=None,
    debug: bool = False,
    progress: bool = False,
) -> PruneReport:
    """One-shot oViT or WoodFisher on every rank of ``group`` (module docstring), same
    arguments as :func:`ovit.one_shot_prune` where they exist.

    Every rank passes the same model (same weights: checked first) and the same ``data`` (an
    iterable of batches, in the same order); rank r uses batches r, r + W, r + 2W, …;
    ``num_grads`` is the total over ranks and must be a multiple of W (each rank takes
    ``num_grads / W``); ``grad_mode`` and ``pass_batch_size`` as in :func:`ovit.one_shot_prune`,
    ``fisher_method`` ``"gram"`` or ``"woodbury"`` (absolute damping only, as on one process).
    ``memory_budget``: bytes per rank
    for the Fisher work (default as :func:`ovit.one_shot_prune`'s; the smallest over the ranks is
    used); a rank whose layers do not fit takes several passes over the data (layer groups, the
    single-GPU planner), and the others pass with it. Returns the same report on every rank; with
    ``debug``, checks that all ranks end with identical weights.
    """
    t_start = time.perf_counter()
    if method not in ("ovit", "woodfisher"):
        raise ValueError(f"distributed pruning runs 'ovit' or 'woodfisher', got {method!r}")
    if fisher_method not in ("gram", "woodbury"):
        raise ValueError(f"fisher_method must be 'gram' or 'woodbury', got {fisher_method!r}")
    if fisher_method == "woodbury" and damp_mode != "absolute":
        raise ValueError("fisher_method='woodbury' takes damp_mode='absolute' (relative damping needs the Gram)")
    grad_group(grad_mode, grad_batch_size)  # refuses a bad pair before any collective
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first (e.g. under torchrun)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nm = _parse_pattern(pattern)
    if nm is not None:
        sparsity = 1 - nm[0] / nm[1]
    if sparsity is None or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    if int(num_grads) != num_grads or num_grads < world or num_grads % world:
        raise ValueError(f"num_grads must be a positive multiple of the {world} ranks, got {num_grads!r}")
    loss_fn = loss_fn or F.cross_entropy
    device = next(model.parameters()).device
    with _comm("the check of the weights before pruning"):
        same = checksum(model, group)
    if not same:
        raise RankFailure("the ranks hold different weights before pruning: load the same checkpoint on every rank "
                          "(or broadcast rank 0's parameters)")  # fmt: skip
    chosen = select_layers(model, layers)
    players = [PrunableLayer(n, m, block_layout(m.weight.numel(), block_size, nm[1] if nm else 1)) for n, m in chosen]
    shards = shard_blocks(players, world)
    owner = {pc.name: r for r, sh in enumerate(shards) for pc in sh}
    pieces_of = {ly.name: [pc for sh in shards for pc in sh if pc.layer is ly] for ly in players}
    spec = stages.StepSpec(method, float(sparsity), nm, fisher_dtype, float(damp), damp_mode, backend, device)
    times: dict[str, float] = {}

    # --- memory: every rank's pieces planned by the single-GPU planner, under the smallest budget ----
    lim = torch.tensor([float(_memory_budget(device, memory_budget))], dtype=torch.float64, device=device)
    with _comm("the memory planning"):
        dist.all_reduce(lim, op=dist.ReduceOp.MIN, group=group)
    budget = int(lim.item())
    plans = [plan_memory(sh, budget, device, fisher_method, fisher_dtype, grad_chunk) if sh else None
             for sh in shards]  # fmt: skip
    passes = max(len(pl.groups) for pl in plans if pl is not None)
    in_pass = [{pc.name for pl in plans if pl is not None and p < len(pl.groups) for pc in pl.groups[p]}
               for p in range(passes)]  # fmt: skip
    store = plans[rank].store if plans[rank] is not None else device
    finvs: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    consume = stages.factored_elimination(spec)  # the inverses are this step's own: the factor may take them
    samples = 0
    for p in range(passes):
        # sampling: my share of the data; each chunk of a layer cut by pieces, each piece to its owner
        t0 = time.perf_counter()
        layers_p = [ly for ly in players if any(pc.name in in_pass[p] for pc in pieces_of[ly.name])]
        mine_p = [pc for pc in shards[rank] if pc.name in in_pass[p]]
        accs = {pc.name: ok.FisherInverse(pc.layout.num_blocks * pc.layout.block_size, pc.layout.block_size, damp,
                                          num_grads if fisher_method == "woodbury" else None, damp_mode=damp_mode,
                                          method=fisher_method, dtype=fisher_dtype, device=device, backend=backend,
                                          name=pc.name) for pc in mine_p}  # fmt: skip
        sinks = {ly.name: _ToOwners([(pc, owner[pc.name]) for pc in pieces_of[ly.name] if pc.name in in_pass[p]],
                                    accs, group) for ly in layers_p}  # fmt: skip
        error: BaseException | None = None
        try:
            stats = sample_gradients(model, _my_share(data, rank, world), layers_p, sinks, num_grads // world,
                                     loss_fn=loss_fn, device=device, grad_batch_size=grad_batch_size,
                                     grad_mode=grad_mode, pass_batch_size=pass_batch_size, chunk=grad_chunk,
                                     progress=progress)  # fmt: skip
            if stats.gradients != num_grads // world:
                raise ValueError(f"its share of the data gave {stats.gradients} of {num_grads // world} gradients")
            samples = max(samples, stats.samples)
        except RankFailure:
            raise
        except Exception as e:  # the others are waiting in the next exchange's agreement: tell them
            error = e
        _agree(error, group, "the gradient sampling")
        times["sampling"] = times.get("sampling", 0.0) + time.perf_counter() - t0
        # on the owner: inverses, elimination or scores of its pieces
        t0 = time.perf_counter()
        error = None
        try:
            for pc in mine_p:
                finvs[pc.name] = accs.pop(pc.name).compute()
            if method == "ovit":
                o, ls = stages.eliminate(mine_p, finvs, spec, consume=consume)  # type: ignore[arg-type]
                orders.update(o)
                losses.update(ls)
            else:
                scores.update(stages.score(mine_p, finvs, spec))  # type: ignore[arg-type]
            for pc in mine_p:  # waits for the reconstruction where the plan says (the CPU when passes > 1)
                finvs[pc.name] = finvs[pc.name].to(store)
        except Exception as e:  # every rank must hear of it before anyone goes on
            error = e
        _agree(error, group, "the Fisher inverses and the elimination")
        times["fisher_and_elimination"] = times.get("fisher_and_elimination", 0.0) + time.perf_counter() - t0

    # --- exact global selection: every rank gets every piece's losses (or scores) ----------------
    t0 = time.perf_counter()
    src = losses if method == "ovit" else scores
    full: dict[str, torch.Tensor] = {}
    for ly in players:
        steps = (ly.layout.block_size * (nm[1] - nm[0]) // nm[1]) if nm and method == "ovit" else ly.layout.block_size
        dt = fisher_dtype if method == "ovit" else torch.float32
        parts = []
        for pc in pieces_of[ly.name]:
            n = pc.stop - pc.start
            t = src[pc.name] if owner[pc.name] == rank else torch.empty(n, steps, dtype=dt, device=device)
            with _comm("the global selection"):
                dist.broadcast(t, src=_global(group, owner[pc.name]), group=group)
            parts.append(t)
        full[ly.name] = torch.cat(parts)
    selection = stages.select(players, spec, losses=full if method == "ovit" else None,
                              scores=full if method == "woodfisher" else None)  # fmt: skip
    times["selection"] = time.perf_counter() - t0

    # --- reconstruction of my pieces, agreement, then everyone gets every piece -------------------
    t0 = time.perf_counter()
    error = None
    new_w: dict[str, torch.Tensor] = {}
    keep: dict[str, torch.Tensor] = {}
    est_local = 0.0
    try:
        mine = shards[rank]
        sel = {pc.name: selection[pc.layer.name][pc.start : pc.stop] for pc in mine}
        new_w, keep, est = stages.reconstruct(mine, spec, sel, finvs=finvs, orders=orders, losses=losses,  # type: ignore[arg-type]
                                              factored=consume)  # fmt: skip
        est_local = float(est or 0.0)
    except Exception as e:
        error = e
    _agree(error, group, "the reconstruction")
    for ly in players:
        ws, ks = [], []
        for pc in pieces_of[ly.name]:
            n, b = pc.stop - pc.start, ly.layout.block_size
            mine_pc = owner[pc.name] == rank
            w = new_w[pc.name].to(torch.float32) if mine_pc else torch.empty(n, b, device=device)
            k = keep[pc.name].to(torch.uint8) if mine_pc else torch.empty(n, b, dtype=torch.uint8, device=device)
            with _comm("the exchange of the new weights"):
                dist.broadcast(w, src=_global(group, owner[pc.name]), group=group)
                dist.broadcast(k, src=_global(group, owner[pc.name]), group=group)
            ws.append(w)
            ks.append(k.bool())
        new_w[ly.name], keep[ly.name] = torch.cat(ws), torch.cat(ks)
    est_t = torch.tensor([est_local], dtype=torch.float64, device=device)
    with _comm("the exchange of the new weights"):
        dist.all_reduce(est_t, group=group)
    times["reconstruction"] = time.perf_counter() - t0
    stages.commit(players, new_w, keep)
    if debug and not checksum(model, group):
        raise RankFailure("the ranks ended with different weights")
    reports = []
    for ly in players:
        pruned = int((~keep[ly.name].reshape(-1)[: ly.layout.numel]).sum())
        reports.append(LayerReport(ly.name, ly.layout.numel, ly.layout.block_size, ly.layout.num_blocks, ly.layout.pad,
                                   pruned, pruned / ly.layout.numel))  # fmt: skip
    times["total"] = time.perf_counter() - t_start
    return PruneReport(
        method=method,
        sparsity=float(sparsity),
        pattern=pattern,
        total_params=sum(r.numel for r in reports),
        total_pruned=sum(r.pruned for r in reports),
        est_loss_increase=float(est_t.item()),
        num_grads=int(num_grads),
        layers=reports,
        times=times,
        notes=[
            f"{world} ranks; Fisher inverses by {fisher_method} updates on the owners; blocks per rank "
            f"{[sum(pc.stop - pc.start for pc in sh) for sh in shards]}"
        ],  # fmt: skip
        grad_mode=grad_mode,
        samples=samples * world,
        passes=passes,
    )


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


# --- planning a job before running it -----------------------------------------------------------------

# rates of SPEC §5 (H200, torch 2.11): fp64 tensor-core GEMM, fp32 GEMM; and assumptions, stated
FP64_FLOPS = 63e12
FP32_FLOPS = 51e12
TRAIN_FLOPS = 400e12  # effective bf16 rate of a ViT forward + backward (an assumption, not measured)


def plan_job(
    model: nn.Module,
    *,
    gpus: int,
    gpu_memory: float,
    block_size: int = 192,
    num_grads: int = 4096,
    grad_batch_size: int = 128,
    tokens: int = 197,
    fisher_dtype: torch.dtype = torch.float32,
    layers: str | Iterable[nn.Module | str] | None = None,
    memory_fraction: float = 0.7,
    chunk: int = 64,
    link_bytes_per_s: float = 100e9,
) -> dict:
    """The plan of a distributed one-shot run, without running it (``model`` may live on the
    meta device): the pieces of layers per rank (sharded as :func:`distributed_prune` shards
    them), each
    rank's Fisher memory and passes over the data (the single-GPU planner, ``plan_memory``, per
    rank with ``memory_fraction`` of ``gpu_memory``), the bytes exchanged per gradient, and an
    estimate of each phase from the rates of SPEC §5 (stated in the result)."""
    from .pruner import plan_memory

    chosen = select_layers(model, layers)
    players = [PrunableLayer(n, m, block_layout(m.weight.numel(), block_size)) for n, m in chosen]
    shards = shard_blocks(players, gpus)
    budget = int(memory_fraction * gpu_memory)
    params = sum(p.numel() for p in model.parameters())
    n_total = sum(ly.layout.numel for ly in players)
    ranks = []
    for r, sh in enumerate(shards):
        if not sh:
            ranks.append({"rank": r, "layers": 0, "weights": 0, "passes": 0, "state_bytes": 0, "peak_bytes": 0})
            continue
        plan = plan_memory(sh, budget, torch.device("cuda"), "gram", fisher_dtype, chunk)  # type: ignore[arg-type]
        n_r = sum(pc.layout.num_blocks * pc.layout.block_size for pc in sh)
        ranks.append({"rank": r, "layers": len(sh), "weights": n_r, "passes": len(plan.groups),
                      "state_bytes": 8 * n_r * block_size, "peak_bytes": plan.peak})  # fmt: skip
    worst = max(ranks, key=lambda x: x["weights"])
    n_r, passes = worst["weights"], max(1, max(x["passes"] for x in ranks))
    images = num_grads * grad_batch_size
    est = {
        "sampling_s": passes * 6 * params * tokens * images / gpus / TRAIN_FLOPS,
        "exchange_s": passes * 4 * n_total * num_grads * (gpus - 1) / gpus / gpus / link_bytes_per_s,
        "gram_s": n_r * block_size * num_grads / FP64_FLOPS,
        "inverse_s": 2 * n_r * block_size**2 / FP64_FLOPS,
        "elimination_s": 2 * n_r * block_size**2 / FP32_FLOPS,
        "selection_and_reconstruction_s": 2 * n_r * block_size**2 / 3 / FP32_FLOPS,
    }
    return {
        "params": params,
        "pruned_weights": n_total,
        "layers": len(players),
        "gpus": gpus,
        "budget_bytes": budget,
        "ranks": ranks,
        "bytes_per_gradient": 4 * n_total,
        "estimate": est,
        "assumptions": (f"fp64 GEMM {FP64_FLOPS / 1e12:.0f} TFLOP/s and fp32 {FP32_FLOPS / 1e12:.0f} (SPEC §5, H200); "
                        f"forward+backward at {TRAIN_FLOPS / 1e12:.0f} TFLOP/s effective (6·params·tokens per image, "
                        f"{tokens} tokens); links at {link_bytes_per_s / 1e9:.0f} GB/s; data split over the ranks"),
    }  # fmt: skip
