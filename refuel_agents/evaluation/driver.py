"""The evaluation driver: play every policy and the reference on the same held-out prompts,
judge them turn by turn, and gather win rates, reward-model score, KL and length
(the protocol is in the docstring of :mod:`refuel_agents.evaluation`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from tqdm import tqdm

from refuel_agents.collection import StepBatcher
from refuel_agents.evaluation.judges import (
    Comparison,
    Judge,
    PairwiseJudge,
    RewardJudge,
    _stable_uniform,
    assistant_turns,
    build_judge,
    load_judge_template,
    template_for_dataset,
    truncate_dialogue,
)
from refuel_agents.evaluation.kl import _local_model, kl_estimate
from refuel_agents.evaluation.specs import load_generator
from refuel_agents.evaluation.stats import length_weights, win_rates
from refuel_env.generation import SamplingParams, TextGenerator
from refuel_env.types import Message

DEFAULT_ENV_ID = "UltraInteractDialogue-v0"
DEFAULT_HORIZON = 5

# ------------------------------------------------------------------------------ the driver


def _json_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | type(None)) else getattr(v, "name", repr(v))
            for k, v in kwargs.items()}


def _response_words(dialogues: Iterable[Sequence[Message]]) -> float:
    counts = [len(m["content"].split()) for d in dialogues for m in d if m["role"] == "assistant"]
    return float(np.mean(counts)) if counts else math.nan


def _rm_score(rows: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    return (float(np.mean(rewards)) if rewards else math.nan, len(rewards))


def play_for_evaluation(
    *,
    env_id: str,
    env_kwargs: Mapping[str, Any],
    policy: TextGenerator,
    sampling: SamplingParams,
    seed: int,
    horizons: Sequence[int],
    prompt_indices: Sequence[int],
) -> list[dict[str, Any]]:
    """Play one dialogue per held-out prompt with ``policy``, batched: one policy call and one
    vector step per turn for all dialogues in flight.

    Unlike :func:`refuel_agents.collection.play_dialogues`, a dialogue the environment truncates
    keeps its messages up to and including the response that ended it, so the turns it reached can
    still be judged; and the policy's sampling seed of each response comes from (``seed``, prompt,
    turn) alone, so a dialogue's samples do not depend on when the other dialogues ended. The
    environment is reset with ``seed`` (dialogue i gets ``seed + i``, as in the collection).

    One row per prompt: ``item_id``, ``H``, ``reward`` (None when truncated, with
    ``truncation_reason``), ``dialogue`` and ``turns_reached`` (its assistant messages).
    """
    n = len(prompt_indices)
    if len(horizons) != n:
        raise ValueError(f"play_for_evaluation: {len(horizons)} horizons for {n} prompts")
    batcher = StepBatcher(env_id, dict(env_kwargs))
    try:
        _, info = batcher.env(n).reset(seed=seed, options={"horizon": [int(h) for h in horizons],
                                                           "index": [int(i) for i in prompt_indices]})
        rows: list[dict[str, Any]] = [{"item_id": str(info["item_id"][i]), "H": int(info["horizon"][i]),
                                       "reward": None, "dialogue": []} for i in range(n)]
        active = [(i, info["snapshot"][i]) for i in range(n)]
        turn = 0
        while active:
            turn += 1
            seeds = [int(_stable_uniform("policy-seed", int(seed), int(prompt_indices[i]), turn) * (2**31 - 1))
                     for i, _ in active]
            replies = [c.text for c in policy.chat([snap.messages for _, snap in active], sampling, seeds=seeds)]
            obs, reward, terminated, truncated, info = batcher.step([snap for _, snap in active],
                                                                    [None] * len(active), replies)
            going_on = []
            for k, (i, _) in enumerate(active):
                if terminated[k] or truncated[k]:
                    rows[i]["dialogue"] = list(obs[k])
                    if terminated[k]:
                        rows[i]["reward"] = float(reward[k])
                    else:
                        rows[i]["truncation_reason"] = str(info["truncation_reason"][k])
                else:
                    going_on.append((i, info["snapshot"][k]))
            active = going_on
    finally:
        batcher.close()
    for row in rows:
        row["turns_reached"] = assistant_turns(row["dialogue"])
    return rows


def _kl_sampling(sampling: SamplingParams) -> SamplingParams:
    """Plain sampling from the policy (T = 1, no top-p / top-k), the same length limit and stops."""
    return SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                          stop=sampling.stop)


def evaluate_policies(
    policies: Mapping[str, TextGenerator | str],
    reference: TextGenerator | str = "embedded",
    judge: Judge | str = "reward",
    *,
    env_id: str = DEFAULT_ENV_ID,
    env_kwargs: Mapping[str, Any] | None = None,
    num_prompts: int = 8,
    horizon: int | None = DEFAULT_HORIZON,
    seed: int = 0,
    sampling: SamplingParams | None = None,
    both_orders: bool = False,
    judge_template: str | None = None,
    judge_sampling: SamplingParams | None = None,
    turn_weights: Mapping[int, float] | None = None,
    max_dialogue_tokens: int | None = None,
    compute_kl: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Play every policy and the reference on the same held-out prompts, judge them turn by turn.

    ``policies`` maps a display name to a :class:`TextGenerator` or a model spec (see
    :data:`SPEC_HELP`); ``reference`` likewise. ``judge`` is 'reward', a model spec, or a ready
    :class:`Judge`. ``env_kwargs`` are the environment's keyword arguments (``preset`` included);
    ``split`` is set to 'test' and ``kl_coef`` to 0 for playing (KL is reported on its own), and
    the environment's ``max_dialogue_tokens`` (a preset's or ``env_kwargs``') to the argument
    ``max_dialogue_tokens`` (default None, no limit): that limit filters training data, and an
    evaluation that kept it would drop a pair at every turn when its later turns grow long. The
    configured value is recorded as ``config.env_max_dialogue_tokens``. A pair is judged at every
    turn both dialogues reached (a dialogue the environment still truncates, e.g. at a model's
    context, counts up to its last response).
    ``horizon`` is H (at most the environment's ``max_turns``; None = ``max_turns``).
    ``num_prompts`` held-out items are drawn without replacement with ``seed``. ``sampling`` is
    the policies' sampling (default: 256 new tokens at temperature 0.8). ``turn_weights`` override
    the appendix E weights (default: the test split's dataset dialogue lengths). ``both_orders``
    needs a pairwise (LLM) judge; with the reward judge it is refused (a reward has no A/B order).
    The KL column is KL(pi || pi_ref) of the models themselves (T = 1): with local models, each
    policy plays the same prompts once more sampling at T = 1 (the evaluation's own dialogues are
    used when ``sampling`` is already plain T = 1 sampling), scored at T = 1 (:func:`kl_estimate`).

    Returns a JSON-ready dict: ``config`` (everything needed to rerun, seeds included),
    ``turn_weights``, ``reference`` (its RM score and length), and ``policies``: per name
    ``win_rate`` (:func:`win_rates`), ``rm_score``, ``kl``, ``length_words``, ``truncated_pairs``,
    ``records`` and ``dialogues``. Write it out with :func:`write_reports`.
    """
    import gymnasium as gym

    import refuel_env  # (registers the ids)

    if not policies:
        raise ValueError("evaluate_policies needs at least one policy")
    if both_orders and (isinstance(judge, RewardJudge) or judge == "reward"):
        raise ValueError("both_orders=True (--both-orders) needs a pairwise LLM judge, but the judge is the reward "
                         "model, which scores each dialogue on its own and has no A/B order; drop --both-orders "
                         "or pass a model spec as the judge (e.g. openai:gpt-4-0613)")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    if max_dialogue_tokens is not None and (isinstance(max_dialogue_tokens, bool)
                                            or not isinstance(max_dialogue_tokens, int) or max_dialogue_tokens < 1):
        raise ValueError(f"max_dialogue_tokens must be None (no limit) or a positive int, got {max_dialogue_tokens!r}")
    sampling = sampling or SamplingParams(max_new_tokens=256, temperature=0.8)
    play_kwargs = {**dict(env_kwargs or {}), "split": "test", "kl_coef": 0.0}
    configured_limit = None
    if env_id in refuel_env.ENV_IDS:  # (the synthetic task has no dialogue limit)
        from refuel_env.components import make_config

        given = {k: v for k, v in play_kwargs.items() if k != "preset"}
        try:
            configured_limit = make_config(play_kwargs.get("preset"), **given).max_dialogue_tokens
        except (TypeError, ValueError):
            configured_limit = None  # gym.make below reports the bad argument
        play_kwargs["max_dialogue_tokens"] = max_dialogue_tokens
    elif max_dialogue_tokens is not None:
        raise ValueError(f"max_dialogue_tokens={max_dialogue_tokens} applies to the dialogue environments "
                         f"{sorted(refuel_env.ENV_IDS)}; {env_id} has no dialogue length limit: pass None")
    env = gym.make(env_id, **play_kwargs)
    core = env.unwrapped.core
    max_turns = core.max_turns
    H = max_turns if horizon is None else int(horizon)
    if not 1 <= H <= max_turns:
        raise ValueError(f"horizon must be in 1..{max_turns} (the environment's max_turns), got {horizon}; "
                         "raise max_turns in --env-kwargs for a longer horizon")
    items = core.items
    if num_prompts > len(items):
        raise ValueError(f"num_prompts={num_prompts} but the test split has only {len(items)} items; "
                         "lower --num-prompts or use a larger data source (data_source='hub' or a local file)")
    indices = sorted(np.random.default_rng(seed).choice(len(items), size=num_prompts, replace=False).tolist())
    horizons = [min(H, core.max_horizon(items[i])) for i in indices]
    weights = dict(turn_weights) if turn_weights is not None else length_weights([it.num_turns for it in items], H)
    template = judge_template or template_for_dataset(env.unwrapped.config.dataset)
    the_judge = build_judge(judge, env=env, template=template, seed=seed, both_orders=both_orders,
                            sampling=judge_sampling, device=device)
    if isinstance(the_judge, PairwiseJudge) and the_judge.template is None:
        the_judge.template = load_judge_template(template)
    if both_orders and not getattr(the_judge, "both_orders", False):
        raise ValueError(f"both_orders=True, but the judge {the_judge.name!r} ({type(the_judge).__name__}) judges one "
                         "order only; build it with both_orders=True or pass both_orders=False")
    kl_sampling = _kl_sampling(sampling)

    def play(generator: TextGenerator, params: SamplingParams = sampling) -> list[dict[str, Any]]:
        return play_for_evaluation(env_id=env_id, env_kwargs=play_kwargs, policy=generator, sampling=params,
                                   seed=seed, horizons=horizons, prompt_indices=indices)

    loaded: dict[str, TextGenerator] = {}

    def get(spec: TextGenerator | str) -> TextGenerator:
        if isinstance(spec, TextGenerator):
            return spec
        if spec not in loaded:
            loaded[spec] = load_generator(spec, device=device)
        return loaded[spec]

    steps = tqdm(total=1 + 2 * len(policies), desc="evaluate", unit="step", disable=not progress)
    ref_gen = get(reference)
    steps.set_postfix_str(f"play {getattr(ref_gen, 'name', 'reference')}")
    ref_rows = play(ref_gen)
    steps.update()
    ref_score, ref_n = _rm_score(ref_rows)
    results: dict[str, Any] = {
        "config": {
            "env_id": env_id, "env_kwargs": _json_kwargs(play_kwargs), "num_prompts": num_prompts, "horizon": H,
            "seed": seed, "prompt_indices": indices, "item_ids": [r["item_id"] for r in ref_rows],
            "dialogue_horizons": horizons, "env_seeds": [seed + i for i in range(num_prompts)],
            "sampling": asdict(sampling), "judge": the_judge.describe(),
            "both_orders": bool(getattr(the_judge, "both_orders", False)),
            "max_dialogue_tokens": max_dialogue_tokens, "env_max_dialogue_tokens": configured_limit,
            "kl_logprob_temperature": 1.0, "kl_sampling": asdict(kl_sampling), "length_unit": "words",
            "reference": reference if isinstance(reference, str) else getattr(reference, "name", "reference"),
        },
        "turn_weights": weights,
        "reference": {"name": getattr(ref_gen, "name", "reference"), "rm_score": ref_score, "rm_score_n": ref_n,
                      "length_words": _response_words(r["dialogue"] for r in ref_rows if r["dialogue"]),
                      "truncated": sum(1 for r in ref_rows if r.get("reward") is None), "dialogues": ref_rows},
        "policies": {},
    }
    for name, spec in policies.items():
        gen = get(spec)
        steps.set_postfix_str(f"play {name}")
        rows = play(gen)
        steps.update()
        comparisons = []
        truncated_pairs = 0
        for i, (ours, theirs) in enumerate(zip(rows, ref_rows)):
            complete = ours.get("reward") is not None and theirs.get("reward") is not None
            truncated_pairs += not complete
            last = min(ours["turns_reached"], theirs["turns_reached"])
            for h in range(1, last + 1):  # every turn both dialogues reached
                comparisons.append(Comparison(truncate_dialogue(ours["dialogue"], h),
                                              truncate_dialogue(theirs["dialogue"], h), h, i,
                                              ours["item_id"], full=complete and h == last, policy=name))
        steps.set_postfix_str(f"judge {name}")
        records = the_judge.judge(comparisons, progress=progress)
        steps.update()
        for r in records:
            r["policy"] = name
        score, n_scored = _rm_score(rows)
        kept = [r["dialogue"] for r in rows if r.get("reward") is not None]
        kl: dict[str, Any] | None = None
        kl_note = None
        kl_rows: list[dict[str, Any]] | None = None
        if not compute_kl:
            kl_note = "not computed (compute_kl=False)"
        elif _local_model(gen) is None or _local_model(ref_gen) is None:
            kl_note = "needs local transformers models for the policy and the reference"
        else:
            if sampling == kl_sampling:
                kl_dialogues = kept
            else:  # the evaluation's samples are not pi's: sample pi itself (T = 1)
                steps.set_postfix_str(f"play {name} at T = 1 for KL")
                kl_rows = play(gen, kl_sampling)
                kl_dialogues = [r["dialogue"] for r in kl_rows if r.get("reward") is not None]
            if kl_dialogues:
                kl = kl_estimate(gen, ref_gen, kl_dialogues, temperature=1.0)
                kl["samples"] = "the evaluation dialogues" if kl_rows is None else "kl_dialogues (sampled at T = 1)"
            else:
                kl_note = "no complete policy dialogue sampled at T = 1"
        results["policies"][name] = {
            "spec": spec if isinstance(spec, str) else getattr(spec, "name", name),
            "win_rate": win_rates(records, horizon=H, weights=weights),
            "rm_score": score, "rm_score_n": n_scored,
            "kl": kl, "kl_note": kl_note,
            "length_words": _response_words(kept),
            "truncated_pairs": truncated_pairs,
            "records": records, "dialogues": rows,
            **({"kl_dialogues": kl_rows} if kl_rows is not None else {}),
        }
    steps.close()
    env.close()
    return results
