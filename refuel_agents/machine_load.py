"""The machine's load around a benchmark: recorded in its JSON and its table, and a warning when it was busy.

A benchmark reads the 1-minute load average (``os.getloadavg``) before it starts and after it ends.
The benchmark's own processes count in it: one busy thread alone reads about 1.0, and the kernel's
housekeeping adds a few hundredths. When either reading exceeds the cores the benchmark uses by
more than ``MARGIN`` (a quarter of a core), other work competed for those cores: the wall times,
and even the ratios between configurations, may be the load's doing. Such figures are printed
with a warning and do not belong in the docs.

    before = load_average()
    ...  # the measurement
    record = load_record(before, cores=threads)
    print(load_line(record))          # under the table
    results["load"] = record          # in the JSON
"""

from __future__ import annotations

import os

MARGIN = 0.25  # load above the cores used that is read as noise, not as competing work


def load_average() -> float:
    """The 1-minute load average now."""
    return os.getloadavg()[0]


def load_record(before: float, cores: int, after: float | None = None) -> dict:
    """The JSON record: load before and after (after read now unless given), the cores used, and whether
    the load exceeded them by more than :data:`MARGIN`."""
    after = load_average() if after is None else after
    return {"before": round(before, 2), "after": round(after, 2), "cores_used": cores, "cpu_count": os.cpu_count(),
            "busy": max(before, after) > cores + MARGIN}


def load_cell(record: dict) -> str:
    """``before / after``, for a table column."""
    return f"{record['before']:.2f} / {record['after']:.2f}"


def load_line(record: dict) -> str:
    """The line printed under a benchmark's table, with the warning when the machine was busy."""
    line = f"load average (1 min) before / after: {load_cell(record)}, {record['cores_used']} core(s) used " \
           f"of {record['cpu_count']}"
    if record["busy"]:
        line += (f"\nWARNING: the load exceeded the {record['cores_used']} core(s) this benchmark uses by more than "
                 f"{MARGIN}: other work "
                 "competed for them, so these times (and their ratios) are not a quiet measurement; rerun on an "
                 "idle machine before quoting them")
    return line
