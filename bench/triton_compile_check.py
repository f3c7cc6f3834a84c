"""Compile every Triton kernel for sm_80 and sm_90 without a GPU, and report registers and spills.

The Triton interpreter (how CI runs the kernels) accepts programs that the GPU compiler
rejects or compiles badly (register spills of large tiles, unsupported dot shapes or dtypes).
This script drives the real Python wrappers of the Triton backend on CPU tensors with the
kernel launches replaced by recorders, so every launch configuration a wrapper can produce
(tile size, dtype, flags, num_warps, every autotune config) is captured exactly as it would
be launched, then compiled ahead of time for each target with Triton's own compiler and
``ptxas -v``. No kernel runs.

    python bench/triton_compile_check.py               # sm_80 and sm_90, all configurations
    python bench/triton_compile_check.py --arch 90 --quick

Exit status 1 if any configuration fails to compile; spills are reported, not fatal.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated for compilation

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from ovit_kernels import sparse_formats, triton_backend, triton_spmm  # noqa: E402


@dataclass(frozen=True)
class Launch:
    """One compile configuration: kernel, argument types, constexpr values and launch options."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        dtypes = sorted({t for _, t in self.signature if t.startswith("*")})
        return f"{self.kernel}[{consts}] {'/'.join(dtypes)} w{self.num_warps} s{self.num_stages}"


@dataclass
class Recorder:
    """Stands in for a jitted (or autotuned) kernel and records how it is launched."""

    fn: Any
    configs: list[triton.Config] | None = None
    launches: set[Launch] = field(default_factory=set)

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self._record

    def _record(self, *args: Any, **kwargs: Any) -> None:
        names = self.fn.arg_names
        bound = dict(zip(names, args))
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        variants = (
            [({}, opts)]
            if self.configs is None
            else [(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in self.configs]
        )
        const_names = {p.name for p in self.fn.params if p.is_constexpr}
        for extra, o in variants:
            full = {**bound, **extra}
            sig, consts = [], []
            for n in names:
                v = full[n]
                if n in const_names:
                    consts.append((n, v))
                    sig.append((n, "constexpr"))
                else:
                    sig.append((n, mangle_type(v)))
            self.launches.add(
                Launch(self.fn.__name__, tuple(sig), tuple(consts), o.get("num_warps", 4), o.get("num_stages", 3))
            )


_KERNELS: dict[str, Any] = {}  # kernel name → the jitted function (recorders replace the module attributes)


def _install_recorders() -> dict[str, Recorder]:
    recs: dict[str, Recorder] = {}
    for mod, name in [
        (triton_backend, "_woodbury_kernel"),
        (triton_backend, "_damped_inverse_kernel"),
        (triton_backend, "_scores_kernel"),
        (triton_backend, "_eliminate_kernel"),
    ]:
        recs[name] = Recorder(getattr(mod, name))
        _KERNELS[name] = recs[name].fn
        setattr(mod, name, recs[name])
    recs["_dense_k"] = Recorder(triton_spmm._spmm_dense_k_kernel, configs=triton_spmm._CONFIGS)
    _KERNELS["_spmm_dense_k_kernel"] = triton_spmm._spmm_dense_k_kernel
    triton_spmm._dense_k = recs["_dense_k"]
    recs["_bsr"] = Recorder(triton_spmm._spmm_bsr_kernel, configs=triton_spmm._BSR_CONFIGS)
    _KERNELS["_spmm_bsr_kernel"] = triton_spmm._spmm_bsr_kernel
    triton_spmm._bsr = recs["_bsr"]
    triton_spmm._AUTOTUNE = True
    return recs


def _drive(blocks: list[int]) -> None:
    """Call every Triton wrapper with the shapes and flags the package can produce."""
    g = torch.Generator().manual_seed(0)
    for b in blocks:
        nb = 3
        for dt in (torch.float32, torch.float64):
            finv = torch.eye(b, dtype=dt).repeat(nb, 1, 1)
            w = torch.randn(nb, b, generator=g).to(dt)
            triton_backend.woodbury_update_(finv, torch.randn(4, nb * b, generator=g).to(dt), 16.0)
            for mode in ("absolute", "relative"):
                triton_backend.gram_inverse(finv.double(), 16.0, 1e-4, mode, dt)
            triton_backend.obs_scores(w, finv)
            triton_backend.obs_update_independent(w, finv, torch.zeros(nb, b, dtype=torch.bool))
            for mask in (None, torch.zeros(nb, b, dtype=torch.bool)):
                for nm in (None, (2, 4)):
                    if nm is not None and b % 4:
                        continue
                    order, _, _ = triton_backend.obs_prune_order(w, finv, mask, nm)
            triton_backend.obs_reconstruct(
                w, finv, torch.zeros(nb, b, dtype=torch.int64), torch.ones(nb, dtype=torch.int64)
            )
    out_f, in_f = 128, 256
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        weight = torch.randn(out_f, in_f, generator=g).to(dt)
        for tokens in (1, 197, 4096):
            x = torch.randn(tokens, in_f, generator=g).to(dt)
            for act in (None, "gelu"):
                bias = torch.randn(out_f, generator=g).to(dt)
                keep24 = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool)
                keep24[..., 1:3] = True
                packs = [
                    sparse_formats.pack_nm(weight, keep24.view(out_f, in_f), 2, 4),
                    sparse_formats.pack_bitmap(weight, torch.rand(out_f, in_f, generator=g) > 0.8),
                    sparse_formats.pack_bsr(weight, torch.rand(out_f, in_f, generator=g) > 0.5, (64, 64)),
                ]
                for p in packs:
                    triton_spmm.spmm(x, p, bias, act)


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(args: tuple[Launch, int]) -> tuple[str, int, str]:
    launch, arch = args
    fn = _KERNELS.get(launch.kernel)
    if fn is None:
        return launch.label(), arch, f"ERROR kernel {launch.kernel} not found"
    src = ASTSource(fn=fn, signature=dict(launch.signature), constexprs=dict(launch.constexprs))
    t0 = time.perf_counter()
    try:
        c = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
        )
    except Exception as e:  # noqa: BLE001 - report every failing configuration
        msg = str(e).strip().splitlines()
        return launch.label(), arch, "ERROR " + (msg[-1] if msg else type(e).__name__)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    log = subprocess.run(
        [ptxas, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull], capture_output=True, text=True
    ).stderr
    os.unlink(f.name)
    regs = _PTXAS_RE.search(log)
    spill = _SPILL_RE.search(log)
    st = int(spill.group(1)) if spill else 0
    nregs = regs.group(1) if regs else "?"
    secs = time.perf_counter() - t0
    info = f"regs {nregs:>3}  spill {st:>5} B  smem {c.metadata.shared:>6} B  {secs:4.1f} s"
    return launch.label(), arch, ("SPILL " if st else "ok    ") + info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80, 90)")
    ap.add_argument("--quick", action="store_true", help="blocks 48 and 128 only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    recs = _install_recorders()
    _drive([48, 128] if a.quick else [16, 24, 33, 64, 100, 128])
    launches = sorted({x for r in recs.values() for x in r.launches}, key=lambda x: x.label())
    work = [(x, arch) for arch in a.arch for x in launches]
    print(f"{len(launches)} launch configurations × {len(a.arch)} targets (triton {triton.__version__})")
    failed = spills = 0
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        for label, arch, res in ex.map(_compile, work):
            print(f"sm_{arch}  {res}  {label}")
            failed += res.startswith("ERROR")
            spills += res.startswith("SPILL")
    print(f"{len(work)} compiled: {failed} failed, {spills} with register spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
