"""Measure the transformers generation backend: prefix reuse in branch collection, and batching.

    python scripts/benchmark_generation.py                      # both parts, embedded SmolLM2 on CPU (a few minutes)
    python scripts/benchmark_generation.py --only branches --json gen.json   # part 1 only, figures also as JSON
    python scripts/benchmark_generation.py --device cuda --repeats 3 --layouts 4x2 32x2 --batch-sizes 8 32

Part 1, branch collection (REFUEL, algorithm 1): each of ``S`` dialogues has been rolled in to
turn h, a state s_h of about ``--prefix-tokens`` tokens (fixed text here: the roll-in is the same
with and without reuse); from s_h, ``B`` continuations each generate y_h and go on to H
(``--turns`` policy turns, a fixed user question between them). All ``S x B`` requests go to the
policy in one ``chat`` call per turn, once with prefix reuse (s_h prefilled once per dialogue)
and once recomputing every prefix. The table shows the prompt tokens of all calls, how many of
them were prefilled with reuse, both times, their ratio, and whether the texts are the same.
One row per ``--branch-new-tokens`` value: 1 times the prefill alone (the time to the first
token); more shows how decoding, which costs the same either way, dilutes the saving. Layout
``4x2`` is REFUEL's two branches of four dialogues; ``1x8`` is eight continuations of one state.

Part 2, batching: ``N`` different short prompts generated in one ``chat`` call, and one at a
time, prefix reuse off (so that only batching is measured); the table shows both times,
generated tokens per second and the ratio.

Sampling is seeded (temperature ``--temperature``), so both sides generate the same tokens (in
fp32; bf16 rounding can change a sample) and the times compare like with like. With
``--repeats N`` each measurement is taken N times, the two sides alternating, and the fastest is
shown; use it on a GPU, where the first call of each batch shape pays one-off kernel set-up.

The 1-minute load average before and after is printed under the tables and written to the JSON
(``load``), with a warning when it exceeds the torch threads used.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from refuel_agents.machine_load import load_average, load_line, load_record
from refuel_env.generation import SamplingParams, TransformersGenerator, default_device, load_causal_lm
from refuel_env.types import Message

TOPICS = [
    "How do I compute the area of a triangle from its three side lengths?",
    "Why does ice float on water?",
    "Write a Python function that checks whether a string is a palindrome.",
    "What caused the fall of the Western Roman Empire?",
    "How does compound interest work over ten years?",
    "Explain how a hash table handles collisions.",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
]
SENTENCES = [
    "Let us start from the definitions and check each step against a small example.",
    "The key observation is that the quantity we want does not change when we reorder the terms.",
    "A common mistake is to forget the boundary case, so we handle it explicitly first.",
    "With that in place, the rest of the argument is a direct calculation.",
    "We can double-check the result by plugging in numbers we already know the answer for.",
    "Historically, this idea took a long time to be accepted, because the evidence was indirect.",
    "In practice, the simplest method is usually good enough, and it is easier to verify.",
    "If the input is very large, we should think about memory as well as time.",
    "Each of these factors matters, but their relative weight changes with the context.",
    "To summarise, the answer follows from two facts that we established separately.",
]
FOLLOW_UPS = [
    "Can you explain that step in more detail?",
    "What happens in the edge case?",
    "Is there a faster way to do it?",
    "How would I check that the answer is right?",
]
NEXT_QUESTION = "Thanks. Can you give one more example?"
SHORT_PROMPTS = [f"{topic} Answer briefly." for topic in TOPICS] + [f"Give me one fact about the number {n}." for n in range(1, 200)]


def rolled_in_dialogue(index: int, min_tokens: int, generator: TransformersGenerator) -> list[Message]:
    """A dialogue ending with a user turn, of at least ``min_tokens`` tokens, different for each ``index``."""
    messages: list[Message] = [{"role": "user", "content": f"Question {index}: {TOPICS[index % len(TOPICS)]}"}]
    turn = index
    while generator.count_tokens(messages) < min_tokens:
        answer = " ".join(SENTENCES[(turn + j) % len(SENTENCES)] for j in range(3))
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
        turn += 1
    return messages


def continue_branches(
    generator: TransformersGenerator,
    states: Sequence[list[Message]],
    branches: int,
    turns: int,
    params: SamplingParams,
) -> tuple[float, list[str], int, int]:
    """Continue each state ``branches`` times for ``turns`` policy turns.

    Returns (seconds, texts, prompt tokens read, tokens generated).
    """
    dialogues = [list(state) for state in states for _ in range(branches)]
    texts, prompt_tokens, generated = [], 0, 0
    start = time.perf_counter()
    for turn in range(turns):
        seeds = [1000 * turn + i for i in range(len(dialogues))]
        completions = generator.chat(dialogues, params, seeds=seeds)
        texts += [c.text for c in completions]
        prompt_tokens += sum(c.prompt_tokens for c in completions)
        generated += sum(c.completion_tokens for c in completions)
        dialogues = [
            d + [{"role": "assistant", "content": c.text}, {"role": "user", "content": NEXT_QUESTION}]
            for d, c in zip(dialogues, completions)
        ]
    return time.perf_counter() - start, texts, prompt_tokens, generated


def timed_chat(generator: TransformersGenerator, prompts: Sequence[str], params: SamplingParams, batched: bool) -> tuple[float, int]:
    """Generate for ``prompts`` in one call or one at a time: (seconds, tokens generated)."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    seeds = list(range(len(convs)))
    start = time.perf_counter()
    if batched:
        completions = generator.chat(convs, params, seeds=seeds)
    else:
        completions = [generator.chat([c], params, seeds=[s])[0] for c, s in zip(convs, seeds)]
    return time.perf_counter() - start, sum(c.completion_tokens for c in completions)


