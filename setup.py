"""Build ovit-kernels.

The CPU extension ``ovit_kernels._cpu`` (``csrc/cpu``, torch-free C++ with a pybind11 binding) is
built whenever a C++ compiler is present (``OVIT_BUILD_CPU=auto``, the default; ``1`` fails
loudly if it cannot, ``0`` never builds it); under ``auto`` a failed build only warns, and the
package works without it (the reference backend runs CPU tensors). It is compiled for the
building machine (``-march=native``; ``OVIT_CPU_ARCH`` overrides, e.g. ``x86-64-v3``).

The CUDA extension ``ovit_kernels._C`` is built when a CUDA-enabled torch and nvcc are present
(``OVIT_BUILD_CUDA=auto``, the default), always (``OVIT_BUILD_CUDA=1``, failing loudly if it
cannot) or never (``OVIT_BUILD_CUDA=0``: pure Python, Triton and reference backends only).
Architectures: ``TORCH_CUDA_ARCH_LIST`` if set, else sm_80 (A100) and sm_90 (H100/H200); no
kernel uses sm_90a-only instructions. Offline on a GPU machine:
``pip install -e . --no-build-isolation --no-deps``.
"""

import glob
import os
import shutil

from setuptools import Extension, find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
KNOB = os.environ.get("OVIT_BUILD_CUDA", "auto").strip().lower()
ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _cuda_toolchain() -> tuple[bool, str]:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as e:  # noqa: BLE001
        return False, f"torch is not importable in the build environment ({e})"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME was not found"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}"


def _extensions():
    if KNOB in OFF:
        return [], {}
    ok, why = _cuda_toolchain()
    if not ok:
        isolated = "not importable" in why
        hint = (
            " — pip's build isolation hides the installed torch: pip install . --no-build-isolation" if isolated else ""
        )
        if KNOB in ON:
            raise RuntimeError(f"OVIT_BUILD_CUDA={KNOB} but the CUDA extension cannot be built: {why}{hint}")
        import sys

        bar = "=" * 78
        print(f"{bar}\novit-kernels: the CUDA extension is NOT built ({why}){hint}\n{bar}", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + ["csrc/bindings.cpp"]
    includes = [os.path.join(ROOT, "csrc")]
    # pip-installed CUDA torch keeps cuBLAS/cuSPARSE headers (included by ATen's CUDA context)
    # under site-packages/nvidia/*/include rather than in CUDA_HOME.
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    includes += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    ext = CUDAExtension(
        name="ovit_kernels._C",
        sources=sources,
        include_dirs=includes,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
    )
    print(f"ovit-kernels: building the CUDA extension for {os.environ['TORCH_CUDA_ARCH_LIST']} ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _cpu_extension() -> list:
    knob = os.environ.get("OVIT_BUILD_CPU", "auto").strip().lower()
    if knob in OFF:
        return []
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        if knob in ON:
            raise RuntimeError("OVIT_BUILD_CPU=1 but no C++ compiler was found")
        print("ovit-kernels: no C++ compiler, the CPU kernels are not built (the reference backend runs CPU tensors)")
        return []
    try:
        import pybind11

        includes = [pybind11.get_include()]
    except ImportError:  # torch ships the pybind11 headers
        try:
            import torch
        except ImportError:
            if knob in ON:
                raise RuntimeError("OVIT_BUILD_CPU=1 but neither pybind11 nor torch is importable") from None
            print("ovit-kernels: no pybind11 headers, the CPU kernels are not built", flush=True)
            return []
        includes = [os.path.join(os.path.dirname(torch.__file__), "include")]
    arch = os.environ.get("OVIT_CPU_ARCH", "native")
    return [
        Extension(
            "ovit_kernels._cpu",
            sources=["csrc/cpu/kernels.cpp", "csrc/cpu/bindings.cpp"],
            include_dirs=[os.path.join(ROOT, "csrc", "cpu"), *includes],
            # -fno-wrapv: Python's CFLAGS bring -fwrapv, which keeps the int-indexed loops from vectorising
            extra_compile_args=["-O3", "-fno-wrapv", "-std=c++17", "-pthread", f"-march={arch}"],
            extra_link_args=["-pthread"],
            language="c++",
            optional=knob not in ON,
        )
    ]


ext_modules, cmdclass = _extensions()
ext_modules = _cpu_extension() + ext_modules

setup(
    packages=find_packages(include=["ovit_kernels", "ovit_kernels.*"]) + find_packages("python"),
    package_dir={"ovit": "python/ovit"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
