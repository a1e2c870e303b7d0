"""Measure REFUEL on the embedded default: collection speed, training speed and memory, one
training step against TRL's ``DPOTrainer`` on the same model and the same pairs, and the
shared-prefix layout of the training batch against the unshared one.

    python scripts/benchmark_refuel.py                      # all five parts
    python scripts/benchmark_refuel.py --threads 2          # on an idle machine: two torch threads per process
    python scripts/benchmark_refuel.py --skip-collection --pairs synthetic --state-tokens 256 --response-tokens 64
    python scripts/benchmark_refuel.py --prompts 32 --batch-pairs 8 --repeats 5 --skip-dpo
    python scripts/benchmark_refuel.py --only shared-prefix --json shared_prefix.json   # part 5 alone

Everything runs on the CPU in fp32, with the embedded SmolLM2-135M-Instruct as the policy (and,
in the environment, as the simulated user) or, with ``--model``, a local checkpoint. Each
measurement runs in a fresh process of its own (``spawn``), so that no configuration inherits
another's memory; the parent only starts them and prints the tables (Markdown).

1. Collection: ``collect_refuel_tuples`` on ``UltraInteractDialogue-v0`` (the policy and the
   user write at most ``--max-new-tokens`` / ``--user-max-new-tokens`` tokens per turn, H is
   drawn from U{1..max_turns}, h from U{1..H}; the environment's embedded reward model scores
   each branch). An untimed warm-up collection of ``--warmup-prompts`` prompts comes first.
   The timed collection then runs twice in the same process, on the same prompts and seeds:
   with the transformers backend's KV kept between calls (the default, policy and simulated
   user alike) and without it (``kv_cache_bytes=0`` for both), each from empty stores; the
   collected texts must be the same. Reported per run: tuples per CPU second (one torch thread:
   the work done, whatever else runs), wall and CPU time, the CPU time inside the policy's and
   the user's ``chat`` (and of it, the decoder's prefill and decode forward passes), the rest
   (environment, reward model), and how many prompt tokens came from the store; then the
   speedup.
2. Training: REFUEL updates through ``RefuelTrainer.train_step`` and ``TrainEngine.step``: one
   forward of the y and y' of ``--batch-pairs`` pairs together (the default shared-prefix layout), eq. 1's loss,
   backward, clipping and one AdamW step (no gradient accumulation). The same batch is used
   for every step: ``--warmup-steps`` untimed, then ``--repeats`` timed; the median is
   reported. The log-probs of pi_t, computed once per iteration before the updates
   (``RefuelTrainer.prepare``, no gradient), are timed separately.
3. Memory: the peak resident set (``VmHWM`` of ``/proc/self/status``, reset through
   ``/proc/self/clear_refs`` once the model and optimizer are set up, so that it covers the
   training steps, with the weights, gradients and AdamW state that they hold) with and
   without gradient checkpointing, on the same batch.
4. REFUEL against TRL's ``DPOTrainer`` (sigmoid loss, its reference model loaded from the same
   checkpoint, fp32, no gradient checkpointing, no precomputed reference log-probs, the same
   optimizer settings) on the same pairs, as prompt / chosen (y) / rejected (y') in
   conversational form, one optimizer step per batch of the same size. Its step is timed from
   ``on_step_begin`` to ``on_step_end``: forward of chosen and rejected, the reference model's
   forward, backward, clipping, optimizer step (the data loading before it is excluded). The
   design difference: DPO runs a reference forward in every step and keeps the reference
   weights in memory; REFUEL reads log pi_t from the tuples, computed once per iteration by
   the model itself.

5. Shared prefix: REFUEL optimizer steps (``train_step`` and ``TrainEngine.step``, as in part 2)
   with ``shared_prefix`` on (each tuple's state runs once, in one packed row s_h, y, y') and off
   (two sequences s_h + y and s_h + y' per tuple), alternating in one process on the same
   ``--batch-pairs`` synthetic pairs of ``--shared-state-tokens`` (400) state and
   ``--shared-response-tokens`` (64) response tokens. Reported: the median CPU time per step of
   each, their ratio (the speedup), and max |g_shared - g_unshared| / max |g_unshared| over all
   parameters, measured on one micro-batch before any update; then TRL's ``DPOTrainer`` (part 4's
   worker, in a fresh process) on the same pairs, unless ``--skip-dpo``.

``--only SECTION`` runs one part (collection, training, memory, dpo or shared-prefix; training,
memory and dpo each run part 2's REFUEL steps as their baseline, and need ``--pairs synthetic``).
``--json PATH`` also writes every figure measured to PATH, one key per part run
(``collection``, ``training``, ``shared_prefix``); ``shared_prefix`` holds ``speedup``,
``max_grad_rel_diff``, ``state_tokens``, ``response_tokens``, the step times and ``dpo``.

Times are given as wall time and as the process's CPU time (``time.process_time``). With one
torch thread (the default) the CPU time is the work done, whatever else runs on the machine;
the wall time also counts the waits for a core, so compare wall times only at similar load
(the 1-minute load average before and after each measurement is printed beside it; the whole run's
is printed at the end and written to the JSON as ``load``, with a warning when it exceeds
``--threads``). The
column "weights+grads+AdamW(+ref)" is computed from the parameter count (4 copies of the
weights, plus the reference model's for DPO), for comparison with the measured peak.

Pairs (``--pairs``): ``collected``, the first ``--batch-pairs`` tuples of part 1, or
``synthetic``, pairs of exactly ``--state-tokens`` state tokens and ``--response-tokens``
response tokens each (the end-of-turn token included), of random words.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refuel_agents.machine_load import load_average, load_line, load_record  # noqa: E402 (after the path)

GIB = 2**30
SECTIONS = {
    "collection": "part 1",
    "training": "part 2, REFUEL steps",
    "memory": "part 3, REFUEL steps with and without gradient checkpointing",
    "dpo": "part 4, REFUEL and TRL's DPOTrainer steps",
    "shared-prefix": "part 5, REFUEL steps with shared_prefix on and off, and DPOTrainer's, on the same pairs",
}


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """What every worker needs; picklable, so it crosses into the spawned processes."""

    model: str
    threads: int
    seed: int
    max_turns: int
    user_max_new_tokens: int
    max_new_tokens: int
    warmup_steps: int
    repeats: int

    @property
    def env_kwargs(self) -> dict[str, Any]:
        return {"max_turns": self.max_turns, "user_max_new_tokens": self.user_max_new_tokens}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded",
                   help="policy: 'embedded' (SmolLM2-135M-Instruct) or a local transformers checkpoint (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default: %(default)s). On a shared 2-core machine two threads "
                        "wait on each other whenever another process holds a core (measured here while other jobs ran: "
                        "8 prompts collected in 16 s with one thread, not done after 10 minutes with two); use 2 on "
                        "an idle machine")
    p.add_argument("--seed", type=int, default=1, help="seed of the collection and of the synthetic pairs (default: %(default)s)")
    g = p.add_argument_group("part 1, collection")
    g.add_argument("--prompts", type=int, default=8, help="prompts (= tuples) in the timed collection (default: %(default)s)")
    g.add_argument("--warmup-prompts", type=int, default=2,
                   help="prompts of the untimed warm-up collection before it (default: %(default)s)")
    g.add_argument("--max-turns", type=int, default=3, help="largest dialogue length H (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="longest policy response, in tokens (default: %(default)s)")
    g.add_argument("--user-max-new-tokens", type=int, default=32,
                   help="longest simulated-user turn, in tokens (default: %(default)s)")
    g.add_argument("--skip-collection", action="store_true", help="skip part 1 (needs --pairs synthetic)")
    g = p.add_argument_group("parts 2 to 4, training")
    g.add_argument("--pairs", choices=("collected", "synthetic"), default="collected",
                   help="the training batch: the first --batch-pairs collected tuples, or synthetic pairs of fixed "
                        "length (default: %(default)s)")
    g.add_argument("--state-tokens", type=int, default=256, help="state s_h length of a synthetic pair (default: %(default)s)")
    g.add_argument("--response-tokens", type=int, default=64,
                   help="length of each synthetic response, its end-of-turn token included (default: %(default)s)")
    g.add_argument("--batch-pairs", type=int, default=4,
                   help="pairs per optimizer step, so 2x as many sequences per forward (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=1, help="untimed training steps first (default: %(default)s)")
    g.add_argument("--repeats", type=int, default=3, help="timed training steps; the median is reported (default: %(default)s)")
    g.add_argument("--skip-dpo", action="store_true", help="skip part 4 (TRL's DPOTrainer)")
    g = p.add_argument_group("part 5, shared prefix")
    g.add_argument("--shared-state-tokens", type=int, default=400,
                   help="state s_h length of the synthetic pairs of part 5 (default: %(default)s)")
    g.add_argument("--shared-response-tokens", type=int, default=64,
                   help="length of each response of part 5's pairs, end-of-turn token included (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--only", choices=SECTIONS, default=None,
                   help="run one part: " + "; ".join(f"{k}: {v}" for k, v in SECTIONS.items()) + " (default: all)")
    g.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write every figure measured in the run to PATH as JSON, one key per part run")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ("threads", "prompts", "max_turns", "max_new_tokens", "user_max_new_tokens", "batch_pairs", "repeats",
                "state_tokens", "response_tokens", "shared_state_tokens", "shared_response_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_prompts", "warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("response_tokens", "shared_response_tokens"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')} must be >= 2: at least one word and the end-of-turn token")
    if args.skip_collection and args.pairs == "collected" and args.only in (None, "training", "memory", "dpo"):
        parser.error("--skip-collection leaves no collected pairs to train on: add --pairs synthetic")
    if args.only in ("training", "memory", "dpo") and args.pairs == "collected":
        parser.error(f"--only {args.only} runs no collection, so it has no collected pairs: add --pairs synthetic")
    if args.only == "collection" and args.skip_collection:
        parser.error("--only collection and --skip-collection leave nothing to run")
    if args.only == "dpo" and args.skip_dpo:
        parser.error("--only dpo and --skip-dpo leave nothing to run")
    if args.pairs == "collected" and args.prompts < args.batch_pairs:
        parser.error(f"--prompts ({args.prompts}) must be >= --batch-pairs ({args.batch_pairs}) to fill a batch "
                     "with collected tuples")


# ------------------------------------------------------------------------------ process helpers


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")
    return int(match.group(1))


def reset_peak_rss() -> None:
    """Reset this process's peak resident set (VmHWM) to its current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's peak resident set since the last reset, in bytes."""
    return _status_kib("VmHWM") * 1024


def _init_worker(threads: int) -> None:
    """Fresh process: fixed thread count, no Hub access (nothing may be downloaded), no progress bars."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                      TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed, imported by TRL, warns when it has to guess
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside transformers and TRL
    import datasets
    import torch
    import transformers

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def in_fresh_process(fn: Callable[..., dict], *args: Any, threads: int) -> dict:
    """Run ``fn(*args)`` in a new spawned process (a clean peak-memory counter) and return its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        return pool.submit(fn, *args).result()


def model_path(model: str) -> str:
    from refuel_env import embedded

    return str(embedded.smollm2_path()) if model == "embedded" else model


# ------------------------------------------------------------------------------ part 1: collection


def _refuel_trainer(settings: Settings, output_dir: str, **overrides: Any) -> Any:
    from refuel_agents.refuel import RefuelConfig, RefuelTrainer

    config = RefuelConfig(policy_model=settings.model, env_kwargs=settings.env_kwargs, max_new_tokens=settings.max_new_tokens,
                          reference_kl=False, eval_prompts=0, progress=False, device="cpu", seed=settings.seed,
                          output_dir=output_dir, run_name="benchmark", **overrides)
    return RefuelTrainer(config)


class ChatTimer:
    """Counts a generator's ``chat`` calls: CPU seconds inside them and, of those, in the decoder's
    forward passes over several positions (prefill) and over one (decode); prompt and sampled tokens."""

    def __init__(self, generator: Any):
        self.generator, self.chat = generator, generator.chat
        self.cpu_seconds, self.prompt_tokens, self.sampled_tokens = 0.0, 0, 0
        self.forward = {"prefill": 0.0, "decode": 0.0}
        self._phase, self._start = "prefill", 0.0
        generator.chat = self  # on this instance only; removed by restore()
        base = generator.model.base_model
        self._hooks = [base.register_forward_pre_hook(self._before, with_kwargs=True),
                       base.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        self._phase, self._start = ("prefill" if positions > 1 else "decode"), time.process_time()

    def _after(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        self.forward[self._phase] += time.process_time() - self._start

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        out = self.chat(*args, **kwargs)
        self.cpu_seconds += time.process_time() - start
        self.prompt_tokens += sum(c.prompt_tokens for c in out)
        self.sampled_tokens += sum(len(c.token_ids or ()) for c in out)
        return out

    def restore(self) -> None:
        del self.generator.chat
        for hook in self._hooks:
            hook.remove()


def _timed_collection(settings: Settings, prompts: int, env_id: str, env_kwargs: dict, policy: Any, user: Any,
                      sampling: Any) -> dict:
    """One timed ``collect_refuel_tuples`` from empty KV stores, with CPU time split by generator."""
    from refuel_agents.collection import collect_refuel_tuples

    timers = {"policy": ChatTimer(policy), "user": ChatTimer(user)}
    reused = {name: (t.generator.kv_tokens_reused, t.generator.prefix_tokens_reused) for name, t in timers.items()}
    for t in timers.values():
        t.generator.clear_kv_cache()
    load_before, start, cpu_start = load_average(), time.perf_counter(), time.process_time()
    rows, stats = collect_refuel_tuples(num_prompts=prompts, seed=settings.seed, env_id=env_id, env_kwargs=env_kwargs,
                                        policy=policy, sampling=sampling, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    profile = {}
    for name, t in timers.items():
        t.restore()
        profile[name] = {"cpu_seconds": t.cpu_seconds, "prefill_cpu_seconds": t.forward["prefill"],
                         "decode_cpu_seconds": t.forward["decode"], "prompt_tokens": t.prompt_tokens,
                         "sampled_tokens": t.sampled_tokens,
                         "kv_tokens_reused": t.generator.kv_tokens_reused - reused[name][0],
                         "prefix_tokens_reused": t.generator.prefix_tokens_reused - reused[name][1]}
    keep = ("state", "response", "response_prime", "reward", "reward_prime")
    return {"rows": [{k: r[k] for k in keep} for r in rows], "stats": stats.as_dict(), "seconds": seconds,
            "cpu_seconds": cpu_seconds, "load": (load_before, load_average()), "profile": profile}


def collect_worker(settings: Settings, prompts: int, warmup_prompts: int) -> dict:
    """Part 1: an untimed warm-up collection, then the same timed collection twice: with the
    transformers backend's KV kept between calls (the default, for the policy and the simulated
    user) and without (``kv_cache_bytes=0`` for both); each from empty stores, same prompts and seeds."""
    import gymnasium as gym

    from refuel_agents.collection import collect_refuel_tuples
    from refuel_env.generation import TransformersGenerator

    with tempfile.TemporaryDirectory() as tmp:
        trainer = _refuel_trainer(settings, tmp)
        env_id, env_kwargs, policy = trainer.config.env_id, trainer.env_kwargs, trainer.generator
        env = gym.make(env_id, **env_kwargs)
        user = env.unwrapped.core.user  # its generator is the one every environment of this process shares
        env.close()
        if policy.kv_store is None or user.generator.kv_store is None:
            raise RuntimeError("the default policy and user generators should keep KV between calls")
        plain_policy = TransformersGenerator(policy.model, policy.tokenizer, name=policy.name, kv_cache_bytes=0)
        plain_user = TransformersGenerator(user.generator.model, user.generator.tokenizer, name=user.generator.name,
                                           kv_cache_bytes=0)
        # The same user, its generator passed in: the prompt style that the default resolves to, stated.
        plain_kwargs = {**env_kwargs, "user_model": plain_user, "user_prompt_style": user.style,
                        "user_max_new_tokens": user.sampling.max_new_tokens}
        if warmup_prompts:
            collect_refuel_tuples(num_prompts=warmup_prompts, seed=settings.seed + 10_000, env_id=env_id,
                                  env_kwargs=env_kwargs, policy=policy, sampling=trainer.sampling, progress=False)
        baseline = _timed_collection(settings, prompts, env_id, plain_kwargs, plain_policy, plain_user, trainer.sampling)
        result = _timed_collection(settings, prompts, env_id, env_kwargs, policy, user.generator, trainer.sampling)
    texts = ("state", "response", "response_prime")
    result["baseline"] = baseline
    result["identical"] = [[r[k] for k in texts] for r in result["rows"]] == [[r[k] for k in texts]
                                                                                for r in baseline["rows"]]
    result["tuples_per_s"] = result["stats"]["tuples"] / result["cpu_seconds"]
    result["baseline_tuples_per_s"] = baseline["stats"]["tuples"] / baseline["cpu_seconds"]
    result["speedup"] = result["tuples_per_s"] / result["baseline_tuples_per_s"]
    return result


# ------------------------------------------------------------------------------ synthetic pairs


def _single_token_words(tokenizer: Any) -> list[str]:
    """Lower-case words that the tokenizer encodes as one token after a space (and alone)."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        word = tokenizer.convert_tokens_to_string([token])
        if word.startswith(" ") and word[1:].isalpha() and word[1:].islower() and len(word) > 4:
            if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word[1:])
    if len(words) < 100:
        raise RuntimeError(f"the tokenizer has only {len(words)} single-token words; use --pairs collected")
    return words


