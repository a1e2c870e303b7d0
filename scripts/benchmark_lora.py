"""Peak memory of a LoRA REFUEL run against full fine-tuning of the same run, side by side.

    python scripts/benchmark_lora.py --json runs/benchmark_lora.json
    python scripts/benchmark_lora.py --prompts 8 --max-new-tokens 16 --lora-r 16 --lora-alpha 32

Both configurations run the same short REFUEL run (``RefuelTrainer.train``: collection, the pi_t
and pi_0 log-probs, the updates, a checkpoint and the final model) on the embedded SmolLM2-135M
(or ``--policy-model``) with the instant user, on the CPU in fp32, each in a fresh process of its
own (``spawn``), one after the other, so that neither inherits the other's memory. The same seed
gives both the same prompts. ``reference_kl`` is on, as by default: full fine-tuning keeps a
frozen copy of the policy as pi_0, LoRA scores pi_0 with the adapters off.

Reported per configuration: the peak resident set of the worker process (``VmHWM`` of
``/proc/self/status``), the resident set after the imports and before the trainer is built,
and their difference (what the run itself added); the trainable parameters; and the bytes that
weights, gradients, AdamW's two moments and the pi_0 copy take by count (4 bytes per element).
Then the ratios LoRA / full of the peaks and of the differences. Memory does not depend on the
machine's load; the 1-minute load average is recorded anyway (``machine_load``), as in every
benchmark here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refuel_agents.machine_load import load_average, load_line, load_record  # noqa: E402 (after the path)

MIB = 2**20


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")
    return int(match.group(1))


def measure(name: str, settings: dict, threads: int, work: str) -> dict:
    """One configuration's run in this (fresh) process: its memory figures."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                      TOKENIZERS_PARALLELISM="false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    torch.set_num_threads(threads)
    start = _status_kib("VmRSS") * 1024
    trainer = RefuelTrainer(RefuelConfig(**settings, output_dir=work, run_name=name))
    trainer.train()
    peak = _status_kib("VmHWM") * 1024
    params = list(trainer.model.parameters())
    numel = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen_copy = sum(p.numel() for p in trainer.reference.parameters()) if settings["lora_r"] == 0 else 0
    return {"configuration": name, "peak_rss": peak, "rss_before_trainer": start, "run_rss": peak - start,
            "parameters": numel, "trainable_parameters": trainable, "reference_copy_parameters": frozen_copy,
            "state_bytes_by_count": 4 * (numel + 3 * trainable + frozen_copy),
            "optimizer_steps": trainer._state["global_step"]}


def in_fresh_process(name: str, settings: dict, threads: int, work: str) -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, name, settings, threads, work).result()


def table(results: dict) -> str:
    lines = ["| configuration | trainable parameters | weights+grads+AdamW+pi_0 copy (by count) | RSS before trainer | "
             "peak RSS | run's own (peak - before) |", "|---|---|---|---|---|---|"]
    for r in results.values():
        lines.append(f"| {r['configuration']} | {r['trainable_parameters']:,} of {r['parameters']:,} | "
                     f"{r['state_bytes_by_count'] / MIB:.0f} MiB | {r['rss_before_trainer'] / MIB:.0f} MiB | "
                     f"{r['peak_rss'] / MIB:.0f} MiB | {r['run_rss'] / MIB:.0f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy-model", default="embedded", help="policy checkpoint (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=4, help="prompts (= tuples) of the one iteration (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="policy response limit (default: %(default)s)")
    p.add_argument("--max-turns", type=int, default=2, help="longest dialogue H (default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-target-modules", default="all-linear", help="LoRA target modules (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of both runs (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "max_turns", "lora_r", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    base = {"policy_model": args.policy_model, "env_kwargs": {"user": "instant", "max_turns": args.max_turns},
            "iterations": 1, "prompts_per_iteration": args.prompts, "batch_size": 2, "micro_batch_size": 1,
            "max_new_tokens": args.max_new_tokens, "eval_prompts": 0, "device": "cpu", "seed": args.seed,
            "progress": False, "lora_alpha": args.lora_alpha, "lora_target_modules": args.lora_target_modules}
    before = load_average()
    results = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_lora-") as work:
        for name, r in (("full", 0), ("lora", args.lora_r)):
            results[name] = in_fresh_process(name, {**base, "lora_r": r}, args.threads, work)
    load = load_record(before, cores=args.threads)
    ratio = {"peak_rss": results["lora"]["peak_rss"] / results["full"]["peak_rss"],
             "run_rss": results["lora"]["run_rss"] / results["full"]["run_rss"]}
    print(f"one REFUEL iteration of {args.prompts} prompts (instant user, H <= {args.max_turns}, responses <= "
          f"{args.max_new_tokens} tokens, batch 2, reference_kl on), policy {args.policy_model}, CPU fp32; LoRA r = "
          f"{args.lora_r}, alpha = {args.lora_alpha}, targets {args.lora_target_modules}\n")
    print(table(results))
    print(f"LoRA / full: peak RSS {ratio['peak_rss']:.2f}x, the run's own memory {ratio['run_rss']:.2f}x")
    print(load_line(load))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"}, "load": load,
                                         "results": results, "ratio_lora_to_full": ratio}, indent=2, default=str))


if __name__ == "__main__":
    main()
