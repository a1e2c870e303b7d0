"""Setting one on one node: the 70 B simulated user on `vllm serve`, REFUEL on the other GPUs.

    python scripts/launch_paper_setting_one.py                                   # 8 GPUs: user 0-3, training 4-7
    python scripts/launch_paper_setting_one.py --user-gpus 0,1,2,3 --train-gpus 4,5,6,7 --port 8000 \\
        -- --iterations 2 --run-name setting-one                                 # flags after -- go to train_agent.py
    python scripts/launch_paper_setting_one.py --dry-run                         # print the two commands only

1. Starts ``vllm serve <user model> --tensor-parallel-size <len(user GPUs)>`` with
   ``CUDA_VISIBLE_DEVICES`` set to the user's GPUs, its log in ``<log-dir>/vllm_serve.log``.
2. Waits until ``GET <url>/models`` answers and lists the model (:func:`wait_for_server`), or
   fails when the server exits or ``--wait-timeout`` seconds pass. Loading 70 B takes minutes.
3. Starts ``torchrun --nproc_per_node <len(train GPUs)> scripts/train_agent.py --agent refuel
   --preset paper-setting-one --deepspeed refuel_agents/configs/deepspeed_zero3.json`` on the
   training GPUs, with ``REFUEL_USER_BASE_URL`` pointing every rank at the server.
4. Stops the server when training ends, whatever the outcome, and exits with training's status.

Every rank calls the one server (vLLM batches the ranks' requests together); no rank starts a
user engine of its own. The reward model (ArmoRM, 8 B) runs in each training rank and scores that
rank's dialogues: see docs/scaling.md for why, and for the memory on each GPU.

Two nodes: run the server on one node's GPUs by hand (the ``vllm serve`` command that
``--dry-run`` prints) and start training on every node with torchrun and
``REFUEL_USER_BASE_URL=http://<server host>:<port>/v1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
USER_MODEL = "meta-llama/Llama-3.1-70B-Instruct"


class ServerNotReady(RuntimeError):
    """The server exited, or did not serve the model, before the deadline."""


def wait_for_server(base_url: str, model: str, *, timeout: float, process: subprocess.Popen | None = None,
                    log: Path | None = None, interval: float = 2.0) -> list[str]:
    """Poll ``GET {base_url}/models`` until it answers 200 and lists ``model``; returns the served names.

    Raises :class:`ServerNotReady` when ``process`` (the server) exits first, or when ``timeout``
    seconds pass; the message says what the server last answered and ends with its log's tail.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReady(f"the server exited with status {process.returncode} before it answered at "
                                 f"{base_url}/models{_tail(log)}")
        try:
            reply = httpx.get(f"{base_url.rstrip('/')}/models", timeout=5)
            if reply.status_code == 200:
                served = [m.get("id") for m in reply.json().get("data", [])]
                if model in served:
                    return served
                last = f"it serves {served}, not {model!r}"
            else:
                last = f"HTTP {reply.status_code}"
        except (httpx.TransportError, ValueError) as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise ServerNotReady(f"{base_url}/models did not list {model!r} within {timeout:g} s ({last}){_tail(log)}")
        time.sleep(interval)


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return f"; the end of {log}:\n{log.read_text(errors='replace')[-chars:]}"


def _gpus(text: str, flag: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise SystemExit(f"error: {flag} takes GPU indices separated by commas, e.g. 0,1,2,3; got {text!r}")
    return gpus


def commands(args: argparse.Namespace, train_args: list[str]) -> tuple[list[str], dict, list[str], dict]:
    """The server's and the trainer's command lines and environments."""
    user, train = _gpus(args.user_gpus, "--user-gpus"), _gpus(args.train_gpus, "--train-gpus")
    if set(user) & set(train):
        raise SystemExit(f"error: --user-gpus {args.user_gpus} and --train-gpus {args.train_gpus} overlap; the user's "
                         "server needs GPUs of its own")
    url = f"http://{args.host}:{args.port}/v1"
    serve = ["vllm", "serve", args.user_model, "--tensor-parallel-size", str(len(user)), "--host", args.host,
             "--port", str(args.port), "--max-model-len", str(args.max_model_len), *shlex.split(args.serve_args)]
    trainer = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(len(train)),
               str(ROOT / "scripts" / "train_agent.py"), "--agent", "refuel", "--preset", "paper-setting-one",
               "--deepspeed", str(ROOT / "refuel_agents" / "configs" / "deepspeed_zero3.json"), *train_args]
    serve_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(user)}
    train_env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(train), "REFUEL_USER_BASE_URL": url}
    return serve, serve_env, trainer, train_env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user-gpus", default="0,1,2,3", help="GPUs of the user's server (default: %(default)s)")
    parser.add_argument("--train-gpus", default="4,5,6,7", help="GPUs of the training ranks (default: %(default)s)")
    parser.add_argument("--user-model", default=USER_MODEL, help="the served user model (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="vllm serve --max-model-len; the preset's user_openai_kwargs max_context matches it (default: %(default)s)")
    parser.add_argument("--serve-args", default="--gpu-memory-utilization 0.9 --enable-prefix-caching",
                        help="further `vllm serve` flags, one string (default: %(default)s)")
    parser.add_argument("--wait-timeout", type=float, default=1800.0,
                        help="seconds to wait for the server to list the model (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/launch"), help="where vllm_serve.log goes (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their GPUs, start nothing")
    args = parser.parse_args(own)
    serve, serve_env, trainer, train_env = commands(args, train_args)
    if args.dry_run:
        print(json.dumps({"serve": {"command": serve, "CUDA_VISIBLE_DEVICES": serve_env["CUDA_VISIBLE_DEVICES"]},
                          "train": {"command": trainer, "CUDA_VISIBLE_DEVICES": train_env["CUDA_VISIBLE_DEVICES"],
                                    "REFUEL_USER_BASE_URL": train_env["REFUEL_USER_BASE_URL"]}}, indent=2))
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.log_dir / "vllm_serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(serve, env=serve_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(train_env["REFUEL_USER_BASE_URL"], args.user_model, timeout=args.wait_timeout,
                        process=server, log=log_path)
        print(f"user server ready at {train_env['REFUEL_USER_BASE_URL']}; starting training", flush=True)
        return subprocess.run(trainer, env=train_env).returncode
    except ServerNotReady as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