def _text_of_tokens(tokenizer: Any, encode: Callable[[str], int], target: int, words: list[str], rng: Any) -> str:
    """A text of random words whose ``encode`` length is exactly ``target`` tokens."""
    pool = rng.choice(words, size=target + 8).tolist()
    count = target
    for _ in range(8):
        text = " ".join(pool[:count])
        length = encode(text)
        if length == target:
            return text
        count += target - length
        if not 1 <= count <= len(pool):
            break
    raise RuntimeError(f"could not build a text of exactly {target} tokens with this tokenizer; use --pairs collected")


def synthetic_pairs(model: str, n: int, state_tokens: int, response_tokens: int, seed: int) -> list[dict]:
    """``n`` pairs whose state is ``state_tokens`` tokens and each response ``response_tokens``
    (end-of-turn included) under the model's chat template; rewards uniform in [0, 1)."""
    import numpy as np
    from transformers import AutoTokenizer

    from refuel_agents.logprobs import encode_response

    tokenizer = AutoTokenizer.from_pretrained(model_path(model))
    words = _single_token_words(tokenizer)
    rng = np.random.default_rng(seed)
    probe = encode_response(tokenizer, [{"role": "user", "content": "word"}], "word")
    overhead = len(probe.input_ids) - probe.num_response_tokens - 1  # template tokens around the user's text
    if state_tokens <= overhead:
        raise ValueError(f"--state-tokens must exceed the chat template's {overhead} tokens around a user turn")
    rows = []
    for _ in range(n):
        state_text = _text_of_tokens(
            tokenizer, lambda t: len(encode_response(tokenizer, [{"role": "user", "content": t}], "word").input_ids)
            - probe.num_response_tokens, state_tokens, words, rng)
        state = [{"role": "user", "content": state_text}]

        def response_length(text: str, state: list[dict] = state) -> int:
            return encode_response(tokenizer, state, text).num_response_tokens

        responses = [_text_of_tokens(tokenizer, response_length, response_tokens, words, rng) for _ in range(2)]
        rows.append({"state": state, "response": responses[0], "response_prime": responses[1],
                     "reward": float(rng.random()), "reward_prime": float(rng.random())})
    return rows


