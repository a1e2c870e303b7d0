"""Collection tuples/s with 1 and with 2 ranks on the same prompts, side by side.

    python scripts/benchmark_collection_ranks.py --json runs/collection_ranks.json
    python scripts/benchmark_collection_ranks.py --prompts 8 --max-new-tokens 16 --ranks 1 2

For each rank count W, starts W processes with torchrun (gloo), each running
``RefuelTrainer.collect`` on its shard of iteration 0's prompts (the same prompts for every W:
same seed, same --prompts). The CPU threads are split between the ranks (``--threads`` in all),
so every W uses the same cores. After a barrier, each rank times its own collection; the
iteration's time is the slowest rank's, and tuples/s is all ranks' tuples over it. Beside the
wall time, the CPU time of all ranks (``time.process_time``) per tuple: 1 rank x 2 threads and
2 ranks x 1 thread use the cores differently, and CPU time shows the work done whatever else ran.
Model loading is not timed. The policy is the embedded SmolLM2-135M (or --policy-model) and the
user is the instant one, so the figure is the policy's generation and the environment's steps.

On the same cores, the ideal ratio between rank counts is 1x: more ranks add no hardware here.
The 1-minute load average before and after each run is in the table and the JSON, with a warning
when it exceeds ``--threads``: under contention the ratio itself changes, so such a figure is not
a measurement of the sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refuel_agents.machine_load import load_average, load_cell, load_line, load_record  # noqa: E402 (after the path)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as td

    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    td.init_process_group("gloo")
    config = RefuelConfig(policy_model=args.policy_model, env_kwargs={"user": "instant", "max_turns": args.max_turns},
                          prompts_per_iteration=args.prompts, batch_size=td.get_world_size(), micro_batch_size=1,
                          max_new_tokens=args.max_new_tokens, eval_prompts=0, reference_kl=False, device="cpu",
                          seed=args.seed, progress=False, output_dir=str(args.out))
    trainer = RefuelTrainer(config)
    td.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    rows, stats = trainer.collect(0)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    parts: list = [None] * td.get_world_size()
    td.all_gather_object(parts, {"rank": td.get_rank(), "tuples": len(rows), "seconds": seconds, "cpu_seconds": cpu_seconds,
                                 "policy_responses": stats.policy_responses,
                                 "item_ids": [r["item_id"] for r in rows]})
    if td.get_rank() == 0:
        (args.out / "ranks.json").write_text(json.dumps(parts))
    td.barrier()
    sys.stdout.flush()
    os._exit(0)  # as the distributed tests: no interpreter teardown with gloo threads alive


def run(world: int, args: argparse.Namespace) -> dict:
    out = args.work / f"w{world}"
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, args.threads // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
               f"--master_port={port}", __file__, "--worker", "--out", str(out), "--prompts", str(args.prompts),
               "--max-new-tokens", str(args.max_new_tokens), "--max-turns", str(args.max_turns),
               "--policy-model", args.policy_model, "--seed", str(args.seed)]
    before = load_average()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{world} rank(s) failed:\n{proc.stderr[-4000:]}")
    parts = json.loads((out / "ranks.json").read_text())
    return summarize(world, threads, parts, load_record(before, cores=args.threads))


def summarize(world: int, threads: int, parts: list[dict], load: dict) -> dict:
    """One rank count's figures from its ranks' reports: wall time of the slowest, CPU time of all."""
    seconds = max(p["seconds"] for p in parts)
    cpu_seconds = sum(p["cpu_seconds"] for p in parts)
    tuples = sum(p["tuples"] for p in parts)
    return {"ranks": world, "threads_per_rank": threads, "tuples": tuples, "seconds": seconds,
            "tuples_per_s": tuples / seconds, "cpu_seconds": cpu_seconds, "cpu_seconds_per_tuple": cpu_seconds / tuples,
            "load": load,
            "per_rank": [{k: p[k] for k in ("rank", "tuples", "seconds", "cpu_seconds")} for p in parts],
            "item_ids": sorted(i for p in parts for i in p["item_ids"])}


def table(results: list[dict]) -> str:
    base = results[0]["tuples_per_s"]
    lines = ["| ranks | threads per rank | tuples | slowest rank s | tuples/s | vs first | CPU s (all ranks) | "
             "CPU s per tuple | load before / after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['ranks']} | {r['threads_per_rank']} | {r['tuples']} | {r['seconds']:.1f} | "
                     f"{r['tuples_per_s']:.3f} | {r['tuples_per_s'] / base:.2f}x | {r['cpu_seconds']:.1f} | "
                     f"{r['cpu_seconds_per_tuple']:.2f} | {load_cell(r['load'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", "--only", type=int, nargs="+", default=[1, 2],
                        help="rank counts to compare, each a section of its own (default: 1 2)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the iteration (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="policy response limit (default: %(default)s)")
    parser.add_argument("--max-turns", type=int, default=2, help="longest dialogue H (default: %(default)s)")
    parser.add_argument("--policy-model", default="embedded", help="policy checkpoint (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads in all, split between the ranks (default: the machine's cores)")
    parser.add_argument("--seed", type=int, default=1, help="collection seed (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark_collection_ranks"), help="scratch folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    before = load_average()
    results = [run(w, args) for w in args.ranks]
    if len({tuple(r["item_ids"]) for r in results}) != 1:
        raise SystemExit("the rank counts collected different prompts; the comparison would not be like for like")
    load = load_record(before, cores=args.threads)
    load["busy"] = load["busy"] or any(r["load"]["busy"] for r in results)  # busy during any run counts
    print(f"collection of {args.prompts} prompts, instant user, H <= {args.max_turns}, responses <= "
          f"{args.max_new_tokens} tokens, {args.threads} threads in all, policy {args.policy_model}\n")
    print(table(results))
    print(load_line(load))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "json", "work")},
                                         "load": load, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
