"""scripts/gpu_check.py refuses clearly where there is no CUDA device (this CPU machine), and its gradient
check runs on a tiny fp32 model on the CPU (the GPU run itself needs a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about a machine without CUDA")
def test_without_cuda_it_exits_non_zero_saying_so(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--output", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "needs a CUDA device, and this machine has none" in proc.stderr
    assert not report.exists()


@pytest.mark.slow
def test_gradient_check_agrees_in_fp32_on_a_tiny_model():
    result = gpu_check.check_gradients(device="cpu", shape="embedded", layers=1, dtype_name="float32",
                                       lengths=[(12, 4, 6), (20, 3, 5)])
    assert result["ok"] and result["shared_vs_unshared"] < 1e-4, result
