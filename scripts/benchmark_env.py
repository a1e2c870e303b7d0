"""Measure the environment: its own overhead per step, and throughput with the embedded user.

    python scripts/benchmark_env.py                 # everything (about 2 minutes on 2 CPU cores)
    python scripts/benchmark_env.py --skip-user     # overhead only (seconds); the same as --only overhead
    python scripts/benchmark_env.py --only user --json env.json   # one part, its figures also written as JSON
    python scripts/benchmark_env.py --num-envs 1 8 32 --user-tokens 64 --device cuda

Part 1, overhead: an instant user (a fixed question) and a constant reward, so that what is
timed is the environment itself: option handling, bookkeeping, snapshots in ``info`` and, in
the second row, counting each response's tokens with the SmolLM2 tokenizer.

Part 2, the embedded SmolLM2-135M-Instruct user in the batched vector env at several
``num_envs``: the policy's replies are fixed strings (no policy model is timed), H is fixed,
and every user turn generates up to ``--user-tokens`` tokens. Dialogues/s and user tokens/s
(generated tokens over wall time) are printed side by side with the ratio to ``num_envs=1``.

The 1-minute load average before and after is printed under the tables and written to the JSON
(``load``), with a warning when it exceeds the torch threads used.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import refuel_env  # noqa: F401
from refuel_agents.machine_load import load_average, load_line, load_record
from refuel_env.rewards import TrajectoryRewardModel

REPLY = "Here is my answer: first we simplify, then we check the result, which gives 42."


class ConstantReward(TrajectoryRewardModel):
    """Scores every dialogue 1.0, to time the environment without a reward model."""

    name = "constant"
    max_length = None

    def _score(self, dialogues):
        return np.ones(len(dialogues))

    def count_tokens(self, dialogue):
        return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overhead-episodes", type=int, default=2000,
                   help="episodes of H=5 for the overhead measurement (default: %(default)s)")
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 8, 32],
                   help="vector env sizes for the user throughput (default: %(default)s)")
    p.add_argument("--horizon", type=int, default=3, help="turns per dialogue with the user, so H-1 user turns (default: %(default)s)")
    p.add_argument("--user-tokens", type=int, default=64, help="max new tokens per user turn (default: %(default)s)")
    p.add_argument("--min-dialogues", type=int, default=2,
                   help="at least this many dialogues per num_envs setting; rounds of num_envs are run (default: %(default)s)")
    p.add_argument("--device", default=None, help="device of the user model (default: cuda if available, else cpu)")
    p.add_argument("--user-model", default="embedded",
                   help="user model: 'embedded' (SmolLM2-135M-Instruct) or a local checkpoint path (default: %(default)s)")
    p.add_argument("--tokenizer", default="embedded",
                   help="tokenizer that counts response tokens: 'embedded' or a local path (default: %(default)s)")
    p.add_argument("--skip-user", action="store_true", help="only measure the overhead (the same as --only overhead)")
    p.add_argument("--only", choices=("overhead", "user"), default=None, help="measure one part only (default: both)")
    p.add_argument("--json", type=Path, default=None, help="also write the measured figures here, as JSON")
    return p.parse_args()


def overhead(episodes: int, tokenizer: str | None) -> float:
    """Microseconds per step (reset time included, spread over the steps)."""
    env = gym.make("UltraInteractPresampled-v0", user="instant", reward_model=ConstantReward(),
                   tokenizer=tokenizer, disable_env_checker=True).unwrapped
    env.reset(seed=0)
    steps = 0
    start = time.perf_counter()
    for _ in range(episodes):
        env.reset(options={"horizon": 5})
        for _ in range(5):
            steps += 1
            if env.step(REPLY)[2]:
                break
    return (time.perf_counter() - start) / steps * 1e6


def user_throughput(num_envs: int, args: argparse.Namespace) -> tuple[float, float, int]:
    """(dialogues/s, user tokens/s, dialogues) for one vector env size."""
    kwargs = {"user_max_new_tokens": args.user_tokens, "reward_model": ConstantReward(),
              "user_model": args.user_model, "tokenizer": args.tokenizer}
    if args.device:
        kwargs["user_device"] = args.device
    env = gym.make_vec("UltraInteractDialogue-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    rounds = max(1, -(-args.min_dialogues // num_envs))
    env.reset(seed=0, options={"horizon": args.horizon})
    env.step([REPLY] * num_envs)  # warm-up: one batched user call
    tokens = dialogues = 0
    start = time.perf_counter()
    for r in range(rounds):
        env.reset(seed=r + 1, options={"horizon": args.horizon})
        for _ in range(args.horizon):
            _, _, terminated, truncated, info = env.step([REPLY] * num_envs)
            tokens += int(np.sum(info.get("user_completion_tokens", 0)))
        dialogues += int(np.sum(terminated | truncated))
    elapsed = time.perf_counter() - start
    return dialogues / elapsed, tokens / elapsed, dialogues


def main() -> None:
    args = parse_args()
    before = load_average()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}\n")
    results: dict = {}
    if args.only in (None, "overhead"):
        print("Environment overhead per step (instant user, constant reward, H = 5)")
        print(f"{'token counting':<34}{'us/step':>10}")
        results["overhead_us_per_step"] = {}
        for key, label, tok in (("tokenizer_off", "off (tokenizer=None)", None),
                                ("tokenizer_on", f"on (tokenizer={args.tokenizer})", args.tokenizer)):
            results["overhead_us_per_step"][key] = us = overhead(args.overhead_episodes, tok)
            print(f"{label:<34}{us:>10.1f}")
    if args.only in (None, "user") and not args.skip_user:
        print(f"\nUser model {args.user_model}, H = {args.horizon}, up to {args.user_tokens} tokens per user turn")
        print(f"{'num_envs':>8}{'dialogues':>11}{'dialogues/s':>13}{'user tok/s':>12}{'x num_envs=1':>14}")
        base = None
        results["user"] = []
        for n in args.num_envs:
            dps, tps, count = user_throughput(n, args)
            base = base or tps
            results["user"].append({"num_envs": n, "dialogues": count, "dialogues_per_s": dps, "user_tokens_per_s": tps,
                                    "ratio_to_first": tps / base})
            print(f"{n:>8}{count:>11}{dps:>13.3f}{tps:>12.1f}{tps / base:>14.2f}")
    results["load"] = load_record(before, cores=torch.get_num_threads())
    print("\n" + load_line(results["load"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
