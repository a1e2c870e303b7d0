"""Evaluate chat policies in a refuel-gym environment: per-turn win rates against a reference
policy (table 1), the full-dialogue win rate, reward-model score and KL (table 2), response length.

Every policy and the reference play the same held-out prompts (test split) with the same seeds
for H turns; the two dialogues are judged truncated at each turn h = 1..H. Writes results.md,
results.json and winrate_by_turn.png to --output-dir and prints the table.

    # environment-only benchmarking: evaluate a model with no training at all
    python scripts/evaluate.py --policy hf:meta-llama/Meta-Llama-3-8B-Instruct

    # the flags in a YAML or JSON file (keys: the flag names); flags on the command line override it
    python scripts/evaluate.py --config eval.yaml --num-prompts 16

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
With --both-orders (LLM judges only) each comparison is judged with the policy as A and as B:
consistent answers count as a win or a loss, contradictory ones as a tie (0.5), a single parsed
answer counts alone. Without it, each comparison's A/B order is drawn from (seed, prompt, policy,
turn), so adding a policy to the run changes no other row.

--judge-template takes 'auto', 'ultrainteract', 'hh' (this project's wording of the two
appendix C.5 prompts) or the path of a UTF-8 text file with your own prompt, e.g. appendix C.5's
exact text. In the file, the two transcripts go where the placeholders stand: {{dialogue_a}} and
{{dialogue_b}}, or appendix C.5's {{{{dialoguea}}}} and {{{{dialogueb}}}} (each exactly once). A
transcript reads '# User:' / '# Chatbot:' headings with a blank line between messages. The answer
is parsed for 'Preferred: A' / 'Preferred: B'.

Installed (pip install .), the same command is ``refuel-evaluate``. The output folder is checked
(a folder that can be written) before anything is played.

The evaluation plays without the environment's max_dialogue_tokens (a training-data filter that
would drop a whole pair when its later turns grow long); --max-dialogue-tokens sets a limit for
the evaluation itself. A pair is judged at every turn both dialogues reached. The KL column is
KL(pi || pi_ref) at temperature 1, estimated from dialogues each policy samples at T = 1 (a second
play when --temperature is not 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import refuel_env
from refuel_agents.cli import (
    check_output_dir,
    config_file_argv,
    json_object,
    load_config_file,
    split_config_flag,
)
from refuel_agents.evaluation import (
    DEFAULT_HORIZON,
    JUDGE_TEMPLATES,
    SPEC_HELP,
    SpecError,
    check_spec,
    evaluate_policies,
    load_judge_template,
    markdown_table,
    split_named_spec,
    write_reports,
)
from refuel_env.components import PRESETS, preset_kwargs
from refuel_env.generation import GenerationError, SamplingParams

_SPEC_FORMS = "a model spec: embedded, a checkpoint directory, hf:ID, vllm:ID or openai:MODEL[@BASE_URL]"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1; pass an integer >= 1")
    return value


def _limit(text: str) -> int | None:
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (or 'none' for no limit)") from None


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a temperature >= 0 (0 = greedy)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0; pass a temperature >= 0 (0 = greedy)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.format(specs=SPEC_HELP.split("\n", 1)[1]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a YAML or JSON file of flag names and values (policy: a list for several); explicit flags "
                        "override it")
    p.add_argument("--policy", action="append", required=True, metavar="[NAME=]SPEC",
                   help="a policy to evaluate (repeat for several); a model spec, optionally named NAME=SPEC")
    p.add_argument("--reference", default="embedded", metavar="SPEC",
                   help="the reference policy every policy is compared with (default: %(default)s, the base model)")
    p.add_argument("--judge", default="reward", metavar="reward|SPEC",
                   help="'reward' (the environment's reward model) or a judge model spec, e.g. "
                        "openai:gpt-4-0613 or embedded (default: %(default)s)")
    p.add_argument("--judge-template", default="auto", metavar="auto|" + "|".join(sorted(JUDGE_TEMPLATES)) + "|PATH",
                   help="pairwise judge prompt: 'auto' picks 'hh' for Anthropic HH, else 'ultrainteract'; or a text "
                        "file with {dialogue_a} and {dialogue_b} (or {{dialoguea}} and {{dialogueb}}) where the "
                        "transcripts go (see above) (default: %(default)s)")
    p.add_argument("--both-orders", action="store_true",
                   help="judge every comparison in both A/B orders (LLM judges only; refused with --judge reward)")
    p.add_argument("--judge-max-new-tokens", type=_positive_int, default=256,
                   help="longest judge answer in tokens; judges decode greedily (default: %(default)s)")
    p.add_argument("--env-id", default="UltraInteractDialogue-v0", choices=sorted(refuel_env.ENV_IDS),
                   help="environment id (default: %(default)s)")
    p.add_argument("--env-preset", default=None, choices=sorted(PRESETS),
                   help="environment preset, e.g. paper-setting-one (default: none, the embedded models)")
    p.add_argument("--env-kwargs", type=json_object, default={}, metavar="JSON",
                   help='more environment arguments as JSON, e.g. \'{"user": "instant"}\'; split is always '
                        "'test' and kl_coef 0 while playing (default: {})")
    p.add_argument("--num-prompts", type=_positive_int, default=8,
                   help="held-out prompts, drawn without replacement with --seed (default: %(default)s)")
    p.add_argument("--horizon", type=_positive_int, default=DEFAULT_HORIZON,
                   help="turns H per dialogue, at most the environment's max_turns (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompt draw, the environment, the policies' sampling and the judge's A/B "
                        "orders (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128,
                   help="longest policy response in tokens (the paper used 1024) (default: %(default)s)")
    p.add_argument("--temperature", type=_temperature, default=0.8,
                   help="policy sampling temperature of the judged dialogues; the KL column is at T = 1 whatever "
                        "it is (default: %(default)s)")
    p.add_argument("--max-dialogue-tokens", type=_limit, default=None, metavar="N|none",
                   help="end an evaluation dialogue longer than N tokens (the environment's tokenizer); the "
                        "environment's own max_dialogue_tokens, a training-data filter, is off (default: none)")
    p.add_argument("--no-kl", action="store_true", help="skip the KL(pi || pi_ref) estimate")
    p.add_argument("--device", default=None, help="device of local models (default: cuda if available, else cpu)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where to write the reports (default: runs/eval-<date>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        config_path, argv = split_config_flag(argv)
        if config_path is not None:  # the file's flags first: explicit flags, later on the line, win
            file_argv = config_file_argv(config_path, load_config_file(config_path), parser)
            if "--policy" in argv:  # --policy adds up: explicit ones replace the file's
                file_argv = _without(file_argv, "--policy")
            argv = file_argv + argv
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return parser.parse_args(argv)


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.both_orders and args.judge == "reward":
        raise SystemExit("error: --both-orders needs an LLM judge, but --judge is 'reward': the reward model scores "
                         "each dialogue on its own, so there is no A/B order to swap. Drop --both-orders, or pass "
                         "a model spec to --judge (e.g. openai:gpt-4-0613).")

    def checked(flag: str, value: str, accepted: str) -> None:
        try:
            check_spec(value)
        except SpecError as err:
            raise SystemExit(f"error: {flag} {value!r}: {err}\n{flag} takes {accepted}.") from None

    policies: dict[str, str] = {}
    for text in args.policy:
        try:
            name, spec = split_named_spec(text)
        except SpecError as err:
            raise SystemExit(f"error: --policy {text!r}: {err}") from None
        if name in policies:
            raise SystemExit(f"error: --policy {text!r}: two policies are named {name!r}; name them with NAME=SPEC")
        checked("--policy", spec, f"[NAME=]SPEC, SPEC being {_SPEC_FORMS}")
        policies[name] = spec
    checked("--reference", args.reference, _SPEC_FORMS)
    if args.judge != "reward":
        checked("--judge", args.judge, f"'reward' (the environment's reward model) or {_SPEC_FORMS}")
    judge_template = None
    if args.judge == "reward" and args.judge_template != "auto":
        raise SystemExit(f"error: --judge-template {args.judge_template!r} is an LLM judge's prompt, but --judge is "
                         "'reward': the reward model scores each dialogue and reads no prompt. Drop --judge-template, "
                         "or pass a model spec to --judge (e.g. openai:gpt-4-0613).")
    if args.judge_template != "auto":
        try:
            judge_template = load_judge_template(args.judge_template)
        except ValueError as err:
            raise SystemExit(f"error: --judge-template {args.judge_template!r}: {err}") from None
    try:
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        judge_sampling = SamplingParams(max_new_tokens=args.judge_max_new_tokens, temperature=0.0)
    except GenerationError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        env_kwargs = preset_kwargs(args.env_id, args.env_preset, args.env_kwargs)  # every argument given wins over the preset
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: --env-preset {args.env_preset} with --env-kwargs: {err}") from None
    out_dir = args.output_dir or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    try:
        check_output_dir(out_dir)  # before anything is played
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        results = evaluate_policies(
            policies, args.reference, args.judge, env_id=args.env_id, env_kwargs=env_kwargs,
            num_prompts=args.num_prompts, horizon=args.horizon, seed=args.seed, sampling=sampling,
            both_orders=args.both_orders, judge_template=judge_template, judge_sampling=judge_sampling,
            max_dialogue_tokens=args.max_dialogue_tokens, compute_kl=not args.no_kl, device=args.device,
            progress=not args.quiet,
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