# ------------------------------------------------------------------------------ parts 2 and 3: REFUEL steps


def refuel_worker(settings: Settings, pairs: list[dict], gradient_checkpointing: bool) -> dict:
    """Parts 2 and 3: pi_t log-probs once, then warm-up and timed REFUEL updates on one batch."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _refuel_trainer(settings, tmp, prompts_per_iteration=len(pairs), iterations=1,
                                  batch_size=len(pairs), micro_batch_size=len(pairs),
                                  gradient_checkpointing=gradient_checkpointing, max_seq_len=1 << 20)
        start = time.perf_counter()
        rows, _ = trainer.prepare(pairs)
        prepare_seconds = time.perf_counter() - start
        trainer.setup()  # the TrainEngine: AdamW, schedule, checkpointing switch
        reset_peak_rss()
        load_before, times, cpu_times, tokens = load_average(), [], [], 0
        for _ in range(settings.warmup_steps + settings.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = trainer.train_step(rows)
            if trainer.engine.step() is None:
                raise RuntimeError("the engine did not update the weights after one micro-batch of a full batch")
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            tokens = metrics["tokens"]
        peak = peak_rss()
    return {"step_seconds": times[settings.warmup_steps:], "step_cpu_seconds": cpu_times[settings.warmup_steps:],
            "prepare_seconds": prepare_seconds, "peak": peak, "tokens": tokens, "load": (load_before, load_average()),
            "model_state": model_state_bytes(trainer.model, reference=None)}


def model_state_bytes(model: Any, reference: Any) -> int:
    """Bytes of the weights, their gradients and AdamW's two moments, plus a reference model's weights."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = sum(p.numel() * p.element_size() for p in reference.parameters()) if reference is not None else 0
    return 4 * params + ref


