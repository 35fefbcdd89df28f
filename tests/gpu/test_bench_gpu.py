"""benchmarks/bench_gpu.py without CUDA: it says why and measures nothing (the page is untouched)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_gpu.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the benchmark would run for minutes")
def test_without_cuda_the_benchmark_says_why_and_writes_nothing(tmp_path):
    page = tmp_path / "benchmarks.md"
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(page)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout and "nothing was measured" in done.stdout
    assert not page.exists()