def fastest(repeats: int, *measurements: Callable[[], tuple]) -> list[tuple]:
    """Run the measurements alternately ``repeats`` times; per measurement the result with the least time (item 0)."""
    results: list[list[tuple]] = [[] for _ in measurements]
    for _ in range(repeats):
        for runs, measure in zip(results, measurements):
            runs.append(measure())
    return [min(runs, key=lambda r: r[0]) for runs in results]


def parse_layout(text: str) -> tuple[int, int]:
    """``"4x2"`` -> (4 dialogues, 2 branches each)."""
    try:
        states, branches = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout must look like 4x2 (dialogues x branches), got {text!r}") from None
    if states < 1 or branches < 1:
        raise argparse.ArgumentTypeError(f"layout needs positive numbers, got {text!r}")
    return states, branches


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header)] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def bench_branches(args: argparse.Namespace, model, tokenizer) -> list[dict]:
    reuse = TransformersGenerator(model, tokenizer, prefix_cache=True, batch_size=args.max_batch)
    recompute = TransformersGenerator(model, tokenizer, prefix_cache=False, batch_size=args.max_batch)
    if not reuse.prefix_cache:
        raise SystemExit(f"{args.model}: this model's cache does not support prefix reuse; nothing to compare")
    rows = []
    for states_n, branches in args.layouts:
        states = [rolled_in_dialogue(i, args.prefix_tokens, reuse) for i in range(states_n)]
        prefix = sum(reuse.count_tokens(s) for s in states) / states_n
        for new_tokens in args.branch_new_tokens:
            params = SamplingParams(max_new_tokens=new_tokens, temperature=args.temperature)
            reused_before = reuse.prefix_tokens_reused
            (t_plain, texts_plain, prompt_tokens, generated), (t_reuse, texts_reuse, _, _) = fastest(
                args.repeats,
                partial(continue_branches, recompute, states, branches, args.turns, params),
                partial(continue_branches, reuse, states, branches, args.turns, params),
            )
            prefilled = prompt_tokens - (reuse.prefix_tokens_reused - reused_before) // args.repeats
            rows.append([f"{states_n}x{branches}", states_n * branches, round(prefix), args.turns, new_tokens,
                         prompt_tokens, prefilled, generated, t_plain, t_reuse, t_plain / t_reuse,
                         "yes" if texts_plain == texts_reuse else "NO"])
    header = ["dialogues x branches", "batch", "s_h tok", "turns", "max new", "prompt tok", "prefilled w/ reuse",
              "gen tok", "recompute s", "reuse s", "speed-up", "same text"]
    print_table("Part 1: branch collection, recomputing every prefix vs prefix reuse", header, rows)
    return [dict(zip(header, row)) for row in rows]


