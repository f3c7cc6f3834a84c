"""One pruning step of a model with the public API of ``ovit_kernels`` (SPEC §3): :func:`run_step`
chains sampling, the Fisher (in layer groups when memory is short) and the stages of
:mod:`ovit.stages`; :class:`ovit.Pruner` runs it for each step (adding to persistent masks), and
:func:`one_shot_prune` is one step of a fresh Pruner."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import ovit_kernels as ok

from . import stages
from .layers import PrunableLayer, block_layout, select_layers
from .sampling import grad_group, sample_gradients

METHODS = ("ovit", "woodfisher", "magnitude", "global_magnitude")


@dataclass
class LayerReport:
    name: str
    numel: int
    block_size: int
    num_blocks: int
    pad: int
    pruned: int
    sparsity: float


@dataclass
class PruneReport:
    """What :func:`one_shot_prune` did. ``est_loss_increase`` is the sum of the OBS losses of
    what was pruned under the quadratic model (None when no Fisher was computed).
    ``distinct_batches`` is how many distinct gradients one pass over the data gives (its
    batches, in mini-batch mode; None when the gradients never went round it: no data was used
    twice); ``samples`` how many samples went through forward/backward passes (first pass over
    the data); ``planned_peak_bytes`` the memory plan's peak for the Fisher work
    (``peak_memory_bytes`` is the measured one, on a GPU)."""

    method: str
    sparsity: float
    pattern: str
    total_params: int
    total_pruned: int
    est_loss_increase: float | None
    num_grads: int
    passes: int
    layers: list[LayerReport] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    distinct_batches: int | None = None
    planned_peak_bytes: int | None = None
    grad_mode: str = "mini_batch"
    samples: int | None = None

    @property
    def achieved_sparsity(self) -> float:
        return self.total_pruned / max(1, self.total_params)

    def to_json(self) -> str:
        d = asdict(self)
        d["achieved_sparsity"] = self.achieved_sparsity
        return json.dumps(d, indent=1)


def _parse_pattern(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'n:m' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"an n:m pattern needs 0 < n < m, got {pattern!r}")
    return n, m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_budget(device: torch.device, budget: int | None) -> int:
    if budget is not None:
        return int(budget)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


def _auto_chunk(layers: list[PrunableLayer], fisher_method: str) -> int:
    """Gradients per accumulator update: every update reads and writes the whole Fisher state
    once, so larger chunks cut that traffic (the float64 Gram update stays memory-bound below
    ~128 gradients); the chunk buffers are kept at most a quarter of the state's bytes."""
    acc = 8 if fisher_method != "woodbury" else 4
    cap = min((ly.layout.block_size * (acc + 4)) // 16 for ly in layers) if layers else 16
    chunk = 16
    while chunk * 2 <= min(cap, 256):
        chunk *= 2
    return chunk


_GIB = float(1 << 30)


def _size(nbytes: float) -> str:
    return f"{nbytes / _GIB:.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / 2**20:.1f} MiB"


@dataclass
class MemoryPlan:
    """How the Fisher work is split to stay within a memory budget (bytes on the device).

    Attributes:
        groups: layer groups, one pass over the data each.
        store: where the inverses wait until the reconstruction: the device, or the CPU when a
            GPU cannot hold them all.
        peak: the planned peak of the Fisher work in bytes: what every pass holds plus the
            largest group's states and buffers.
        held: the part of ``peak`` that every pass holds (inverses kept on the device, working
            sets).
    """

    groups: list[list[PrunableLayer]]
    store: torch.device
    peak: int
    held: int


def _layer_bytes(ly: PrunableLayer, fisher_method: str, fisher_dtype: torch.dtype, chunk: int) -> dict[str, int]:
    """One layer's large buffers: the accumulator ``state`` (float64 Gram, or the Woodbury state
    in ``fisher_dtype``), the ``inverse`` it yields (the Woodbury state is its own inverse), the
    gradient chunk ``buffer``, and ``unit``: what the layer adds to its pass at the worst moment
    (state + buffer while sampling, state + inverse while inverting)."""
    lay = ly.layout
    square = lay.num_blocks * lay.block_size**2
    size = torch.tensor([], dtype=fisher_dtype).element_size()
    woodbury = fisher_method == "woodbury"
    state = square * (size if woodbury else 8)
    inverse = square * size
    buffer = chunk * lay.num_blocks * lay.block_size * 4
    return {"state": state, "inverse": inverse, "buffer": buffer,
            "unit": state + max(buffer, 0 if woodbury else inverse)}  # fmt: skip


def plan_memory(
    layers: list[PrunableLayer],
    budget: int,
    device: torch.device,
    fisher_method: str,
    fisher_dtype: torch.dtype,
    chunk: int,
) -> MemoryPlan:
    """Group the layers so that the Fisher work stays within ``budget`` bytes on ``device``.

    Counted: each layer's accumulator state and gradient chunk buffer while its group samples,
    its inverse from then on — on the device until the reconstruction when the inverses stay
    there (always on a CPU; on a GPU when one pass suffices) —, and the reference backend's
    bounded working sets. Not counted: the model, its activations and its gradients, which the
    budget must leave room for.

    Raises:
        MemoryError: a layer cannot fit even alone (with the numbers and what to change).
    """
    need = {ly.name: _layer_bytes(ly, fisher_method, fisher_dtype, chunk) for ly in layers}
    # the backend's bounded temporaries (ovit_kernels.working_set_bytes) for the largest layer, twice:
    # the allocator may keep a freed working set while the next one is taken
    work = 2 * max(ok.working_set_bytes(ly.layout.num_blocks, ly.layout.block_size, chunk) for ly in layers)
    # per weight, kept for every layer until the commit: the elimination order (8 B) and cumulative
    # loss (8 B), the weights in blocks, the new weights (4 B each) and the keep-mask (1 B)
    work += 25 * sum(ly.layout.num_blocks * ly.layout.block_size for ly in layers)
    one_pass = sum(n["unit"] for n in need.values())
    if one_pass + work <= budget:
        return MemoryPlan([list(layers)], device, one_pass + work, work)
    # several passes. On a GPU the inverses wait on the CPU; on a CPU they stay where they are,
    # so every pass also holds the other layers' inverses (counted once for all, here).
    on_cpu = device.type == "cpu"
    held = work + (sum(n["inverse"] for n in need.values()) if on_cpu else 0)

    def cost(ly: PrunableLayer) -> int:  # what the layer adds to its pass beyond ``held``
        n = need[ly.name]
        return n["unit"] - (n["inverse"] if on_cpu else 0)

    groups: list[list[PrunableLayer]] = [[]]
    used = largest = 0
    for ly in layers:
        c = cost(ly)
        if held + c > budget:
            n = need[ly.name]
            where = " (all layers' inverses stay in memory until the reconstruction)" if on_cpu else ""
            raise MemoryError(
                f"layer {ly.name!r} needs {_size(n['unit'])} for its Fisher (state {_size(n['state'])}, inverse "
                f"{_size(n['inverse'])}, gradient buffer {_size(n['buffer'])}), and every pass holds "
                f"{_size(held)}{where}: more than the memory budget of {_size(budget)}. Options: a smaller "
                "block_size (the memory grows with B), fisher_method='woodbury' with fisher_dtype=torch.float32 "
                "(a 4-byte state instead of the 8-byte Gram), a smaller grad_chunk, fewer layers per run, or a "
                "larger memory_budget"
            )
        if groups[-1] and held + used + c > budget:
            groups.append([])
            used = 0
        groups[-1].append(ly)
        used += c
        largest = max(largest, used)
    return MemoryPlan(groups, device if on_cpu else torch.device("cpu"), held + largest, held)


def one_shot_prune(
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
    fisher_method: str = "auto",
    fisher_dtype: torch.dtype = torch.float32,
    amp_dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    grad_chunk: int | None = None,
    backend: str | None = None,
    progress: bool = True,
    fisher_cache: dict[str, torch.Tensor] | None = None,
) -> PruneReport:
    """Prune ``model`` one-shot, in place, and return a :class:`PruneReport`: one step of a fresh
    :class:`ovit.Pruner` (the same stages as every gradual, sharded or adapter flow).

    Args:
        model: any ``nn.Module``; its weights are changed only if the whole run succeeds.
        data: iterable of ``(inputs, targets)`` batches (e.g. a DataLoader); in mini-batch mode
            each batch gives one gradient (re-cut to ``grad_batch_size`` samples if that is
            given). Iterated again as needed when it can be (DataLoader, list).
        grad_batch_size: g, the samples averaged into one gradient (the paper: 128).
        grad_mode: how the gradients are computed (:mod:`ovit.sampling`): ``"mini_batch"``
            (one backward pass per gradient), ``"per_sample"`` (g = 1: the empirical Fisher of
            single samples) or ``"micro_batch"`` (groups of g), both from per-sample gradients
            of passes of ``pass_batch_size`` samples — the same gradients as mini-batch mode
            at the same g, for a fraction of the passes. An absolute ``damp`` tuned at one g
            is a different method at another (E[ḡḡᵀ] ≈ F/g): prefer ``damp_mode="relative"``
            when changing either.
        pass_batch_size: samples per forward/backward pass in the per-sample modes.
        sparsity: fraction of the selected weights to prune, in [0, 1). With an n:m
            ``pattern`` it is 1 − n/m and may be omitted.
        method: ``"ovit"`` (correlation-aware greedy elimination + global selection +
            reconstruction), ``"woodfisher"`` (global OBS saliency + independent update),
            ``"magnitude"`` (uniform per layer) or ``"global_magnitude"``.
        block_size: Fisher block size B (SPEC §1 decides the actual block per layer).
        num_grads: m, the number of gradients of the empirical Fisher.
        damp, damp_mode: dampening λ; ``"relative"`` scales it by the mean Fisher diagonal.
        pattern: ``"unstructured"`` or ``"n:m"`` (e.g. ``"2:4"``).
        layers: ``None`` (timm ViT/DeiT/Swin defaults), a regex on module names, or a list of
            modules / names (Linear and Conv2d).
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy.
        fisher_method, fisher_dtype: see :class:`ovit_kernels.FisherInverse`.
        amp_dtype: autocast dtype for forward/backward (e.g. ``torch.bfloat16``); the Fisher
            maths stays float32/float64.
        memory_budget: bytes the Fisher inverses may use; beyond it, layers are processed in
            groups, one pass over the data per group (default: 70% of free GPU memory, or half
            of the host memory on CPU).
        grad_chunk: gradients buffered per layer before each accumulator update (default:
            16–256, the most whose buffers stay within a quarter of the Fisher state; each
            update reads and writes the whole state once).
        backend: ovit_kernels backend for every op.
        progress: show a progress bar while sampling.
        fisher_cache: a dict to share the gradient statistics between calls on the same dense
            model (several methods, sparsities or dampings): filled on the first call, reused
            after. It holds each layer's float64 Gram Σ g gᵀ (the damping is applied at every
            call, so a damping search samples once) and the inverse of the last damping asked
            (calls with the same damping reuse it); with ``fisher_method="woodbury"`` the damping
            is folded into the state, and the cache keeps one per damping. It is only
            valid while the weights and their zeros, the data and ``num_grads`` are unchanged.
    """
    from .gradual import Pruner

    pruner = Pruner(model, layers=layers, method=method, block_size=block_size, pattern=pattern, damp=damp,
                    damp_mode=damp_mode, num_grads=num_grads, grad_batch_size=grad_batch_size, grad_mode=grad_mode,
                    pass_batch_size=pass_batch_size, loss_fn=loss_fn, fisher_method=fisher_method,
                    fisher_dtype=fisher_dtype, amp_dtype=amp_dtype, memory_budget=memory_budget,
                    grad_chunk=grad_chunk, backend=backend, progress=progress)  # fmt: skip
    return pruner.step(data, sparsity, fisher_cache=fisher_cache)


def run_step(
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
    fisher_method: str = "auto",
    fisher_dtype: torch.dtype = torch.float32,
    amp_dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    grad_chunk: int | None = None,
    backend: str | None = None,
    progress: bool = True,
    fisher_cache: dict[str, torch.Tensor] | None = None,
) -> PruneReport:
    """The driver of one pruning event on ``model`` (the arguments of :func:`one_shot_prune`):
    masked gradient sampling into the Fisher accumulators, inverses, elimination or scores
    (``ovit.stages``), global selection, reconstruction and an all-or-nothing commit. Called by
    :meth:`ovit.Pruner.step` for each of its sub-steps; use :func:`one_shot_prune` or a
    :class:`ovit.Pruner`, which validate the step (masks, targets) around it and have already
    checked ``method``, ``num_grads`` and ``block_size``."""
    t_start = time.perf_counter()
    nm = _parse_pattern(pattern)
    if nm is not None:
        fixed = 1 - nm[0] / nm[1]
        if sparsity is not None and not math.isclose(float(sparsity), fixed, abs_tol=1e-9):
            raise ValueError(f"pattern {pattern!r} fixes the sparsity at {fixed:g}; got sparsity={sparsity}")
        sparsity = fixed
    if sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    num_grads, block_size = int(num_grads), int(block_size)
    grad_group(grad_mode, grad_batch_size)  # refuses a bad pair before any work
    if grad_mode != "mini_batch" and damp_mode == "absolute" and method in ("ovit", "woodfisher"):
        warnings.warn(
            f"ovit: grad_mode={grad_mode!r} with an absolute damp={damp:g}: gradients of fewer samples have a "
            "larger Fisher scale (E[ḡḡᵀ] ≈ F/g for g samples), so a λ tuned for mini-batches means a different "
            "method here; damp_mode='relative' follows the estimator",
            RuntimeWarning,
            stacklevel=4,  # the caller of one_shot_prune (or of Pruner.step, one frame out)
        )
    loss_fn = loss_fn or F.cross_entropy
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    device = params[0].device
    group = nm[1] if nm else 1
    chosen = select_layers(model, layers)
    players = [PrunableLayer(n, m, block_layout(m.weight.numel(), block_size, group)) for n, m in chosen]
    for ly in players:
        w = ly.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{ly.name!r} has NaN/Inf weights ({int((~torch.isfinite(w)).sum())} of {w.numel()})")
        if nm is not None and w[0].numel() % nm[1]:
            raise ValueError(
                f"pattern {pattern!r}: {ly.name!r} has rows of {w[0].numel()} weights, not a multiple of "
                f"{nm[1]}, so its groups would straddle rows (not a hardware N:M pattern); leave it out of layers"
            )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, float] = {}
    notes: list[str] = []
    needs_fisher = method in ("ovit", "woodfisher")

    # --- Fisher inverses (and the greedy elimination, group by group) ---------------------
    finvs: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}

    scores: dict[str, torch.Tensor] = {}

    spec = stages.StepSpec(method, sparsity, nm, fisher_dtype, float(damp), damp_mode, backend, device)

    def _while_on_device(grp: list[PrunableLayer]) -> None:
        """What needs a group's inverses, done while they are on the device: the greedy
        elimination (ovit) or the OBS saliencies (woodfisher)."""
        t0 = time.perf_counter()
        if method == "woodfisher":
            scores.update(stages.score(grp, finvs, spec))
        else:
            o, ls = stages.eliminate(grp, finvs, spec, consume=consume)
            orders.update(o)
            losses.update(ls)
        _sync(device)
        key = "elimination" if method == "ovit" else "scores"
        times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    # the elimination may leave its factor in the inverses' memory when they are this step's own
    consume = stages.factored_elimination(spec) and fisher_cache is None
    taken = 0
    distinct: int | None = None
    samples: int | None = None
    planned_peak: int | None = None
    passes = 0
    if needs_fisher:
        budget = _memory_budget(device, memory_budget)
        if grad_chunk is None:
            grad_chunk = max(1, min(_auto_chunk(players, fisher_method), int(num_grads)))
        elif int(grad_chunk) != grad_chunk or grad_chunk < 1:
            raise ValueError(f"grad_chunk must be a positive int, got {grad_chunk!r}")
        plan = plan_memory(players, budget, device, fisher_method, fisher_dtype, grad_chunk)
        groups, store = plan.groups, plan.store
        passes = len(groups)
        planned_peak = plan.peak
        if passes > 1:
            notes.append(
                f"the Fisher work does not fit the memory budget of {_size(budget)} in one pass: {passes} "
                f"passes over the data, one per layer group (planned peak {_size(plan.peak)}); inverses "
                f"kept on {'the CPU' if store.type == 'cpu' else store} until the reconstruction"
            )
            if progress:
                print(f"ovit: {notes[-1]}")
        woodbury = fisher_method == "woodbury"

        def cache_key(ly: PrunableLayer) -> str:
            return f"{ly.name}@{damp_mode}:{damp!r}" if woodbury else ly.name

        cached = fisher_cache is not None and all(cache_key(ly) in fisher_cache for ly in players)
        if cached:
            groups, passes = [players], 0
            notes.append("gradient statistics taken from fisher_cache")
        for gi, grp in enumerate(groups):
            if cached:
                t0 = time.perf_counter()
                for ly in grp:
                    entry = fisher_cache[cache_key(ly)]
                    taken = entry["num_grads"]
                    if woodbury:
                        finvs[ly.name] = entry["finv"].to(device)
                        continue
                    last = (damp_mode, damp, fisher_dtype)  # the inverse of the last damping asked, kept
                    if entry.get("last") != last:
                        acc = ok.FisherInverse.from_gram(entry["gram"].to(device), taken, damp, damp_mode=damp_mode,
                                                         dtype=fisher_dtype, backend=backend, name=ly.name)  # fmt: skip
                        entry["last"], entry["finv"] = last, acc.compute()
                    finvs[ly.name] = entry["finv"].to(device)
                times["fisher_inverse"] = time.perf_counter() - t0
                break
            accs = {
                ly.name: ok.FisherInverse(
                    ly.layout.num_blocks * ly.layout.block_size,
                    ly.layout.block_size,
                    damp,
                    num_grads if fisher_method == "woodbury" else None,
                    damp_mode=damp_mode,
                    method=fisher_method,
                    dtype=fisher_dtype,
                    device=device,
                    backend=backend,
                    name=ly.name,
                )
                for ly in grp
            }
            t0 = time.perf_counter()
            stats = sample_gradients(
                model,
                data,
                grp,
                accs,
                int(num_grads),
                loss_fn=loss_fn,
                device=device,
                grad_batch_size=grad_batch_size,
                grad_mode=grad_mode,
                pass_batch_size=pass_batch_size,
                amp_dtype=amp_dtype,
                chunk=grad_chunk,
                progress=progress,
                desc=f"gradients (pass {gi + 1}/{passes})" if passes > 1 else "gradients",
                warn_repeats=gi == 0,
            )
            _sync(device)
            times["sampling"] = times.get("sampling", 0.0) + time.perf_counter() - t0
            taken, distinct = stats.gradients, stats.distinct_gradients
            if gi == 0:
                samples = stats.samples
            if taken < num_grads:
                notes.append(f"data ran out after {taken} of {num_grads} gradients")
            if gi == 0 and stats.repeats:  # sample_gradients warned when the data went round
                notes.append(
                    f"the {taken} gradients came from only {distinct} distinct ones (about "
                    f"{taken / max(1, distinct):.1f} uses each)"
                )
            t0 = time.perf_counter()
            for ly in grp:
                acc = accs.pop(ly.name)
                if fisher_cache is not None and not woodbury:
                    fisher_cache[cache_key(ly)] = {"gram": acc.gram().to(store), "num_grads": taken}
                finvs[ly.name] = acc.compute(allow_fewer=True)  # short data: the m actually seen
            _sync(device)
            times["fisher_inverse"] = times.get("fisher_inverse", 0.0) + time.perf_counter() - t0
            _while_on_device(grp)
            for ly in grp:
                finvs[ly.name] = finvs[ly.name].to(store)
                if fisher_cache is not None and woodbury:
                    fisher_cache[cache_key(ly)] = {"finv": finvs[ly.name], "num_grads": taken}
        if cached:
            _while_on_device(players)

    # --- selection and new weights ---------------------------------------------------------
    t0 = time.perf_counter()
    selection = stages.select(players, spec, losses=losses, scores=scores)
    times["selection"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grams = None
    if method == "woodfisher" and fisher_cache is not None:  # WoodFisher's loss from the cached Gram
        grams = {ly.name: (fisher_cache[ly.name]["gram"], fisher_cache[ly.name]["num_grads"])
                 for ly in players if "gram" in fisher_cache.get(ly.name, {})}  # fmt: skip
    new_w, keep, est = stages.reconstruct(players, spec, selection, finvs=finvs, orders=orders, losses=losses,
                                          grams=grams, factored=consume)  # fmt: skip
    times["reconstruction"] = time.perf_counter() - t0

    # --- commit: only now is the model changed ----------------------------------------------
    reports = []
    for ly in players:
        kp = keep[ly.name].reshape(-1)[: ly.layout.numel]
        pruned = int((~kp).sum())
        reports.append(
            LayerReport(
                ly.name,
                ly.layout.numel,
                ly.layout.block_size,
                ly.layout.num_blocks,
                ly.layout.pad,
                pruned,
                pruned / ly.layout.numel,
            )
        )
    stages.commit(players, new_w, keep)  # all or nothing, even if interrupted
    _sync(device)
    times["total"] = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return PruneReport(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        total_params=sum(r.numel for r in reports),
        total_pruned=sum(r.pruned for r in reports),
        est_loss_increase=est,
        num_grads=taken if needs_fisher else 0,
        distinct_batches=distinct,
        grad_mode=grad_mode,
        samples=samples,
        planned_peak_bytes=planned_peak,
        passes=passes,
        layers=reports,
        times=times,
        peak_memory_bytes=peak,
        notes=notes,
    )