# ------------------------------------------------------------------------------ part 5: shared prefix


def _gradients(model: Any) -> dict[str, Any]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def shared_prefix_worker(settings: Settings, pairs: list[dict]) -> dict:
    """Part 5: REFUEL updates with shared_prefix on and off, alternating, in one process on one batch.

    pi_t is scored in each layout (so the log-ratio is exactly 0 in both, as in a run with either setting);
    then, before any update, the gradient of one micro-batch in each layout (the same weights); then
    ``warmup_steps`` untimed and ``repeats`` timed optimizer steps per layout, alternating the layouts so
    that both meet the same load.
    """
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _refuel_trainer(settings, tmp, prompts_per_iteration=len(pairs), iterations=1,
                                  batch_size=len(pairs), micro_batch_size=len(pairs), max_seq_len=1 << 20)
        rows = {}
        for shared in (True, False):  # pi_t scored in each layout, as a run with that setting scores it
            trainer.config.shared_prefix = shared
            rows[shared] = trainer.prepare(pairs)[0]
        trainer.setup()
        grads, tokens = {}, {}
        for shared in (True, False):
            trainer.config.shared_prefix = shared
            trainer.engine.model.zero_grad(set_to_none=True)
            tokens[shared] = trainer.train_step(rows[shared])["tokens"]
            grads[shared] = _gradients(trainer.model)
        trainer.engine.model.zero_grad(set_to_none=True)
        largest = max(float(g.abs().max()) for g in grads[False].values())
        difference = max(float((grads[True][k] - grads[False][k]).abs().max()) for k in grads[False])
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu_times: dict[bool, list[float]] = {True: [], False: []}
        load_before = load_average()
        for repeat in range(settings.warmup_steps + settings.repeats):
            for shared in (True, False):
                trainer.config.shared_prefix = shared
                start, cpu_start = time.perf_counter(), time.process_time()
                trainer.train_step(rows[shared])
                if trainer.engine.step() is None:
                    raise RuntimeError("the engine did not update the weights after one micro-batch of a full batch")
                if repeat >= settings.warmup_steps:
                    times[shared].append(time.perf_counter() - start)
                    cpu_times[shared].append(time.process_time() - cpu_start)
    return {"max_grad_rel_diff": difference / largest, "max_abs_grad": largest, "tokens": tokens,
            "step_seconds": times, "step_cpu_seconds": cpu_times, "load": (load_before, load_average())}


