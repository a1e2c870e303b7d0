"""Test scripts on ranks under torchrun: how a test starts them and reads their reports, and how they end.

The test side, :func:`run_ranks`, starts ``tests/<worker>`` on gloo ranks of this machine (DeepSpeed on
its CPU accelerator, offline) and returns each rank's ``rank<r>.json``. The worker side,
:func:`report_and_exit`, writes that report, waits until every rank has, and leaves with
``os._exit(0)``: on some runs a native thread of the communication stack (gloo, DeepSpeed's CPU
shared-memory op, vLLM's exit hook after the process group) aborted the process while static objects
were destroyed ("terminate called without an active exception"), after all the work and every report
were complete; destroying the process group first did not help.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_ranks(worker: str, args: list[str], out: Path, world: int = 2, python: str | Path = sys.executable,
              env: dict[str, str] | None = None, timeout: float = 900) -> list[dict]:
    """Run ``tests/<worker>`` with ``args`` on ``world`` ranks; assert it succeeded; each rank's report in ``out``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           **(env or {})}
    cmd = [str(python), "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(ROOT / "tests" / worker), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def report_and_exit(out: Path, rank: int, report: dict) -> None:
    """Write ``out/rank<rank>.json``, wait for every rank's, and end the process without its teardown."""
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()  # every rank's report is on disk
    exit_now()


def exit_now() -> None:
    """Flush the output and end the process at once (status 0), without the interpreter's teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