def bench_batching(args: argparse.Namespace, model, tokenizer) -> list[dict]:
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)
    generator = TransformersGenerator(model, tokenizer, prefix_cache=False, batch_size=args.max_batch)
    rows = []
    for n in args.batch_sizes:
        prompts = SHORT_PROMPTS[:n]
        (t_single, generated), (t_batch, _) = fastest(
            args.repeats,
            partial(timed_chat, generator, prompts, params, batched=False),
            partial(timed_chat, generator, prompts, params, batched=True),
        )
        rows.append([n, generated, t_single, generated / t_single, t_batch, generated / t_batch, t_single / t_batch])
    header = ["requests", "gen tok", "one-by-one s", "one-by-one tok/s", "batched s", "batched tok/s", "speed-up"]
    print_table(f"Part 2: one request at a time vs one batched call ({args.new_tokens} new tokens per request)",
                header, rows)
    return [dict(zip(header, row)) for row in rows]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct) or a local checkpoint path (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--only", "--parts", dest="parts", nargs="+", choices=["branches", "batching"],
                   default=["branches", "batching"], help="what to measure (default: both)")
    p.add_argument("--json", type=Path, default=None, help="also write the measured figures here, as JSON")
    p.add_argument("--layouts", nargs="+", type=parse_layout, default=[(4, 2), (1, 8)],
                   help="part 1: dialogues x branches per call (default: 4x2 1x8)")
    p.add_argument("--prefix-tokens", type=int, default=400, help="part 1: tokens of each rolled-in state s_h, at least (default: %(default)s)")
    p.add_argument("--turns", type=int, default=2, help="part 1: policy turns from h to H (default: %(default)s)")
    p.add_argument("--branch-new-tokens", type=int, nargs="+", default=[1, 32],
                   help="part 1: max new tokens per turn, one row each; 1 times the prefill, up to the first token (default: 1 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help=f"part 2: requests per run, at most {len(SHORT_PROMPTS)} (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="part 2: max new tokens per response (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="seeded sampling temperature (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="take each measurement this many times, keep the fastest (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64, help="the generator's batch size (default: %(default)s)")
    args = p.parse_args()
    if max(args.batch_sizes) > len(SHORT_PROMPTS):
        p.error(f"--batch-sizes: at most {len(SHORT_PROMPTS)} prompts are available")
    return args


def measure(args: argparse.Namespace) -> dict:
    """Load the model and run the parts ``--only`` selects; their figures by part."""
    device = args.device or default_device()
    if args.model == "embedded":
        from refuel_env.embedded import smollm2_path

        args.model = str(smollm2_path())
    model, tokenizer = load_causal_lm(args.model, device, args.dtype)
    print(f"model {args.model} on {device}, {next(model.parameters()).dtype}, {torch.get_num_threads()} CPU threads")
    warm_up = SamplingParams(max_new_tokens=4, temperature=args.temperature)
    TransformersGenerator(model, tokenizer).chat([[{"role": "user", "content": "Hi"}]], warm_up, seeds=[0])
    results = {}
    if "branches" in args.parts:
        results["branches"] = bench_branches(args, model, tokenizer)
    if "batching" in args.parts:
        results["batching"] = bench_batching(args, model, tokenizer)
    return results


def main() -> None:
    args = parse_args()
    before = load_average()
    results = measure(args)
    results["load"] = load_record(before, cores=torch.get_num_threads())
    print("\n" + load_line(results["load"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
