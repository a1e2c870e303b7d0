"""Setting one's shared services: the 70 B user served once for every rank, the launcher that waits
for it, and the refusal of one in-process user engine per rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from launch_paper_setting_one import ServerNotReady, main, wait_for_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_user_engine_per_rank_is_refused(monkeypatch):
    from refuel_env.components import make_config, user_generator

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = make_config(None, user_backend="vllm", user_model="meta-llama/Llama-3.1-70B-Instruct")
    with pytest.raises(ValueError, match=r"one in-process engine .* in each of the 2 training ranks.*vllm serve.*"
                                         r"user_backend='openai'.*REFUEL_USER_BASE_URL"):
        user_generator(config)


def test_setting_one_calls_the_served_user_at_the_configured_url(monkeypatch):
    from refuel_env.components import make_config, user_generator

    config = make_config("paper-setting-one", user_openai_kwargs={})  # (no local copy of the 70 B tokenizer here)
    assert config.user_backend == "openai" and config.user_model == "meta-llama/Llama-3.1-70B-Instruct"
    monkeypatch.setenv("WORLD_SIZE", "8")  # every rank may build this one: it is a client
    monkeypatch.setenv("REFUEL_USER_BASE_URL", "http://user-server:8000/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge:9000/v1")
    assert user_generator(config).base_url == "http://user-server:8000/v1"
    explicit = make_config("paper-setting-one", user_openai_kwargs={}, user_base_url="http://other:1/v1")
    assert user_generator(explicit).base_url == "http://other:1/v1"


def test_launcher_places_the_server_and_the_ranks_on_separate_gpus(capsys):
    assert main(["--dry-run", "--port", "8123", "--", "--iterations", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    serve, train = plan["serve"], plan["train"]
    assert serve["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and train["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert serve["command"][:3] == ["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct"]
    assert serve["command"][serve["command"].index("--tensor-parallel-size") + 1] == "4"
    assert train["REFUEL_USER_BASE_URL"] == "http://127.0.0.1:8123/v1"
    assert "--nproc_per_node" in train["command"] and train["command"][-2:] == ["--iterations", "1"]
    assert "paper-setting-one" in train["command"]
    with pytest.raises(SystemExit, match="overlap"):
        main(["--dry-run", "--user-gpus", "0,1", "--train-gpus", "1,2"])


def test_waiting_ends_with_the_servers_log_when_it_exits(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('CUDA out of memory'); raise SystemExit(3)"],
                                stdout=out, stderr=subprocess.STDOUT)
    proc.wait()
    with pytest.raises(ServerNotReady, match=r"exited with status 3(.|\n)*CUDA out of memory"):
        wait_for_server(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=60, process=proc, log=log)


def test_waiting_gives_up_at_the_deadline():
    with pytest.raises(ServerNotReady, match=r"did not list 'm' within 0.2 s \(ConnectError"):
        wait_for_server(f"http://127.0.0.1:{free_port()}/v1", "m", timeout=0.2, interval=0.05)


@pytest.mark.slow
def test_waiting_for_a_real_transformers_serve(smollm2_dir, tmp_path):
    """The launcher's wait against a real OpenAI-compatible server (`transformers serve` on CPU),
    started the way tests/test_openai_backend.py starts it; it returns once the model is listed."""
    exe = Path(sys.executable).with_name("transformers")
    port, model = free_port(), str(smollm2_dir)
    log = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        served = wait_for_server(f"http://127.0.0.1:{port}/v1", model, timeout=300, process=proc, log=log,
                                 interval=0.25)
        assert model in served
        with pytest.raises(ServerNotReady, match=r"serves \[.*\], not 'not-served'"):
            wait_for_server(f"http://127.0.0.1:{port}/v1", "not-served", timeout=1, process=proc, log=log, interval=0.25)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
