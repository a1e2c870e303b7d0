"""Setting one: the 70 B simulated user on `vllm serve`, REFUEL on the other GPUs, as the memory plan says.

    python scripts/launch_paper_setting_one.py                                   # 8 GPUs: user 0-3, training 4-7
    python scripts/launch_paper_setting_one.py --user-gpus 0,1,2,3 --train-gpus 4,5,6,7 --port 8000 \\
        -- --iterations 2 --run-name setting-one                                 # flags after -- go to train_agent.py
    python scripts/launch_paper_setting_one.py --dry-run                         # print what would run, start nothing
    python scripts/launch_paper_setting_one.py --user-base-url http://HOST:8000/v1  # a user server already running
    # two nodes: the same command on each, NODE_RANK 0 on the node at MASTER_ADDR
    python scripts/launch_paper_setting_one.py --nnodes 2 --node-rank $NODE_RANK --master-addr $MASTER_ADDR

1. Plans the memory of every training GPU (``scripts/memory_plan.py``, from the preset, the flags
   after ``--`` and the models' ``config.json``) and refuses to start when a phase does not fit
   ``--gpu-memory-gb``, naming it.
2. Starts ``vllm serve <user model> --tensor-parallel-size <len(user GPUs)>`` with
   ``CUDA_VISIBLE_DEVICES`` set to the user's GPUs, in a session of its own, its log in
   ``<log-dir>/vllm_serve.log``.
3. Waits until ``GET <url>/models`` answers and lists the model (:func:`wait_for_server`), or
   fails when the server exits or ``--wait-timeout`` seconds pass. Loading 70 B takes minutes.
4. Starts ``torchrun --nproc_per_node <len(train GPUs)> scripts/train_agent.py --agent refuel
   --preset paper-setting-one --deepspeed refuel_agents/configs/deepspeed_zero3.json
   --policy-backend vllm --policy-vllm-sleep --policy-vllm-kwargs '{"gpu_memory_utilization": <plan>}'``
   on the training GPUs, with ``REFUEL_USER_BASE_URL`` pointing every rank at the server: each
   rank generates with its own vLLM replica of the policy, which sleeps while the rank scores
   and trains.
   With ``--user-base-url`` steps 2 and 3 call a server that is already running there instead:
   the launcher starts none, waits for it to list ``--user-model`` and points the ranks at it.
5. Stops training and the server's whole process group (SIGTERM, then SIGKILL after
   ``--stop-timeout`` seconds) when training ends, whatever the outcome, and also on SIGTERM or
   Ctrl-C; exits with training's status.

Every rank of a node calls its node's server (vLLM batches the ranks' requests together); no
rank starts a user engine of its own. With ``--nnodes N`` every node runs this launcher: it
serves its own copy of the user, bound to ``--host`` (``0.0.0.0`` by default then, so the
address is reachable), and its ranks call ``http://<--advertise-host>:<port>/v1``; torchrun joins
the nodes' ranks into one run (docs/scaling.md). The reward model (ArmoRM, 8 B) runs in each
training rank and scores that rank's dialogues: see docs/scaling.md for why, and for the memory
on each GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    import memory_plan

ROOT = Path(__file__).resolve().parents[1]
USER_MODEL = "meta-llama/Llama-3.1-70B-Instruct"
PRESET = "paper-setting-one"


class ServerNotReady(RuntimeError):
    """The server exited, or did not serve the model, before the deadline."""


class Terminated(Exception):
    """The launcher received SIGTERM."""


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


def _gpu_sets(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    user, train = _gpus(args.user_gpus, "--user-gpus"), _gpus(args.train_gpus, "--train-gpus")
    if set(user) & set(train):
        raise SystemExit(f"error: --user-gpus {args.user_gpus} and --train-gpus {args.train_gpus} overlap; the user's "
                         "server needs GPUs of its own")
    return user, train


def plan(args: argparse.Namespace, train_args: list[str]) -> memory_plan.Setting:
    """The memory plan of this launch (every node alike); a phase that does not fit is an error naming it."""
    import memory_plan  # the plan reads the trainer's configuration: imported only when planning

    user, train = _gpu_sets(args)
    setting = memory_plan.setting(PRESET, len(user) + len(train), args.gpu_memory_gb, user_gpus=len(user),
                                  nodes=args.nnodes, train_args=train_args)
    failing = setting.failing()
    if failing:
        raise SystemExit(f"error: the memory plan does not fit {args.gpu_memory_gb:g} GB GPUs in the {', '.join(failing)} "
                         f"phase(s); see `python scripts/memory_plan.py --preset {PRESET} --gpus "
                         f"{len(user) + len(train)} --gpu-memory-gb {args.gpu_memory_gb:g}"
                         f"{' --nodes ' + str(args.nnodes) if args.nnodes > 1 else ''}`")
    return setting


def commands(args: argparse.Namespace, train_args: list[str],
             setting: memory_plan.Setting | None = None) -> tuple[list[str], dict, list[str], dict]:
    """The server's and the trainer's command lines, and the variables each adds to the environment."""
    user, train = _gpu_sets(args)
    import memory_plan

    setting = setting or plan(args, train_args)
    url = args.user_base_url or f"http://{args.advertise_host}:{args.port}/v1"
    serve = ["vllm", "serve", args.user_model, "--tensor-parallel-size", str(len(user)), "--host", args.host,
             "--port", str(args.port), "--max-model-len", str(args.max_model_len), *shlex.split(args.serve_args)]
    nodes = []
    if args.nnodes > 1:
        nodes = ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank), "--master_addr", args.master_addr,
                 "--master_port", str(args.master_port)]
    vllm_kwargs = {**setting.config.policy_vllm_kwargs,
                   "gpu_memory_utilization": setting.plan.vllm_gpu_memory_utilization}
    trainer = [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", str(len(train)),
               str(ROOT / "scripts" / "train_agent.py"), "--agent", "refuel", "--preset", PRESET,
               *memory_plan.plan_flags(), "--policy-vllm-kwargs", json.dumps(vllm_kwargs), *train_args]
    serve_env = {"CUDA_VISIBLE_DEVICES": ",".join(user)}
    if args.user_base_url:  # a server that is already running: none to start
        serve, serve_env = [], {}
    train_env = {"CUDA_VISIBLE_DEVICES": ",".join(train), "REFUEL_USER_BASE_URL": url}
    return serve, serve_env, trainer, train_env


def routing(args: argparse.Namespace) -> list[str]:
    """Which ranks call which server: every node's ranks call that node's own server."""
    per_node = len(_gpus(args.train_gpus, "--train-gpus"))
    lines = []
    for node in range(args.nnodes):
        if args.user_base_url:
            lines.append(f"node {node}: ranks {node * per_node}-{(node + 1) * per_node - 1} call {args.user_base_url} "
                         "(--user-base-url, a server this launcher does not start)")
            continue
        host = args.advertise_host if node == args.node_rank else f"<node {node}'s --advertise-host>"
        lines.append(f"node {node}: ranks {node * per_node}-{(node + 1) * per_node - 1} call "
                     f"http://{host}:{args.port}/v1 (the server on node {node}'s GPUs {args.user_gpus})")
    return lines


def stop_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to ``process``'s whole process group, SIGKILL to what is left of it after ``timeout`` seconds."""
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        group = process.pid  # the leader is gone and reaped; its group id was its pid (start_new_session)
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        process.wait()
        return
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline and _group_alive(group):
        time.sleep(0.1)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while time.monotonic() < deadline and _group_alive(group):
        time.sleep(0.05)


