"""Checkpoints of several nodes need one filesystem: a run folder that the ranks do not share is an
error on every rank at set-up, before the first iteration (tests/shared_fs_worker.py, two gloo ranks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_folder_the_ranks_do_not_share_is_an_error_at_start(word_lm_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(ROOT / "tests" / "shared_fs_worker.py"), "--policy", str(word_lm_dir),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["shared"] is None  # one folder for all ranks: set-up goes on
        assert report["local"] is not None and "rank(s) [1] of 2 cannot see the marker" in report["local"]
        assert "not on a filesystem that every node shares" in report["local"] and "--output-dir" in report["local"]
        assert report["leftover_markers"] == []
