"""How every torchrun test worker ends: its report on disk, every rank's, then an exit that skips teardown.

On some runs a native thread of the communication stack (gloo, DeepSpeed's CPU shared-memory op, vLLM's
exit hook after the process group) aborted the process while static objects were destroyed ("terminate
called without an active exception"), after all the work and every report were complete; destroying the
process group first did not help. So a worker writes ``rank<r>.json``, waits at a barrier until every
rank has, and leaves with ``os._exit(0)``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


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
