"""Evaluate chat policies in a refuel-gym environment: per-turn win rates against a reference
policy (table 1), the full-dialogue win rate, reward-model score and KL (table 2), response length.

Every policy and the reference play the same held-out prompts (test split) with the same seeds
for H turns; the two dialogues are judged truncated at each turn h = 1..H. Writes results.md,
results.json and winrate_by_turn.png to --output-dir and prints the table.

    # environment-only benchmarking: evaluate a model with no training at all
    python scripts/evaluate.py --policy hf:meta-llama/Meta-Llama-3-8B-Instruct

    # a trained policy against the embedded base model, judged by the reward model (CPU)
    python scripts/evaluate.py --policy refuel=runs/<run>/final_model --judge reward

    # two policies, GPT-4 as judge (needs $OPENAI_API_KEY), both A/B orders
    python scripts/evaluate.py --policy refuel=runs/a/final_model --policy rebel=runs/b/final_model \\
        --reference hf:meta-llama/Meta-Llama-3-8B-Instruct --judge openai:gpt-4-0613 --both-orders \\
        --env-preset paper-setting-one --num-prompts 500

--policy and --reference take a model spec, optionally named (NAME=SPEC names the table row):

{specs}

--judge takes 'reward' (the environment's reward model prefers the dialogue it scores higher;
ties count one half) or a model spec (an LLM judge answering the appendix C.5 prompt, whose answer
must end with 'Preferred: A' or 'Preferred: B'; unparsed answers are counted, not guessed).
With --both-orders each comparison is judged with the policy as A and as B: consistent answers
count as a win or a loss, contradictory ones as a tie (0.5), a single parsed answer counts alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import refuel_env
from refuel_agents.evaluation import (
    DEFAULT_HORIZON,
    JUDGE_TEMPLATES,
    SPEC_HELP,
    SpecError,
    check_spec,
    evaluate_policies,
    markdown_table,
    split_named_spec,
    write_reports,
)
from refuel_env.components import PRESETS
from refuel_env.generation import GenerationError, SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.format(specs=SPEC_HELP.split("\n", 1)[1]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", required=True, metavar="[NAME=]SPEC",
                   help="a policy to evaluate (repeat for several); a model spec, optionally named NAME=SPEC")
    p.add_argument("--reference", default="embedded", metavar="SPEC",
                   help="the reference policy every policy is compared with (default: %(default)s, the base model)")
    p.add_argument("--judge", default="reward", metavar="reward|SPEC",
                   help="'reward' (the environment's reward model) or a judge model spec, e.g. "
                        "openai:gpt-4-0613 or embedded (default: %(default)s)")
    p.add_argument("--judge-template", default="auto", choices=["auto", *sorted(JUDGE_TEMPLATES)],
                   help="pairwise judge prompt: 'auto' picks 'hh' for Anthropic HH, else 'ultrainteract' (default: %(default)s)")
    p.add_argument("--both-orders", action="store_true",
                   help="judge every comparison in both A/B orders (LLM judges; see the rule above)")
    p.add_argument("--judge-max-new-tokens", type=int, default=256,
                   help="longest judge answer in tokens; judges decode greedily (default: %(default)s)")
    p.add_argument("--env-id", default="UltraInteractDialogue-v0", choices=sorted(refuel_env.ENV_IDS),
                   help="environment id (default: %(default)s)")
    p.add_argument("--env-preset", default=None, choices=sorted(PRESETS),
                   help="environment preset, e.g. paper-setting-one (default: none, the embedded models)")
    p.add_argument("--env-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='more environment arguments as JSON, e.g. \'{"user": "instant"}\'; split is always '
                        "'test' and kl_coef 0 while playing (default: {})")
    p.add_argument("--num-prompts", type=int, default=8,
                   help="held-out prompts, drawn without replacement with --seed (default: %(default)s)")
    p.add_argument("--horizon", type=int, default=DEFAULT_HORIZON,
                   help="turns H per dialogue, at most the environment's max_turns (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompt draw, the environment, the policies' sampling and the judge's A/B "
                        "orders (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="longest policy response in tokens (the paper used 1024) (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="policy sampling temperature; also divides the logits in the KL estimate (default: %(default)s)")
    p.add_argument("--no-kl", action="store_true", help="skip the KL(pi || pi_ref) estimate")
    p.add_argument("--device", default=None, help="device of local models (default: cuda if available, else cpu)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where to write the reports (default: runs/eval-<date>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not isinstance(args.env_kwargs, dict):
        raise SystemExit(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    if args.num_prompts < 1 or args.horizon < 1:
        raise SystemExit("--num-prompts and --horizon must be at least 1")
    try:
        policies: dict[str, str] = {}
        for text in args.policy:
            name, spec = split_named_spec(text)
            if name in policies:
                raise SpecError(f"two policies are named {name!r}; name them with NAME=SPEC")
            check_spec(spec)
            policies[name] = spec
        check_spec(args.reference)
        if args.judge != "reward":
            check_spec(args.judge)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        judge_sampling = SamplingParams(max_new_tokens=args.judge_max_new_tokens, temperature=0.0)
    except (SpecError, GenerationError) as err:
        raise SystemExit(f"error: {err}") from None
    env_kwargs = dict(args.env_kwargs)
    if args.env_preset:
        env_kwargs["preset"] = args.env_preset
    out_dir = args.output_dir or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    try:
        results = evaluate_policies(
            policies, args.reference, args.judge, env_id=args.env_id, env_kwargs=env_kwargs,
            num_prompts=args.num_prompts, horizon=args.horizon, seed=args.seed, sampling=sampling,
            both_orders=args.both_orders, judge_template=None if args.judge_template == "auto" else args.judge_template,
            judge_sampling=judge_sampling, compute_kl=not args.no_kl, device=args.device, progress=not args.quiet,
        )
    except (SpecError, GenerationError, TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    except OSError as err:  # a dataset or model that is not on this machine (no network)
        raise SystemExit(
            f"error: {type(err).__name__}: {err}\nThe environment, a policy or the judge could not load its data or "
            "model. The paper presets need their hub datasets and models in the local Hugging Face cache; or pass "
            'local copies, e.g. --env-kwargs \'{"data_source": "path/to/data.jsonl"}\'.'
        ) from None
    paths = write_reports(results, out_dir)
    print(markdown_table(results))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
