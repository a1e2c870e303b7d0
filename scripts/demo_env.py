"""Play a few dialogues in a refuel-gym environment and show transcripts and rewards.

    python scripts/demo_env.py                      # embedded default: SmolLM2 policy and user
    python scripts/demo_env.py --env-id AnthropicHHPresampled-v0 --num-dialogues 8 --horizon 2

The policy is a chat model behind the text-generation interface (the embedded SmolLM2-135M-
Instruct unless --policy-model names another); all dialogues run in one batched vector env, so
each turn is one batched policy call, one batched user call, and one reward call at the end.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import refuel_env
from refuel_env import embedded
from refuel_env.generation import SamplingParams, TransformersGenerator


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="UltraInteractDialogue-v0", choices=sorted(refuel_env.ENV_IDS),
                   help="environment id (default: %(default)s)")
    p.add_argument("--num-dialogues", type=int, default=4, help="dialogues played side by side (default: %(default)s)")
    p.add_argument("--horizon", type=int, default=3, help="turns H per dialogue (default: %(default)s)")
    p.add_argument("--policy-model", default="embedded",
                   help="policy chat model: 'embedded' (SmolLM2-135M-Instruct) or a local path (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest policy response in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="policy sampling temperature (default: %(default)s)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="dataset split of the prompts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the environment and the policy (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print only the summary, not the transcripts")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.num_dialogues < 1 or args.horizon < 1:
        raise SystemExit("--num-dialogues and --horizon must be at least 1")
    path = embedded.smollm2_path() if args.policy_model == "embedded" else args.policy_model
    policy = TransformersGenerator.from_pretrained(str(path))
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    env = gym.make_vec(args.env_id, num_envs=args.num_dialogues, vectorization_mode="vector_entry_point",
                       split=args.split, render_mode="ansi")
    n = args.num_dialogues
    obs, _ = env.reset(seed=args.seed, options={"horizon": args.horizon})
    rng = np.random.default_rng(args.seed)
    rewards = np.zeros(n)
    transcripts: list[str] = [""] * n
    infos_end: list[dict] = [{} for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    start = time.perf_counter()
    for _ in tqdm(range(args.horizon), desc="turns", unit="turn"):
        replies = policy.chat(list(obs), sampling, seeds=rng.integers(0, 2**31 - 1, n).tolist())
        obs, reward, terminated, truncated, info = env.step([r.text for r in replies])
        for i in np.flatnonzero((terminated | truncated) & ~done):
            rewards[i] = reward[i]
            transcripts[i] = env.unwrapped.render()[i]
            infos_end[i] = {k: info[k][i] for k in ("item_id", "user_parse_failures") if k in info}
            if truncated[i]:
                infos_end[i]["truncated"] = info["truncation_reason"][i]
        done |= terminated | truncated
    elapsed = time.perf_counter() - start
    if not args.quiet:
        for i in range(n):
            print(f"\n===== dialogue {i}  item {infos_end[i].get('item_id')}  reward {rewards[i]:+.4f} =====")
            print(transcripts[i])
    print(f"\n{n} dialogues of {args.horizon} turns in {elapsed:.1f} s on {args.env_id}")
    print(f"reward: mean {rewards.mean():+.4f}  min {rewards.min():+.4f}  max {rewards.max():+.4f}")
    failures = sum(int(e.get("user_parse_failures", 0)) for e in infos_end)
    print(f"simulated-user parse failures (fallback used): {failures} of {n * (args.horizon - 1)} user turns")


if __name__ == "__main__":
    main()
