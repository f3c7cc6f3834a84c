"""The CUDA kernel sources built as host C++ against the SIMT emulator of this folder, and a
stand-in for ``ovit_kernels._C`` over it.

``build(dest)`` compiles ``csrc/*.cu`` with ``capi.cpp`` into a shared library (ctypes).
``EmulatedC(lib)`` offers the functions of the pybind11 module ``ovit_kernels._C`` with the
same names, arguments and checks, on CPU tensors: installed as ``ovit_kernels._C`` before
``ovit_kernels.cuda_backend`` is imported, it lets the CUDA backend's Python side — its
custom ops and fake kernels, its dispatch rules, its self-check — run on a CPU, with every
kernel executed by the emulator.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import torch

EMU = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(EMU))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = ("woodbury.cu", "obs.cu", "packed.cu", "spmm_nm.cu", "spmm_bitmap.cu")

P, I64, I32, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
SIGNATURES = {
    "woodbury": [P, P, I64, I32, I64, I64, F64, I32],
    "prune_order": [P, P, P, I64, I32, I32, I32, I32, P, P, P, I32],
    "reconstruct": [P, P, P, P, I64, I32, I32, P, P, P, I32],
    "damped_inverse": [P, I64, I32, F64, F64, I32, P, P, I32],
}


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def build(dest: str) -> ctypes.CDLL | str:
    """Compile the kernels into ``dest``/libovit_emu.so; the library, or why it could not be built
    (no compiler, no C++20 ``<barrier>``). A source that does not compile raises."""
    cxx = compiler()
    if cxx is None:
        return "needs a C++20 compiler (g++ or clang++)"
    probe = os.path.join(dest, "probe.cpp")
    with open(probe, "w") as f:
        f.write("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([cxx, "-std=c++20", "-pthread", probe, "-o", os.path.join(dest, "probe")]).returncode:
        return f"{cxx} has no C++20 <barrier>"
    lib = os.path.join(dest, "libovit_emu.so")
    sources = [os.path.join(CSRC, f) for f in KERNELS] + [os.path.join(EMU, "capi.cpp")]
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-I", EMU, "-I", CSRC, "-x", "c++"]
    r = subprocess.run([*cmd, *sources, "-o", lib], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the kernel sources do not compile as host C++:\n{r.stderr[-4000:]}")
    handle = ctypes.CDLL(lib)
    for name, args in SIGNATURES.items():
        for suffix in ("f32", "f64"):
            fn = getattr(handle, f"emu_{name}_{suffix}")
            fn.argtypes, fn.restype = args, ctypes.c_int
    handle.emu_woodbury_f64_g32.argtypes = [P, P, I64, I32, I64, I64, F64]
    handle.emu_spmm24.argtypes = [P, P, P, P, P, I32, I32, I32, I32, I32, I32]
    handle.emu_spmm_bitmap.argtypes = [P, P, P, P, P, P, I32, I32, I32, I32, I32]
    handle.emu_spmm_bitmap_tile.argtypes = [I32]
    handle.emu_max_block_size.argtypes = [I32]
    handle.emu_block_layout.argtypes = [I32, I32, ctypes.POINTER(ctypes.c_int)]
    for name in ("woodbury_f64_g32", "spmm24", "spmm_bitmap", "spmm_bitmap_tile", "max_block_size", "block_layout"):
        getattr(handle, f"emu_{name}").restype = ctypes.c_int
    return handle


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(t: torch.Tensor, name: str, dim: int) -> None:
    if t.device.type != "cpu":
        raise RuntimeError(f"{name} must be a CPU tensor for the emulator, got one on {t.device}")
    if t.dim() != dim:
        raise RuntimeError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise RuntimeError(f"{name} must be contiguous")


def _launched(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: CUDA launch failed: error {rc}")


class EmulatedC:
    """The ``ovit_kernels._C`` functions over the emulator (CPU tensors, same signatures)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def _typed(self, name: str, dtype: torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise RuntimeError(f"finv must be float32 or float64, got {dtype}")
        return getattr(self.lib, f"emu_{name}_{'f64' if dtype == torch.float64 else 'f32'}")

    def max_block_size(self, fp64: bool) -> int:
        return self.lib.emu_max_block_size(int(fp64))

    def block_layout(self, B: int, fp64: bool) -> tuple[int, int]:  # noqa: N803 - the binding's name
        threads = ctypes.c_int(0)
        c = self.lib.emu_block_layout(int(B), int(fp64), ctypes.byref(threads))
        return c, threads.value

    def woodbury_update_(self, finv: torch.Tensor, grads: torch.Tensor, num_grads: float) -> None:
        _check(finv, "finv", 3)
        _check(grads, "grads", 2)
        nb, b = finv.shape[0], finv.shape[1]
        if grads.shape[1] != nb * b:
            raise RuntimeError(f"grads must have nb*B = {nb * b} columns, got {grads.shape[1]}")
        if finv.dtype == torch.float64 and grads.dtype == torch.float32:
            rc = self.lib.emu_woodbury_f64_g32(
                _ptr(finv), _ptr(grads), nb, b, grads.shape[0], grads.shape[1], num_grads
            )
        else:
            if grads.dtype != finv.dtype:
                raise RuntimeError(f"grads must be {finv.dtype} for this finv, got {grads.dtype}")
            fn = self._typed("woodbury", finv.dtype)
            rc = fn(_ptr(finv), _ptr(grads), nb, b, grads.shape[0], grads.shape[1], num_grads, 0)
        _launched(rc, "woodbury_update_")

    def obs_prune_order(self, w, finv, mask, nm_n, nm_m, order, loss, bad) -> None:
        for t, name, dim in ((w, "w_blocks", 2), (finv, "finv", 3), (order, "order", 2), (loss, "loss", 2)):
            _check(t, name, dim)
        if w.dtype != finv.dtype:
            raise RuntimeError(f"w_blocks must have finv's dtype {finv.dtype}, got {w.dtype}")
        nb, b = w.shape
        fn = self._typed("prune_order", finv.dtype)
        rc = fn(
            _ptr(w), _ptr(finv), _ptr(mask), nb, b, order.shape[1], nm_n, nm_m, _ptr(order), _ptr(loss), _ptr(bad), 0
        )
        _launched(rc, "obs_prune_order")

    def obs_reconstruct(self, w, finv, order, counts, w_out, pruned, bad) -> None:
        for t, name, dim in ((w, "w_blocks", 2), (finv, "finv", 3), (order, "order", 2), (counts, "counts", 1)):
            _check(t, name, dim)
        if order.dtype != torch.int64 or counts.dtype != torch.int64:
            raise RuntimeError("order and counts must be int64")
        nb, b = w.shape
        fn = self._typed("reconstruct", finv.dtype)
        rc = fn(_ptr(w), _ptr(finv), _ptr(order), _ptr(counts), nb, b, order.shape[1], _ptr(w_out), _ptr(pruned),
                _ptr(bad), 0)  # fmt: skip
        _launched(rc, "obs_reconstruct")

    def damped_inverse(self, gram, inv_m, damp, relative, out, ok) -> None:
        _check(gram, "gram", 3)
        if gram.dtype != torch.float64:
            raise RuntimeError(f"gram must be float64, got {gram.dtype}")
        nb, b = gram.shape[0], gram.shape[1]
        fn = self._typed("damped_inverse", out.dtype)
        _launched(fn(_ptr(gram), nb, b, inv_m, damp, int(relative), _ptr(out), _ptr(ok), 0), "damped_inverse")

    def spmm_24(self, x, vals, meta, bias, out, gelu, variant=0) -> None:
        _check(x, "x", 2)
        tokens, k = x.shape
        rc = self.lib.emu_spmm24(_ptr(x), _ptr(vals), _ptr(meta), _ptr(bias), _ptr(out), tokens, vals.shape[0], k,
                                 int(gelu), int(x.dtype == torch.bfloat16), int(variant))  # fmt: skip
        _launched(rc, "spmm_24")

    def spmm_bitmap(self, x, bits, offsets, vals, bias, out, gelu) -> None:
        _check(x, "x", 2)
        tokens, k = x.shape
        rc = self.lib.emu_spmm_bitmap(_ptr(x), _ptr(bits), _ptr(offsets), _ptr(vals), _ptr(bias), _ptr(out), tokens,
                                      bits.shape[0], k, int(gelu), int(x.dtype == torch.bfloat16))  # fmt: skip
        _launched(rc, "spmm_bitmap")

    def spmm_bitmap_tile(self, K: int, device: int) -> int:  # noqa: N803 - the binding's name
        return self.lib.emu_spmm_bitmap_tile(int(K))
