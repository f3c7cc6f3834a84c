"""Build ovit-kernels.

The CUDA extension ``ovit_kernels._C`` is built when a CUDA-enabled torch and nvcc are present
(``OVIT_BUILD_CUDA=auto``, the default), always (``OVIT_BUILD_CUDA=1``, failing loudly if it
cannot) or never (``OVIT_BUILD_CUDA=0``: pure Python, Triton and reference backends only).
Architectures: ``TORCH_CUDA_ARCH_LIST`` if set, else sm_80 (A100) and sm_90 (H100/H200); no
kernel uses sm_90a-only instructions. Offline on a GPU machine:
``pip install -e . --no-build-isolation --no-deps``.
"""

import glob
import os

from setuptools import find_packages, setup

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
        if KNOB in ON:
            raise RuntimeError(f"OVIT_BUILD_CUDA={KNOB} but the CUDA extension cannot be built: {why}")
        print(f"ovit-kernels: building pure Python ({why})")
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


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["ovit_kernels", "ovit_kernels.*"]) + find_packages("python"),
    package_dir={"ovit": "python/ovit"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