def shared_prefix_figures(result: dict, dpo: dict | None, state_tokens: int, response_tokens: int,
                          pairs: int) -> dict:
    """Part 5's figures, as the JSON report holds them."""
    cpu_on, cpu_off = median(result["step_cpu_seconds"][True]), median(result["step_cpu_seconds"][False])
    out = {"speedup": cpu_off / cpu_on, "max_grad_rel_diff": result["max_grad_rel_diff"], "state_tokens": state_tokens,
           "response_tokens": response_tokens, "pairs_per_step": pairs,
           "shared_cpu_seconds": result["step_cpu_seconds"][True], "unshared_cpu_seconds": result["step_cpu_seconds"][False],
           "shared_seconds": result["step_seconds"][True], "unshared_seconds": result["step_seconds"][False],
           "shared_cpu_seconds_median": cpu_on, "unshared_cpu_seconds_median": cpu_off,
           "wall_speedup": median(result["step_seconds"][False]) / median(result["step_seconds"][True]),
           "shared_tokens": result["tokens"][True], "unshared_tokens": result["tokens"][False], "load": result["load"]}
    if dpo is not None:
        out["dpo"] = {"cpu_seconds": dpo["step_cpu_seconds"], "seconds": dpo["step_seconds"],
                      "cpu_seconds_median": median(dpo["step_cpu_seconds"]), "tokens": dpo["tokens"],
                      "cpu_x_shared": median(dpo["step_cpu_seconds"]) / cpu_on, "load": dpo["load"]}
    return out


