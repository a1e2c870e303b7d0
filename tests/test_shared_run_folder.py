"""Checkpoints of several nodes need one filesystem: a run folder that the ranks do not share is an
error on every rank at set-up, before the first iteration (tests/shared_fs_worker.py, two gloo ranks)."""

from __future__ import annotations

import pytest
from torchrun_worker import run_ranks

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow



def test_a_run_folder_the_ranks_do_not_share_is_an_error_at_start(word_lm_dir, tmp_path):
    reports = run_ranks("shared_fs_worker.py", ["--policy", str(word_lm_dir), "--out", str(tmp_path)], tmp_path)
    for report in reports:
        assert report["shared"] is None  # one folder for all ranks: set-up goes on
        assert report["local"] is not None and "rank(s) [1] of 2 cannot see the marker" in report["local"]
        assert "not on a filesystem that every node shares" in report["local"] and "--output-dir" in report["local"]
        assert report["leftover_markers"] == []
