"""The demo: a small ViT trained on scikit-learn's digits, pruned one-shot by every method.

The damping λ of the two second-order methods (oViT and WoodFisher) is searched for each
method and sparsity on a validation split held out of the training data, over one grid of
absolute and relative values shared by both (``DAMP_GRID``); each method is then reported on
the test split at its own best λ, which is named. Prints held-out accuracy (dense vs each
method at 50/75/90% sparsity, mean over seeds) and writes a plot of accuracy vs sparsity.
Trained weights are cached under the user cache dir (``$XDG_CACHE_HOME/ovit`` or
``~/.cache/ovit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .models import TinyViT
from .pruner import METHODS, one_shot_prune

FISHER_METHODS = ("ovit", "woodfisher")
# the same grid for every method: absolute λ (added to the diagonal as is) and relative λ
# (times the mean of the Fisher's diagonal, per block)
DAMP_GRID: tuple[tuple[str, float], ...] = (
    ("absolute", 1e-8),
    ("absolute", 1e-6),
    ("absolute", 1e-4),
    ("absolute", 1e-2),
    ("relative", 1e-4),
    ("relative", 1e-2),
    ("relative", 1e-1),
    ("relative", 1.0),
)


@dataclass
class DemoConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9)
    methods: tuple[str, ...] = METHODS
    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 32
    block_size: int = 64
    # gradients of 2 images: the training split (1005 images) holds 502 distinct batches, so
    # no batch is used twice
    num_grads: int = 500
    grad_batch_size: int = 2
    # each gradient is still that of 2 images; they are formed from per-sample gradients of
    # passes of 64 images (ovit.sampling), the same gradients as 500 backward passes of 2
    grad_mode: str = "micro_batch"
    pass_batch_size: int = 64
    damps: tuple[tuple[str, float], ...] = DAMP_GRID
    val_fraction: float = 0.2  # of the training split, held out to choose λ
    out: str = "ovit_out"
    model: dict = field(default_factory=lambda: {"dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0})


def damp_label(damp: tuple[str, float] | None) -> str:
    """``("relative", 0.01)`` → ``"rel 1e-02"``; None (a method without λ) → ``"-"``."""
    if damp is None:
        return "-"
    return f"{'abs' if damp[0] == 'absolute' else 'rel'} {damp[1]:.0e}"


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ovit")


def load_digits_split(
    seed: int, val_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float tensors in [0, 1]: a stratified 70/30 train/test split per
    seed, and ``val_fraction`` of the training part held out as a validation split (stratified).
    Returns ``(x_train, y_train, x_val, y_val, x_test, y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.3, random_state=seed, stratify=d.target)
    va = tr[:0]
    if val_fraction > 0:
        tr, va = train_test_split(tr, test_size=val_fraction, random_state=seed, stratify=d.target[tr])
    return x[tr], y[tr], x[va], y[va], x[te], y[te]


def gradient_batches(
    x: torch.Tensor, y: torch.Tensor, seed: int, size: int, count: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint batches of ``size`` images in a fixed random order per seed (all that fit, or the
    first ``count``): the data every pruning run of a seed samples its gradients from."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1000))
    stop = len(y) - size + 1 if count is None else count * size
    return [(x[perm[i : i + size]], y[perm[i : i + size]]) for i in range(0, stop, size)]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(cfg: DemoConfig, seed: int, x: torch.Tensor, y: torch.Tensor, log=print) -> TinyViT:
    """Train (or load from the cache) the dense model of one seed."""
    key = hashlib.sha1(
        json.dumps([seed, cfg.epochs, cfg.lr, cfg.batch_size, cfg.model, cfg.val_fraction], sort_keys=True).encode()
    )
    path = os.path.join(cache_dir(), f"digits_vit_{key.hexdigest()[:12]}.pt")
    torch.manual_seed(seed)
    model = TinyViT(**cfg.model)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log(f"seed {seed}: dense model loaded from {path}")
        return model
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    steps = cfg.epochs * ((len(y) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(x[b]), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    log(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s, cached at {path}")
    return model


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict:
    """Train, prune by every method at every sparsity (the second-order methods at every λ of
    the grid), choose each method's λ on the validation split, print the table, write the plot.

    Returns ``{"dense": [test acc per seed], "results": {method: {sparsity: [test acc per seed
    at the chosen λ]}}, "chosen_damp": {method: {sparsity: label}}, "search": {method:
    {sparsity: {λ: {"val": [per seed], "test": [per seed] at the chosen λ, else None}}}}, ...}``.
    The test split is evaluated only at the chosen λ.
    """
    cfg = cfg or DemoConfig()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    fisher_methods = [m for m in cfg.methods if m in FISHER_METHODS]
    grid: dict[str, list] = {m: (list(cfg.damps) if m in FISHER_METHODS else [None]) for m in cfg.methods}
    # accuracies[split][method][sparsity][damp index] = [per seed]
    acc: dict = {sp: {m: {s: [[] for _ in grid[m]] for s in cfg.sparsities} for m in cfg.methods}
                 for sp in ("val", "test")}  # fmt: skip
    pruned: dict = {m: {s: [[] for _ in grid[m]] for s in cfg.sparsities} for m in cfg.methods}
    tests: list[tuple[torch.Tensor, torch.Tensor]] = []
    dense_acc: list[float] = []
    t_all = time.perf_counter()
    t_prune = 0.0
    for seed in cfg.seeds:
        xtr, ytr, xva, yva, xte, yte = load_digits_split(seed, cfg.val_fraction)
        dense = train(cfg, seed, xtr, ytr, log)
        dense_acc.append(accuracy(dense, xte, yte))
        data = gradient_batches(xtr, ytr, seed, cfg.grad_batch_size)
        t0 = time.perf_counter()
        # the grid holds absolute λ on purpose (each is compared on the validation split)
        warnings.filterwarnings("ignore", message="ovit: grad_mode=", category=RuntimeWarning)
        shared: dict = {}  # the Gram of the gradients, sampled once per seed for every method and λ
        # λ outermost: the cache keeps the inverse of the last λ, shared by every method and sparsity
        runs = [(di, method) for di in range(len(cfg.damps)) for method in fisher_methods]
        runs += [(0, method) for method in cfg.methods if method not in fisher_methods]
        for di, method in runs:
            damp = grid[method][di]
            mode, lam = damp if damp is not None else ("absolute", 1e-8)
            for s in cfg.sparsities:
                model = TinyViT(**cfg.model)
                model.load_state_dict(dense.state_dict())
                one_shot_prune(
                    model,
                    data,
                    s,
                    method=method,
                    block_size=cfg.block_size,
                    num_grads=cfg.num_grads,
                    grad_batch_size=cfg.grad_batch_size,
                    grad_mode=cfg.grad_mode,
                    pass_batch_size=cfg.pass_batch_size if cfg.grad_mode != "mini_batch" else None,
                    damp=lam,
                    damp_mode=mode,
                    progress=False,
                    fisher_cache=shared if method in fisher_methods else None,
                )
                acc["val"][method][s][di].append(accuracy(model, xva, yva) if len(yva) else float("nan"))
                # kept for the test split, which is evaluated only at the λ the validation chooses
                pruned[method][s][di].append({k: v.clone() for k, v in model.state_dict().items()})
        tests.append((xte, yte))
        t_prune += time.perf_counter() - t0
        log(f"seed {seed}: dense {dense_acc[-1]:.4f}, pruned every method in {time.perf_counter() - t0:.0f} s")

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    chosen: dict[str, dict[float, int]] = {}
    for m in cfg.methods:  # each method and sparsity at its own best λ on the validation split
        chosen[m] = {}
        for s in cfg.sparsities:
            vals = [mean(v) for v in acc["val"][m][s]]
            chosen[m][s] = max(range(len(vals)), key=lambda i, vals=vals: (vals[i], -i))
    t0 = time.perf_counter()
    model = TinyViT(**cfg.model)
    for m in cfg.methods:
        for s in cfg.sparsities:
            for state, (xte, yte) in zip(pruned[m][s][chosen[m][s]], tests):
                model.load_state_dict(state)
                acc["test"][m][s][chosen[m][s]].append(accuracy(model, xte, yte))
    t_prune += time.perf_counter() - t0
    res = {m: {s: acc["test"][m][s][chosen[m][s]] for s in cfg.sparsities} for m in cfg.methods}
    labels = {m: {s: damp_label(grid[m][chosen[m][s]]) for s in cfg.sparsities} for m in cfg.methods}
    dmean = mean(dense_acc)
    head = f"{'method':<18}" + "".join(f"{f'{s:.0%}':>20}" for s in cfg.sparsities)
    lines = [
        f"held-out (test) accuracy, mean of {len(cfg.seeds)} seed(s); dense {dmean:.4f}; "
        "λ chosen per method and sparsity on the validation split",
        head,
        "-" * len(head),
    ]
    for m in cfg.methods:
        cells = "".join(f"{f'{mean(res[m][s]):.4f} ({labels[m][s]})':>20}" for s in cfg.sparsities)
        lines.append(f"{m:<18}{cells}")
    log("\n".join(lines))
    os.makedirs(cfg.out, exist_ok=True)
    png = os.path.join(cfg.out, "digits_accuracy.png")
    _plot(png, cfg, dmean, {m: [mean(res[m][s]) for s in cfg.sparsities] for m in cfg.methods})
    search = {
        m: {str(s): {damp_label(d): {sp: acc[sp][m][s][i] or None for sp in ("val", "test")}
                     for i, d in enumerate(grid[m])}
            for s in cfg.sparsities}
        for m in cfg.methods
    }  # fmt: skip
    summary = {
        "config": asdict(cfg),
        "dense": dense_acc,
        "results": {m: {str(s): v for s, v in d.items()} for m, d in res.items()},
        "chosen_damp": {m: {str(s): v for s, v in d.items()} for m, d in labels.items()},
        "search": search,
        "seconds": time.perf_counter() - t_all,
        "pruning_seconds": t_prune,
        "plot": png,
    }
    with open(os.path.join(cfg.out, "digits_results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"pruning took {t_prune:.0f} s; plot: {png}; results: {os.path.join(cfg.out, 'digits_results.json')}")
    return summary


def _plot(path: str, cfg: DemoConfig, dense: float, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * s for s in cfg.sparsities]
    for m, ys in curves.items():
        ax.plot(xs, ys, marker="o", label=m)
    ax.axhline(dense, color="k", linestyle="--", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("One-shot pruning of a small ViT on digits (each method at its best λ)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- gradual pruning on digits ---------------------------------------------------------------------


@dataclass
class GradualConfig:
    """``ovit demo --gradual``: gradual oViT vs gradual global magnitude (same schedule, same
    epochs, same optimizer) from the demo's dense models, and one-shot oViT at the same
    sparsities (its λ searched on the validation split)."""

    base: DemoConfig = field(default_factory=DemoConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    initial: float = 0.5
    final: float = 0.95
    steps: int = 10  # linear: 0.50, 0.55, …, 0.95
    every: int = 2
    hold: int = 4
    lr: float = 1e-3
    methods: tuple[str, ...] = ("ovit", "global_magnitude")
    damp: tuple[str, float] = ("relative", 1e-2)
    report: tuple[float, ...] = (0.9, 0.95)
    one_shot_damps: tuple[tuple[str, float], ...] = (("relative", 1e-4), ("relative", 1e-2), ("absolute", 1e-6))
    # each step's Fisher: per-sample gradients of 256 images (a pruning step costs less than a
    # recovery epoch over the 804 training images)
    num_grads: int = 256
    grad_batch_size: int = 1
    distill: bool = False  # recover with distillation from the dense model (both methods)
    # a reported sparsity below ``final`` gets its own run, whose schedule ends there (same
    # increments, then the same hold), as "gradual to 90%" means; the sweep's checkpoint at that
    # sparsity (recovered for ``every`` epochs only) is kept in the JSON beside it
    own_runs: bool = True
    out: str = "ovit_out"


class _Shuffled:
    """Batches of a new permutation of (x, y) at every pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.y) + self.batch - 1) // self.batch

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.gen)
        for i in range(0, len(self.y), self.batch):
            b = perm[i : i + self.batch]
            yield self.x[b], self.y[b]


