"""How often the embedded simulated user's output fails to parse, by prompt style and decoding setting.

    python scripts/study_user_parsing.py                        # every variant, 32 train-split dialogues
    python scripts/study_user_parsing.py --prompts 16 --only role-swap-t0.8-24 --json parse.json

The states are the train split's first ``--prompts`` UltraInteract questions, each followed by the
embedded policy's greedy response (SmolLM2-135M-Instruct, at most ``--response-tokens`` tokens),
computed once and shared by every variant. Each variant is the embedded user (the same SmolLM2)
with one prompt style and one decoding setting, asked for the next question of every state with
the same seeds. Reported per variant: the share of outputs that parse (module
``refuel_env.users``: role-swap output parses when it holds a question mark, paper-style output
when it has a ``Question:`` line) with its Wilson 95 % interval, how the failures fell back, the
user's mean output tokens, and the CPU seconds of the variant's generation. The test split is not
read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (prompt style, temperature, max new tokens)
VARIANTS: dict[str, tuple[str, float, int]] = {
    "role-swap-t0.8-24": ("role-swap", 0.8, 24),  # the trainer's embedded default before this study
    "role-swap-t0.8-48": ("role-swap", 0.8, 48),
    "role-swap-t0.5-24": ("role-swap", 0.5, 24),
    "role-swap-t0.5-48": ("role-swap", 0.5, 48),
    "role-swap-greedy-48": ("role-swap", 0.0, 48),
    "paper-t0.8-64": ("paper", 0.8, 64),
}


def states(count: int, response_tokens: int) -> tuple[list, list]:
    """(items, dialogues): each item's first question and the embedded policy's greedy response to it."""
    import gymnasium as gym

    import refuel_env  # noqa: F401  (registers the ids)
    from refuel_env import embedded
    from refuel_env.generation import SamplingParams, TransformersGenerator

    env = gym.make("UltraInteractDialogue-v0", split="train", user="instant")
    items = list(env.unwrapped.core.items)[:count]
    env.close()
    policy = TransformersGenerator.from_pretrained(str(embedded.smollm2_path()), device="cpu")
    firsts = [[{"role": "user", "content": item.questions[0]}] for item in items]
    replies = policy.chat(firsts, SamplingParams(max_new_tokens=response_tokens, temperature=0.0))
    return items, [[*m, {"role": "assistant", "content": c.text}] for m, c in zip(firsts, replies)]


def run_variant(name: str, items: list, dialogues: list, seed: int) -> dict:
    from refuel_env import embedded
    from refuel_env.generation import SamplingParams, TransformersGenerator
    from refuel_env.users import LLMUser, UserRequest

    style, temperature, max_new = VARIANTS[name]
    generator = TransformersGenerator.from_pretrained(str(embedded.smollm2_path()), device="cpu")
    user = LLMUser(generator, style=style, sampling=SamplingParams(max_new_tokens=max_new, temperature=temperature))
    requests = [UserRequest(messages=tuple(d), item=item, turn=1, seed=seed + i) for i, (d, item) in enumerate(zip(dialogues, items))]
    start = time.process_time()
    turns = user.respond(requests)
    seconds = time.process_time() - start
    from refuel_agents.evaluation.stats import wilson_interval

    parsed = sum(t.parsed for t in turns)
    low, high = wilson_interval(parsed, len(turns))
    return {"variant": name, "style": style, "temperature": temperature, "max_new_tokens": max_new, "n": len(turns),
            "parsed": parsed, "parse_rate": parsed / len(turns), "ci_low": low, "ci_high": high,
            "fallback_question_sentence": sum(t.fallback == "question_sentence" for t in turns),
            "fallback_generic": sum(t.fallback == "generic" for t in turns),
            "mean_output_tokens": sum(t.completion_tokens for t in turns) / len(turns), "cpu_s": seconds,
            "examples": [t.text for t in turns[:3]]}


def table(rows: list[dict]) -> str:
    lines = ["| variant | parsed | rate [95 % CI] | fallback: ?-sentence / generic | output tokens | CPU s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['parsed']}/{r['n']} | {r['parse_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] | "
                     f"{r['fallback_question_sentence']} / {r['fallback_generic']} | {r['mean_output_tokens']:.1f} | {r['cpu_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--prompts", type=int, default=32, help="train-split dialogues asked of every variant (default: %(default)s)")
    p.add_argument("--response-tokens", type=int, default=32,
                   help="longest policy response in the states, in tokens (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None, help="run these variants (default: all)")
    p.add_argument("--seed", type=int, default=1, help="the user's sampling seed of the first dialogue (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.response_tokens < 1:
        p.error(f"--prompts and --response-tokens must be at least 1, got {args.prompts} and {args.response_tokens}")
    items, dialogues = states(args.prompts, args.response_tokens)
    rows = [run_variant(name, items, dialogues, args.seed) for name in (args.only or VARIANTS)]
    print(table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"prompts": args.prompts, "variants": rows}, indent=1))


if __name__ == "__main__":
    main()
