"""The GPU benchmarks need a GPU: without one they are skipped (they are not tests); the CPU
benchmarks (bench_cpu.py) run anywhere."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
        for item in items:
            if not item.nodeid.startswith("bench/bench_cpu.py") and "bench_cpu.py" not in item.nodeid:
                item.add_marker(skip)