def run_gradual_demo(cfg: GradualConfig | None = None, log=print) -> dict:
    """Run the gradual demo; print the table (test accuracy of the best-on-validation model at
    each reported sparsity, mean over seeds) and write ``digits_gradual.png`` and
    ``digits_gradual.json``."""
    from .gradual import Pruner, gradual_prune
    from .schedules import SparsitySchedule

    cfg = cfg or GradualConfig()
    base = cfg.base
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    sched = SparsitySchedule(cfg.initial, cfg.final, steps=cfg.steps, every=cfg.every, hold=cfg.hold, kind="linear")
    for s in cfg.report:
        if not any(abs(sched.target(k) - s) < 1e-9 for k in range(sched.steps)):
            raise ValueError(f"the schedule never reaches {s}")
    res: dict = {m: {s: [] for s in cfg.report} for m in (*cfg.methods, "one-shot ovit")}
    sweep: dict = {m: {s: [] for s in cfg.report} for m in cfg.methods}  # the checkpoints of the run to `final`
    inc = (cfg.final - cfg.initial) / max(1, cfg.steps - 1)
    own = {s: SparsitySchedule(cfg.initial, s, steps=round((s - cfg.initial) / inc) + 1, every=cfg.every,
                               hold=cfg.hold, kind="linear")
           for s in cfg.report if cfg.own_runs and s < cfg.final - 1e-9}  # fmt: skip
    dense_acc: list[float] = []
    curves: dict = {m: [] for m in cfg.methods}
    times: dict = {m: {"prune": 0.0, "train": 0.0, "epochs": 0, "steps": 0} for m in cfg.methods}
    t_all = time.perf_counter()
    for seed in cfg.seeds:
        xtr, ytr, xva, yva, xte, yte = load_digits_split(seed, base.val_fraction)
        dense = train(base, seed, xtr, ytr, log)
        dense_acc.append(accuracy(dense, xte, yte))
        g = base.grad_batch_size
        calib = gradient_batches(xtr, ytr, seed, g)
        opts = dict(block_size=base.block_size, num_grads=base.num_grads, grad_batch_size=g, grad_mode=base.grad_mode,
                    pass_batch_size=base.pass_batch_size, progress=False)  # fmt: skip
        steps_opts = dict(opts, num_grads=cfg.num_grads, grad_batch_size=cfg.grad_batch_size,
                          grad_mode="per_sample" if cfg.grad_batch_size == 1 else "micro_batch")  # fmt: skip
        for method in cfg.methods:
            for target, schedule in ((cfg.final, sched), *own.items()):
                model = TinyViT(**base.model)
                model.load_state_dict(dense.state_dict())
                pruner = Pruner(model, method=method, damp=cfg.damp[1], damp_mode=cfg.damp[0], **steps_opts)
                run_dir = os.path.join(cfg.out, "gradual", f"{method}_to{target:.2f}_seed{seed}")
                hist = gradual_prune(model, _Shuffled(xtr, ytr, base.batch_size, seed), schedule=schedule,
                                     optimizer=lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=0.05),
                                     pruner=pruner, calib_data=calib, eval_data=[(xva, yva)], log=None,
                                     teacher=dense if cfg.distill else None,
                                     out_dir=run_dir, resume=False)  # fmt: skip
                for s in cfg.report if target == cfg.final else (target,):
                    ck = torch.load(os.path.join(run_dir, f"sparsity={s:.4f}", "best.pt"), weights_only=False)
                    model.load_state_dict(ck["model"])
                    acc = accuracy(model, xte, yte)
                    if target == cfg.final:
                        sweep[method][s].append(acc)
                    if target == s or s not in own:
                        res[method][s].append(acc)
                if target == cfg.final:
                    curves[method].append([(h["epoch"], h["sparsity"], h["accuracy"]) for h in hist])
                times[method]["prune"] += sum(h["prune_seconds"] for h in hist)
                times[method]["train"] += sum(h["train_seconds"] for h in hist)
                times[method]["epochs"] += len(hist)
                times[method]["steps"] += schedule.steps
        # one-shot oViT at the reported sparsities, λ chosen on the validation split
        shared: dict = {}
        for s in cfg.report:
            scored = []
            for mode, lam in cfg.one_shot_damps:
                model = TinyViT(**base.model)
                model.load_state_dict(dense.state_dict())
                with warnings.catch_warnings():  # the grid holds an absolute λ on purpose (chosen on validation)
                    warnings.filterwarnings("ignore", message="ovit: grad_mode=", category=RuntimeWarning)
                    one_shot_prune(model, calib, s, method="ovit", damp=lam, damp_mode=mode, fisher_cache=shared,
                                   **opts)  # fmt: skip
                scored.append((accuracy(model, xva, yva), accuracy(model, xte, yte)))
            res["one-shot ovit"][s].append(max(scored)[1])
        log(f"seed {seed}: dense {dense_acc[-1]:.4f}; " + ", ".join(
            f"{m} {res[m][cfg.report[-1]][-1]:.4f}" for m in res) + f" at {cfg.report[-1]:.0%}")  # fmt: skip

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    dmean = mean(dense_acc)
    head = f"{'method':<20}" + "".join(f"{f'{s:.0%}':>18}" for s in cfg.report)
    lines = [f"held-out (test) accuracy, mean of {len(cfg.seeds)} seed(s); dense {dmean:.4f}"]
    if own:
        lines.append(f"gradual runs to {', '.join(f'{s:.0%}' for s in own)} and to {cfg.final:.0%}, each ending with "
                     f"{cfg.hold} epochs at its target")  # fmt: skip
    lines += [head, "-" * len(head)]
    for m in res:
        cells = "".join(f"{f'{mean(res[m][s]):.4f} ({mean(res[m][s]) / dmean - 1:+.1%})':>18}" for s in cfg.report)
        lines.append(f"{m:<20}{cells}")
    for m in cfg.methods:
        t = times[m]
        lines.append(f"{m}: a pruning step took {t['prune'] / max(1, t['steps']):.2f} s, a recovery epoch "
                     f"{t['train'] / max(1, t['epochs']):.2f} s")  # fmt: skip
    log("\n".join(lines))
    os.makedirs(cfg.out, exist_ok=True)
    png = os.path.join(cfg.out, "digits_gradual.png")
    _plot_gradual(png, curves, dmean)
    summary = {
        "config": asdict(cfg),
        "schedule": [sched.target(k) for k in range(sched.steps)],
        "dense": dense_acc,
        "results": {m: {str(s): v for s, v in d.items()} for m, d in res.items()},
        "sweep_to_final": {m: {str(s): v for s, v in d.items()} for m, d in sweep.items()},
        "curves": curves,
        "times": times,
        "seconds": time.perf_counter() - t_all,
        "plot": png,
    }
    with open(os.path.join(cfg.out, "digits_gradual.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"took {summary['seconds']:.0f} s; plot: {png}; results: {os.path.join(cfg.out, 'digits_gradual.json')}")
    return summary


def _plot_gradual(path: str, curves: dict, dense: float) -> None:
    """Validation accuracy over the epochs of the first seed (sparsity on the right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax2 = ax.twinx()
    for m, runs in curves.items():
        ep = [e for e, _, _ in runs[0]]
        ax.plot(ep, [a for _, _, a in runs[0]], marker=".", label=f"{m} (validation accuracy)")
    first = next(iter(curves.values()))[0]
    ax2.step([e for e, _, _ in first], [100 * s for _, s, _ in first], where="post", color="grey", alpha=0.5,
             label="sparsity")  # fmt: skip
    ax.axhline(dense, color="k", linestyle="--", label="dense (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax2.set_ylabel("sparsity (%)")
    ax.set_title("Gradual pruning of a small ViT on digits (first seed)")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- gradient modes at equal compute -----------------------------------------------------------------


@dataclass
class GradModesConfig:
    """``ovit demo --grad-modes``: one-shot oViT on the digits ViT with mini-batch gradients and
    with per-sample gradients, at equal numbers of gradients and at equal numbers of images (each
    configuration at its best λ on the validation split, one grid for all)."""

    base: DemoConfig = field(default_factory=DemoConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9)
    # (label, grad_mode, images per gradient, gradients): the training split holds 804 images
    runs: tuple[tuple[str, str, int, int], ...] = (
        ("mini-batch, 8 images × 100", "mini_batch", 8, 100),
        ("per-sample × 100 (same gradients)", "per_sample", 1, 100),
        ("per-sample × 800 (same images)", "per_sample", 1, 800),
        ("per-sample × 80 (10× fewer images)", "per_sample", 1, 80),
    )
    damps: tuple[tuple[str, float], ...] = (
        ("relative", 1e-4),
        ("relative", 1e-2),
        ("relative", 1e-1),
        ("relative", 1.0),
    )
    out: str = "ovit_out"


def run_grad_modes_demo(cfg: GradModesConfig | None = None, log=print) -> dict:
    """Run the comparison; print the table (test accuracy, mean over seeds, each run at the λ its
    validation accuracy chose) and write ``digits_grad_modes.json``."""
    cfg = cfg or GradModesConfig()
    base = cfg.base
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    val: dict = {r[0]: {s: [[] for _ in cfg.damps] for s in cfg.sparsities} for r in cfg.runs}
    test: dict = {r[0]: {s: [[] for _ in cfg.damps] for s in cfg.sparsities} for r in cfg.runs}
    images: dict = {r[0]: 0 for r in cfg.runs}
    dense_acc = []
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        xtr, ytr, xva, yva, xte, yte = load_digits_split(seed, base.val_fraction)
        dense = train(base, seed, xtr, ytr, log)
        dense_acc.append(accuracy(dense, xte, yte))
        for label, mode, g, m in cfg.runs:
            if m * g > len(ytr):
                raise ValueError(f"{label}: {m * g} images, the training split holds {len(ytr)}")
            data = gradient_batches(xtr, ytr, seed, g, m)
            cache: dict = {}
            for di, (dmode, lam) in enumerate(cfg.damps):
                for s in cfg.sparsities:
                    model = TinyViT(**base.model)
                    model.load_state_dict(dense.state_dict())
                    rep = one_shot_prune(model, data, s, method="ovit", block_size=base.block_size, num_grads=m,
                                         grad_mode=mode, grad_batch_size=g, damp=lam, damp_mode=dmode,
                                         pass_batch_size=64 if mode != "mini_batch" else None, progress=False,
                                         fisher_cache=cache)  # fmt: skip
                    if rep.samples:
                        images[label] = rep.samples
                    val[label][s][di].append(accuracy(model, xva, yva))
                    test[label][s][di].append(accuracy(model, xte, yte))

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    res: dict = {}
    for label, *_ in cfg.runs:
        res[label] = {}
        for s in cfg.sparsities:
            di = max(range(len(cfg.damps)), key=lambda i, s=s, label=label: (mean(val[label][s][i]), -i))
            res[label][s] = (mean(test[label][s][di]), damp_label(cfg.damps[di]))
    head = f"{'gradients':<36}{'images':>8}" + "".join(f"{f'{s:.0%}':>20}" for s in cfg.sparsities)
    lines = [f"one-shot oViT, held-out accuracy, mean of {len(cfg.seeds)} seed(s); dense {mean(dense_acc):.4f}",
             head, "-" * len(head)]  # fmt: skip
    for label, *_ in cfg.runs:
        cells = "".join(f"{f'{res[label][s][0]:.4f} ({res[label][s][1]})':>20}" for s in cfg.sparsities)
        lines.append(f"{label:<36}{images[label]:>8}{cells}")
    log("\n".join(lines))
    os.makedirs(cfg.out, exist_ok=True)
    summary = {"config": asdict(cfg), "dense": dense_acc, "images": images,
               "results": {k: {str(s): v for s, v in d.items()} for k, d in res.items()},
               "validation": {k: {str(s): v for s, v in d.items()} for k, d in val.items()},
               "test": {k: {str(s): v for s, v in d.items()} for k, d in test.items()},
               "seconds": time.perf_counter() - t0}  # fmt: skip
    with open(os.path.join(cfg.out, "digits_grad_modes.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# --- quantization after pruning ------------------------------------------------------------------------


def run_quant_demo(base: DemoConfig | None = None, log=print, damps=(("relative", 1e-4), ("relative", 1e-2))) -> dict:
    """``ovit demo --quantize``: one-shot oViT on the digits ViT (λ chosen on the validation split
    per sparsity from ``damps``), then int8 (dynamic, and weight-only with exact zeros); test
    accuracy, mean over seeds. Writes ``digits_quantize.json``."""
    from .quantize import int8_dynamic, int8_weight_only, linear_weights

    cfg = base or DemoConfig()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    rows: dict = {s: {"pruned": [], "int8 dynamic": [], "int8 weight-only": []} for s in cfg.sparsities}
    dense_acc, dense_q = [], []
    zeros_kept = True
    for seed in cfg.seeds:
        xtr, ytr, xva, yva, xte, yte = load_digits_split(seed, cfg.val_fraction)
        dense = train(cfg, seed, xtr, ytr, log)
        dense_acc.append(accuracy(dense, xte, yte))
        dense_q.append(accuracy(int8_dynamic(dense), xte, yte))
        g = cfg.grad_batch_size
        data = gradient_batches(xtr, ytr, seed, g)
        cache: dict = {}
        for s in cfg.sparsities:
            best = None
            for mode, lam in damps:
                model = TinyViT(**cfg.model)
                model.load_state_dict(dense.state_dict())
                one_shot_prune(model, data, s, block_size=cfg.block_size, num_grads=cfg.num_grads, grad_batch_size=g,
                               grad_mode=cfg.grad_mode, pass_batch_size=cfg.pass_batch_size, damp=lam, damp_mode=mode,
                               progress=False, fisher_cache=cache)  # fmt: skip
                v = accuracy(model, xva, yva)
                if best is None or v > best[0]:
                    best = (v, model)
            model = best[1]
            zero = {n: w == 0 for n, w in linear_weights(model).items()}
            rows[s]["pruned"].append(accuracy(model, xte, yte))
            for label, fn in (("int8 dynamic", int8_dynamic), ("int8 weight-only", int8_weight_only)):
                q = fn(model)
                qw = linear_weights(q)
                zeros_kept &= all(bool((qw[n][z] == 0).all()) for n, z in zero.items())
                rows[s][label].append(accuracy(q, xte, yte))

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    lines = [f"held-out (test) accuracy, mean of {len(cfg.seeds)} seed(s): dense {mean(dense_acc):.4f}, "
             f"dense + int8 dynamic {mean(dense_q):.4f}; pruned zeros stay zero after int8: {zeros_kept}",
             f"{'sparsity':<10}{'oViT':>10}{'+ int8 dynamic':>16}{'+ int8 weight-only':>20}"]  # fmt: skip
    for s in cfg.sparsities:
        r = rows[s]
        lines.append(f"{s:<10.0%}{mean(r['pruned']):>10.4f}{mean(r['int8 dynamic']):>16.4f}"
                     f"{mean(r['int8 weight-only']):>20.4f}")  # fmt: skip
    log("\n".join(lines))
    os.makedirs(cfg.out, exist_ok=True)
    summary = {"dense": dense_acc, "dense_int8_dynamic": dense_q, "zeros_kept": zeros_kept,
               "results": {str(s): r for s, r in rows.items()}}  # fmt: skip
    with open(os.path.join(cfg.out, "digits_quantize.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