def shared_prefix_table(figures: dict) -> str:
    rows = [["REFUEL, shared_prefix on", seconds_cell(figures["shared_cpu_seconds"]),
             seconds_cell(figures["shared_seconds"]), str(figures["shared_tokens"]), "1.00"],
            ["REFUEL, shared_prefix off", seconds_cell(figures["unshared_cpu_seconds"]),
             seconds_cell(figures["unshared_seconds"]), str(figures["unshared_tokens"]), f"{figures['speedup']:.2f}"]]
    if "dpo" in figures:
        dpo = figures["dpo"]
        rows.append(["TRL DPOTrainer", seconds_cell(dpo["cpu_seconds"]), seconds_cell(dpo["seconds"]),
                     str(dpo["tokens"]), f"{dpo['cpu_x_shared']:.2f}"])
    return markdown_table(["configuration", "CPU s/step", "wall s/step", "tokens per policy forward",
                           "CPU x shared"], rows)


# ------------------------------------------------------------------------------ part 4: TRL DPO steps


def dpo_worker(settings: Settings, pairs: list[dict]) -> dict:
    """Part 4: TRL's DPOTrainer on the same pairs (y chosen, y' rejected); steps timed by a callback."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from refuel_agents.refuel import RefuelConfig

    defaults = RefuelConfig()
    marks: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        """Wall time from on_step_begin to on_step_end of every optimizer step; the peak reset at the start."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self._start = self._cpu_start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak_rss()
            marks["load_before"] = load_average()

        def on_step_begin(self, args, state, control, **kwargs):
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    path = model_path(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = Dataset.from_list([
        {"prompt": p["state"], "chosen": [{"role": "assistant", "content": p["response"]}],
         "rejected": [{"role": "assistant", "content": p["response_prime"]}]} for p in pairs])
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
            max_steps=settings.warmup_steps + settings.repeats, learning_rate=defaults.lr,
            adam_beta1=defaults.betas[0], adam_beta2=defaults.betas[1], adam_epsilon=defaults.eps,
            weight_decay=defaults.weight_decay, max_grad_norm=defaults.max_grad_norm, lr_scheduler_type="constant",
            activation_checkpointing=False, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, max_length=None, dataloader_num_workers=0, seed=settings.seed,
        )
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics into the tables
        trainer.train()
        peak = peak_rss()
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    if len(timer.times) != settings.warmup_steps + settings.repeats:
        raise RuntimeError(f"DPOTrainer ran {len(timer.times)} steps, expected {settings.warmup_steps + settings.repeats}")
    return {"step_seconds": timer.times[settings.warmup_steps:], "step_cpu_seconds": timer.cpu_times[settings.warmup_steps:],
            "peak": peak, "tokens": tokens,
            "load": (marks["load_before"], load_average()), "optim": str(config.optim.value),
            "model_state": model_state_bytes(trainer.model, trainer.ref_model)}


# ------------------------------------------------------------------------------ report


def median(values: list[float]) -> float:
    return statistics.median(values)


def seconds_cell(values: list[float]) -> str:
    """The median, with the range when there are several values."""
    return f"{median(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def load_cell(load: tuple[float, float]) -> str:
    return f"{load[0]:.1f} / {load[1]:.1f}"


