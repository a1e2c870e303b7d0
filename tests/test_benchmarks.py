"""Every benchmark script records the machine's 1-minute load average before and after, in its JSON
and its output, and warns when the load exceeded the cores it uses.

Each script's real ``main`` runs, with what it times replaced (the environment's step loop, the
generation parts, the torchrun launch, the spawned training workers): the load record and the JSON
come from the script's own code, and no benchmark runs here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from refuel_agents.machine_load import MARGIN, load_line, load_record

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def check_load(record: dict, cores: int) -> None:
    assert set(record) == {"before", "after", "cores_used", "cpu_count", "busy"}
    assert record["before"] >= 0 and record["after"] >= 0 and record["cores_used"] == cores
    assert record["busy"] == (max(record["before"], record["after"]) > cores + MARGIN)


def load_script(name: str, monkeypatch) -> Any:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_load_record_and_its_warning():
    quiet = load_record(0.5, cores=2, after=1.9)
    assert quiet == {"before": 0.5, "after": 1.9, "cores_used": 2, "cpu_count": quiet["cpu_count"], "busy": False}
    assert load_line(quiet) == f"load average (1 min) before / after: 0.50 / 1.90, 2 core(s) used of {quiet['cpu_count']}"
    assert not load_record(0.89, cores=1, after=1.01)["busy"]  # one busy thread, and the kernel's housekeeping
    assert load_record(0.5, cores=1, after=1.3)["busy"]
    busy = load_record(5.2, cores=2, after=1.0)
    assert busy["busy"]
    assert "\nWARNING: the load exceeded the 2 core(s) this benchmark uses" in load_line(busy)


def test_benchmark_env_json_has_the_load(tmp_path, monkeypatch, capsys):
    import torch

    bench = load_script("benchmark_env", monkeypatch)
    monkeypatch.setattr(bench, "overhead", lambda episodes, tokenizer: 12.5)  # the timed loop itself
    out = tmp_path / "env.json"
    monkeypatch.setattr(sys, "argv", ["benchmark_env.py", "--only", "overhead", "--json", str(out)])
    bench.main()
    figures = json.loads(out.read_text())
    check_load(figures["load"], torch.get_num_threads())
    assert figures["overhead_us_per_step"] == {"tokenizer_off": 12.5, "tokenizer_on": 12.5}
    assert "load average (1 min) before / after:" in capsys.readouterr().out


def test_benchmark_generation_json_has_the_load(tmp_path, monkeypatch, capsys):
    import torch

    bench = load_script("benchmark_generation", monkeypatch)
    monkeypatch.setattr(bench, "measure", lambda args: {"batching": [{"requests": 1}]})  # model load and timed parts
    out = tmp_path / "gen.json"
    monkeypatch.setattr(sys, "argv", ["benchmark_generation.py", "--only", "batching", "--json", str(out)])
    bench.main()
    figures = json.loads(out.read_text())
    check_load(figures["load"], torch.get_num_threads())
    assert figures["batching"] == [{"requests": 1}]
    assert "load average (1 min) before / after:" in capsys.readouterr().out


def test_benchmark_collection_ranks_json_has_the_load_and_cpu_time_per_tuple(tmp_path, monkeypatch, capsys):
    bench = load_script("benchmark_collection_ranks", monkeypatch)
    launched = []

    def torchrun(command, **kwargs):
        """Stands in for the torchrun launch: each rank's report, as the workers write it."""
        world = int(next(a for a in command if a.startswith("--nproc_per_node=")).split("=")[1])
        out = Path(command[command.index("--out") + 1])
        parts = [{"rank": r, "tuples": 4 // world, "seconds": 2.0, "cpu_seconds": 4.0 / world,
                  "policy_responses": 8 // world, "item_ids": list(range(r, 4, world))} for r in range(world)]
        (out / "ranks.json").write_text(json.dumps(parts))
        launched.append((world, kwargs["env"]["OMP_NUM_THREADS"]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", torchrun)
    out = tmp_path / "ranks.json"
    monkeypatch.setattr(sys, "argv", ["benchmark_collection_ranks.py", "--prompts", "4", "--threads", "2",
                                      "--work", str(tmp_path / "work"), "--json", str(out)])
    bench.main()
    assert launched == [(1, "2"), (2, "1")]
    report = json.loads(out.read_text())
    check_load(report["load"], 2)
    for r in report["results"]:
        check_load(r["load"], 2)
        assert r["cpu_seconds"] == 4.0 and r["cpu_seconds_per_tuple"] == 1.0
    printed = capsys.readouterr().out
    assert "| CPU s (all ranks) | CPU s per tuple | load before / after |" in printed
    assert "load average (1 min) before / after:" in printed


def test_benchmark_refuel_json_has_the_load_and_warns_on_a_busy_measurement(tmp_path, monkeypatch, capsys):
    bench = load_script("benchmark_refuel", monkeypatch)
    step = {"step_cpu_seconds": {True: [1.0], False: [2.0]}, "step_seconds": {True: [1.0], False: [2.0]},
            "tokens": {True: 10, False: 16}, "max_grad_rel_diff": 0.0, "load": (9.0, 9.5)}
    calls = []

    def in_fresh_process(fn, *args, threads):
        calls.append(fn.__name__)
        return step

    monkeypatch.setattr(bench, "in_fresh_process", in_fresh_process)
    monkeypatch.setattr(bench, "synthetic_pairs", lambda *args: [{}])  # (the worker that would train on them is replaced)
    out = tmp_path / "refuel.json"
    bench.main(["--only", "shared-prefix", "--skip-dpo", "--batch-pairs", "1", "--json", str(out)])
    assert calls == ["shared_prefix_worker"]
    report = json.loads(out.read_text())
    assert set(report["load"]) == {"before", "after", "cores_used", "cpu_count", "busy"}
    assert report["load"]["cores_used"] == 1 and report["load"]["busy"]  # the measurement ran at load 9 on 1 thread
    assert "WARNING: the load exceeded the 1 core(s)" in capsys.readouterr().out
