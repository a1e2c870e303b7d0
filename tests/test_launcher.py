"""scripts/launch_paper_setting_one.py: the dry run carries the memory plan's flags, a plan that does not fit is
refused, several nodes bind a reachable address and say who calls whom, and teardown ends the server's whole
process group, also on SIGTERM (a fake server that starts children stands in for `vllm serve`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import launch_paper_setting_one as launcher  # noqa: E402
import memory_plan  # noqa: E402


def dry_run(capsys, *argv: str) -> dict:
    assert launcher.main(["--dry-run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_carries_every_flag_the_plan_needs(capsys):
    out = dry_run(capsys, "--", "--iterations", "1")
    command = out["train"]["command"]
    expected = memory_plan.setting("paper-setting-one", 8, 80.0, user_gpus=4).plan
    kwargs = json.loads(command[command.index("--policy-vllm-kwargs") + 1])
    assert kwargs["gpu_memory_utilization"] == expected.vllm_gpu_memory_utilization == out["plan"]["vllm_gpu_memory_utilization"]
    assert command[command.index("--policy-backend") + 1] == "vllm" and "--policy-vllm-sleep" in command
    assert command[command.index("--deepspeed") + 1] == str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json")
    # train_agent.py reads exactly the configuration the plan was made for
    config = memory_plan.preset_config("paper-setting-one", command[command.index("--preset") + 2:])
    assert config.policy_backend == "vllm" and config.policy_vllm_sleep and config.iterations == 1
    assert config.policy_vllm_kwargs == kwargs and config.deepspeed.endswith("deepspeed_zero3.json")
    assert all(peak <= 80 for peak in out["plan"]["peak_gb"].values())
    assert out["serve"]["command"][out["serve"]["command"].index("--host") + 1] == "127.0.0.1"
    assert out["train"]["shell"].startswith("CUDA_VISIBLE_DEVICES=4,5,6,7 REFUEL_USER_BASE_URL=http://127.0.0.1:8000/v1 ")
    assert out["routing"] == ["node 0: ranks 0-3 call http://127.0.0.1:8000/v1 (the server on node 0's GPUs 0,1,2,3)"]


def test_a_plan_that_does_not_fit_is_refused_naming_the_phase():
    with pytest.raises(SystemExit, match=r"does not fit 40 GB GPUs in the collection, scoring, training, evaluation"):
        launcher.main(["--dry-run", "--gpu-memory-gb", "40"])
    with pytest.raises(SystemExit, match="collection"):  # vLLM's default 0.9 next to the ZeRO shard
        launcher.main(["--dry-run", "--", "--policy-vllm-kwargs", '{"gpu_memory_utilization": 0.9}'])


def test_several_nodes_bind_a_reachable_address_and_each_calls_its_own_server(capsys):
    out = dry_run(capsys, "--nnodes", "2", "--node-rank", "1", "--master-addr", "node0", "--advertise-host", "node1")
    serve, train = out["serve"]["command"], out["train"]["command"]
    assert serve[serve.index("--host") + 1] == "0.0.0.0"
    assert out["train"]["REFUEL_USER_BASE_URL"] == "http://node1:8000/v1"
    assert train[train.index("--nnodes") + 1] == "2" and train[train.index("--node_rank") + 1] == "1"
    assert train[train.index("--master_addr") + 1] == "node0"
    assert out["plan"]["world"] == 8
    assert out["routing"] == [
        "node 0: ranks 0-3 call http://<node 0's --advertise-host>:8000/v1 (the server on node 0's GPUs 0,1,2,3)",
        "node 1: ranks 4-7 call http://node1:8000/v1 (the server on node 1's GPUs 0,1,2,3)"]
    with pytest.raises(SystemExit, match="--master-addr"):
        launcher.main(["--dry-run", "--nnodes", "2", "--node-rank", "1"])
    with pytest.raises(SystemExit, match="not reachable"):
        launcher.main(["--dry-run", "--nnodes", "2", "--master-addr", "n0", "--host", "127.0.0.1", "--advertise-host", "n0"])


FAKE_SERVER = textwrap.dedent("""
    import http.server, json, subprocess, sys
    port, model, pids = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sleeper = "import time; time.sleep(600)"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    children = [subprocess.Popen([sys.executable, "-c", code]) for code in (sleeper, stubborn)]
    open(pids, "w").write(json.dumps([c.pid for c in children]))

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": model}]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()
""")


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for its reaper is dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def server_command(tmp_path: Path, port: int) -> tuple[list[str], Path]:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    pids = tmp_path / "children.json"
    return [sys.executable, str(script), str(port), "user-model", str(pids)], pids


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_teardown_ends_the_servers_children_too(tmp_path):
    port = free_port()
    serve, pids = server_command(tmp_path, port)
    done = tmp_path / "trained"
    trainer = [sys.executable, "-c", f"open({str(done)!r}, 'w').write('ok')"]
    rc = launcher.supervise(serve, {}, trainer, {}, url=f"http://127.0.0.1:{port}/v1", model="user-model",
                            wait_timeout=60, log_path=tmp_path / "serve.log", stop_timeout=2)
    assert rc == 0 and done.read_text() == "ok"
    children = json.loads(pids.read_text())
    assert len(children) == 2 and not any(alive(pid) for pid in children)  # the SIGTERM-proof one got SIGKILL


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_training_and_the_server_group(tmp_path):
    port = free_port()
    serve, pids = server_command(tmp_path, port)
    trainer_pid = tmp_path / "trainer.pid"
    trainer = [sys.executable, "-c", f"import os, time; open({str(trainer_pid)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(600)"]
    driver = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import launch_paper_setting_one as l; "
              f"sys.exit(l.supervise({serve!r}, {{}}, {trainer!r}, {{}}, url='http://127.0.0.1:{port}/v1', "
              f"model='user-model', wait_timeout=60, log_path=__import__('pathlib').Path({str(tmp_path / 'log')!r}), "
              "stop_timeout=2))")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(trainer_pid)
        wait_for(pids)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received; stopping training and the user's server" in err
    assert not alive(int(trainer_pid.read_text()))
    assert not any(alive(pid) for pid in json.loads(pids.read_text()))


def test_every_flag_is_explained():
    for action in launcher.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
