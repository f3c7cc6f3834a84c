"""What users install: the sdist carries every source the extensions need, and a pure-Python
wheel builds and holds both packages."""

import os
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sdist_has_every_kernel_source(tmp_path):
    env = dict(os.environ, OVIT_BUILD_CUDA="0", OVIT_BUILD_CPU="0")
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    need = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
            for f in fs if f.endswith((".h", ".cuh", ".cu", ".cpp"))}  # fmt: skip
    assert need and need <= names, sorted(need - names)
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"} <= names


def test_pure_python_wheel(tmp_path):
    env = dict(os.environ, OVIT_BUILD_CUDA="0", OVIT_BUILD_CPU="0")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ovit_kernels/__init__.py" in names and "ovit/__init__.py" in names and "ovit/distributed.py" in names
    assert not any(n.endswith(".so") for n in names)