def measured_loads(figures: Any) -> list[tuple[float, float]]:
    """Every (before, after) load pair that the measurements in ``figures`` recorded."""
    if isinstance(figures, dict):
        pairs = [tuple(v) for k, v in figures.items() if k == "load" and isinstance(v, tuple | list) and len(v) == 2]
        return pairs + [p for k, v in figures.items() if k != "load" for p in measured_loads(v)]
    if isinstance(figures, list):
        return [p for v in figures for p in measured_loads(v)]
    return []


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def collection_table(result: dict) -> str:
    """Part 1: the collection with KV kept between calls and without, side by side; tuples per CPU second."""
    rows = []
    for label, r in (("KV kept between calls (default)", result), ("kv_cache_bytes=0", result["baseline"])):
        stats, seconds, cpu = r["stats"], r["seconds"], r["cpu_seconds"]
        policy, user = r["profile"]["policy"], r["profile"]["user"]
        other = cpu - policy["cpu_seconds"] - user["cpu_seconds"]
        rows.append([label, str(stats["prompts"]), str(stats["tuples"]), str(stats["dropped_truncated"]),
                     str(stats["policy_responses"]), f"{seconds:.1f}", f"{cpu:.1f}", f"{stats['tuples'] / cpu:.3f}",
                     f"{policy['cpu_seconds']:.1f} / {user['cpu_seconds']:.1f} / {other:.1f}",
                     f"{policy['prefill_cpu_seconds']:.1f} + {policy['decode_cpu_seconds']:.1f}",
                     f"{user['prefill_cpu_seconds']:.1f} + {user['decode_cpu_seconds']:.1f}",
                     f"{policy['kv_tokens_reused']}/{policy['prompt_tokens']}",
                     f"{user['kv_tokens_reused']}/{user['prompt_tokens']}",
                     f"{policy['sampled_tokens']} / {user['sampled_tokens']}", load_cell(r["load"])])
    table = markdown_table(["configuration", "prompts", "tuples", "dropped", "policy responses", "wall s", "CPU s",
                            "tuples per CPU s", "CPU s in policy / user / rest", "policy prefill + decode CPU s",
                            "user prefill + decode CPU s", "policy prompt tokens from store",
                            "user prompt tokens from store", "sampled tokens policy / user", "load before / after"],
                           rows)
    return (f"{table}\nspeedup (tuples per CPU second, one torch thread): {result['speedup']:.2f}x "
            f"({result['tuples_per_s']:.3f} vs {result['baseline_tuples_per_s']:.3f}); collected texts (states, "
            f"responses) identical in both: {'yes' if result['identical'] else 'NO'}")


def training_table(results: dict[str, dict], batch_pairs: int) -> str:
    """Parts 2 to 4 side by side: time per optimizer step and peak memory, each with its ratio to REFUEL."""
    base = results["REFUEL"]
    base_wall, base_cpu, base_peak = median(base["step_seconds"]), median(base["step_cpu_seconds"]), base["peak"]
    rows = []
    for label, r in results.items():
        wall, cpu = median(r["step_seconds"]), median(r["step_cpu_seconds"])
        rows.append([label, seconds_cell(r["step_seconds"]), seconds_cell(r["step_cpu_seconds"]),
                     f"{batch_pairs / wall:.3f}", f"{wall / base_wall:.2f}", f"{cpu / base_cpu:.2f}",
                     f"{r['peak'] / GIB:.2f}", f"{r['peak'] / base_peak:.2f}", f"{r['model_state'] / GIB:.2f}",
                     load_cell(r["load"])])
    with_prepare = base_wall + base["prepare_seconds"]
    rows.append(["REFUEL step + its pairs' pi_t log-probs (one epoch)", f"{with_prepare:.2f}", "-",
                 f"{batch_pairs / with_prepare:.3f}", f"{with_prepare / base_wall:.2f}", "-", "-", "-", "-", "-"])
    return markdown_table(["configuration", "wall s/step", "CPU s/step", "pairs/s", "wall x REFUEL", "CPU x REFUEL",
                           "peak RSS (GiB)", "peak x REFUEL", "weights+grads+AdamW(+ref) (GiB)",
                           "load before / after"], rows)


def pairs_description(args: argparse.Namespace, pairs: list[dict], tokens: int) -> str:
    if args.pairs == "synthetic":
        what = f"synthetic, state {args.state_tokens} + response {args.response_tokens} tokens each"
    else:
        what = f"the first {len(pairs)} collected tuples"
    return f"{len(pairs)} pairs ({what}): {2 * len(pairs)} sequences, {tokens} tokens per REFUEL forward"