def _group_alive(group: int) -> bool:
    """True while a process of the group is alive (zombies waiting for their reaper do not count)."""
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def supervise(serve: list[str], serve_env: dict, trainer: list[str], train_env: dict, *, url: str, model: str,
              wait_timeout: float, log_path: Path, stop_timeout: float = 60.0) -> int:
    """Start the server in a session of its own, wait for it, run training; stop both however it ends.

    An empty ``serve`` starts no server: training waits for the one already answering at ``url``.

    SIGTERM to the launcher ends training (SIGTERM to torchrun, which passes it to the ranks) and
    the server's process group, then returns 143; Ctrl-C does the same and returns 130.
    """
    def on_sigterm(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    trainer_proc: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    if serve:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            server = subprocess.Popen(serve, env={**os.environ, **serve_env}, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    try:
        wait_for_server(url, model, timeout=wait_timeout, process=server, log=log_path if server else None)
        print(f"user server ready at {url}; starting training", flush=True)
        trainer_proc = subprocess.Popen(trainer, env={**os.environ, **train_env})
        return trainer_proc.wait()
    except ServerNotReady as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Terminated:
        print("launcher: SIGTERM received; stopping training and the user's server", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("launcher: interrupted; stopping training and the user's server", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        if trainer_proc is not None and trainer_proc.poll() is None:
            trainer_proc.terminate()
            try:
                trainer_proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                trainer_proc.kill()
                trainer_proc.wait()
        if server is not None:
            stop_group(server, stop_timeout)
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user-gpus", default="0,1,2,3", help="GPUs of the user's server on each node (default: %(default)s)")
    parser.add_argument("--train-gpus", default="4,5,6,7", help="GPUs of the training ranks on each node (default: %(default)s)")
    parser.add_argument("--user-model", default=USER_MODEL, help="the served user model (default: %(default)s)")
    parser.add_argument("--host", default=None,
                        help="the address the server binds (default: 127.0.0.1 on one node, 0.0.0.0 with --nnodes > 1)")
    parser.add_argument("--advertise-host", default=None,
                        help="the address this node's ranks call the server at (default: 127.0.0.1 on one node, this "
                             "node's host name with --nnodes > 1)")
    parser.add_argument("--user-base-url", default=None,
                        help="call an OpenAI-compatible server already serving --user-model at this URL, API prefix "
                             "included (e.g. http://HOST:8000/v1), instead of starting `vllm serve`; --user-gpus then "
                             "only sizes that server in the memory plan (default: start `vllm serve`)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=8192,
                        help="vllm serve --max-model-len; the preset's user_openai_kwargs max_context matches it (default: %(default)s)")
    parser.add_argument("--serve-args", default="--gpu-memory-utilization 0.9 --enable-prefix-caching",
                        help="further `vllm serve` flags, one string (default: %(default)s)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="memory of one GPU in GB (1e9 bytes) for the memory plan (default: %(default)s, an H100)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes, each running this launcher (default: %(default)s)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 on the --master-addr node (default: %(default)s)")
    parser.add_argument("--master-addr", default=None, help="torchrun's rendezvous host; needed with --nnodes > 1")
    parser.add_argument("--master-port", type=int, default=29500, help="torchrun's rendezvous port (default: %(default)s)")
    parser.add_argument("--wait-timeout", type=float, default=1800.0,
                        help="seconds to wait for the server to list the model (default: %(default)s)")
    parser.add_argument("--stop-timeout", type=float, default=60.0,
                        help="seconds between SIGTERM and SIGKILL when stopping training and the server (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/launch"), help="where vllm_serve.log goes (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan, the commands and the variables each adds to the environment; start nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"error: need --nnodes >= 1 and 0 <= --node-rank < --nnodes, got {args.nnodes} and {args.node_rank}")
    if args.nnodes > 1 and not args.master_addr:
        raise SystemExit("error: --nnodes > 1 needs --master-addr, the host of node 0 (torchrun's rendezvous)")
    several = args.nnodes > 1
    args.host = args.host or ("0.0.0.0" if several else "127.0.0.1")
    args.advertise_host = args.advertise_host or (socket.gethostname() if several else "127.0.0.1")
    if several and args.host in ("127.0.0.1", "localhost") and args.advertise_host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"error: --host {args.host} is not reachable at --advertise-host {args.advertise_host}; "
                         "bind 0.0.0.0 or this node's address")
    setting = plan(args, train_args)
    serve, serve_env, trainer, train_env = commands(args, train_args, setting)
    if args.dry_run:
        p = setting.plan
        print(json.dumps({
            "plan": {"world": setting.world, "gpu_memory_gb": args.gpu_memory_gb,
                     "vllm_gpu_memory_utilization": p.vllm_gpu_memory_utilization,
                     "peak_gb": {phase: round(p.peak(phase) / 1e9, 1) for phase in p.rows}},
            "serve": {"command": serve, **serve_env, "shell": _shell(serve_env, serve)} if serve else None,
            "train": {"command": trainer, **train_env, "shell": _shell(train_env, trainer)},
            "routing": routing(args)}, indent=2))
        return 0
    for line in routing(args):
        print(line, flush=True)
    return supervise(serve, serve_env, trainer, train_env, url=train_env["REFUEL_USER_BASE_URL"], model=args.user_model,
                     wait_timeout=args.wait_timeout, log_path=args.log_dir / "vllm_serve.log",
                     stop_timeout=args.stop_timeout)


def _shell(env: dict, command: list[str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, command)])


if __name__ == "__main__":
    sys.exit(main())