def training_part(args: argparse.Namespace, settings: Settings, run: Callable[..., dict], pairs: list[dict],
                  report: dict) -> None:
    """Parts 2 to 4 (those that ``--only`` selects): REFUEL steps, with gradient checkpointing, TRL's DPO."""
    if args.pairs == "synthetic":
        pairs = synthetic_pairs(args.model, args.batch_pairs, args.state_tokens, args.response_tokens, args.seed)
    results = {"REFUEL": run(refuel_worker, settings, pairs, False)}
    if args.only in (None, "memory"):
        results["REFUEL + gradient checkpointing"] = run(refuel_worker, settings, pairs, True)
    if not args.skip_dpo and args.only in (None, "dpo"):
        results["TRL DPOTrainer"] = run(dpo_worker, settings, pairs)
    report["training"] = {"pairs": pairs_description(args, pairs, results["REFUEL"]["tokens"]), "results": results}
    print(f"2.-4. Training steps on {pairs_description(args, pairs, results['REFUEL']['tokens'])}; one optimizer "
          f"step per batch, {args.warmup_steps} warm-up + {args.repeats} timed steps per configuration, each "
          "configuration in a fresh process; peak RSS = VmHWM over the steps (reset after set-up)")
    print(training_table(results, args.batch_pairs))
    print(f"pi_t log-probs of the {len(pairs)} pairs (RefuelTrainer.prepare, once per iteration, no grad): "
          f"{results['REFUEL']['prepare_seconds']:.2f} s")
    if "TRL DPOTrainer" in results:
        dpo = results["TRL DPOTrainer"]
        print(f"DPOTrainer: {dpo['tokens']} tokens per policy forward (REFUEL: {results['REFUEL']['tokens']}; TRL keeps "
              f"what the chat template writes after the end-of-turn token), optimizer {dpo['optim']} (REFUEL: torch "
              "AdamW), a reference model in memory and run forward in every step")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(model=args.model, threads=args.threads, seed=args.seed, max_turns=args.max_turns,
                        user_max_new_tokens=args.user_max_new_tokens, max_new_tokens=args.max_new_tokens,
                        warmup_steps=args.warmup_steps, repeats=args.repeats)
    run = lambda fn, *a: in_fresh_process(fn, *a, threads=args.threads)  # noqa: E731
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if not args.skip_dpo and args.only in (None, "dpo", "shared-prefix"):
        try:
            import trl
        except ImportError as e:
            raise SystemExit("parts 4 and 5 compare with TRL's DPOTrainer, which is not installed: pip install -e '.[dev]' "
                             "(or pip install 'trl>=1.0'), or pass --skip-dpo") from e
        versions += f", trl {trl.__version__}"
    command = " ".join(["python scripts/benchmark_refuel.py", *(sys.argv[1:] if argv is None else argv)])
    before = load_average()
    print(f"command: {command}\n{versions}; fp32 CPU, {args.threads} torch thread(s) per process, "
          f"{os.cpu_count()} CPUs; 1-minute load average {before:.2f}\n", flush=True)

    wants = lambda section: args.only in (None, section)  # noqa: E731
    report: dict[str, Any] = {"command": command, "versions": versions, "threads": args.threads}
    pairs: list[dict] = []
    if not args.skip_collection and wants("collection"):
        collected = run(collect_worker, settings, args.prompts, args.warmup_prompts)
        report["collection"] = {k: v for k, v in collected.items() if k != "rows"}  # every figure, not the texts
        print(f"1. Collection with collect_refuel_tuples: {args.model} policy and user, UltraInteractDialogue-v0, "
              f"max_turns {args.max_turns}, up to {args.max_new_tokens} policy / {args.user_max_new_tokens} user "
              f"tokens per turn, after an untimed warm-up of {args.warmup_prompts} prompts")
        print(collection_table(collected) + "\n", flush=True)
        pairs = collected["rows"][: args.batch_pairs]
        if args.pairs == "collected" and len(pairs) < args.batch_pairs and args.only is None:
            raise SystemExit(f"only {len(collected['rows'])} tuples survived the collection, fewer than --batch-pairs "
                             f"{args.batch_pairs}: raise --prompts or use --pairs synthetic")
    if args.only in (None, "training", "memory", "dpo"):
        training_part(args, settings, run, pairs, report)
    if wants("shared-prefix"):
        shared = synthetic_pairs(args.model, args.batch_pairs, args.shared_state_tokens, args.shared_response_tokens,
                                 args.seed)
        result = run(shared_prefix_worker, settings, shared)
        dpo = None if args.skip_dpo else run(dpo_worker, settings, shared)
        figures = shared_prefix_figures(result, dpo, args.shared_state_tokens, args.shared_response_tokens, len(shared))
        report["shared_prefix"] = figures
        print(f"\n5. Shared prefix: REFUEL optimizer steps (train_step + engine.step) on {len(shared)} synthetic pairs "
              f"of {args.shared_state_tokens} state + {args.shared_response_tokens} response tokens, shared_prefix on "
              f"and off alternating in one process, {args.warmup_steps} warm-up + {args.repeats} timed steps each")
        print(shared_prefix_table(figures))
        print(f"speedup (CPU time, unshared / shared): {figures['speedup']:.2f}x; max |g_shared - g_unshared| / "
              f"max |g_unshared| over all parameters, one step before any update: {figures['max_grad_rel_diff']:.2e}")
    report["load"] = load_record(before, cores=args.threads)
    report["load"]["busy"] |= any(max(pair) > args.threads for pair in measured_loads(report))
    print(f"\n{load_line(report['load'])}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
