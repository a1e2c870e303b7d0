"""Evaluation: per-turn win rates against a reference policy, reward-model score, KL, length.

The protocol of the paper's sections 4.2 and 4.3 (tables 1 and 2, appendices C.5 and E):

1. The policy and the reference policy each play the environment from the same held-out prompts
   (``split="test"``), with the same seeds, for H turns (H = 5 by default, the paper's; in a
   pre-sampled setting an item with fewer questions ends at its own length). Both use
   :func:`play_for_evaluation`, whose seeded sampling makes the two runs differ only by the
   policy. The training-data limit ``max_dialogue_tokens`` is off while playing.
2. For every turn h = 1..H_i that both dialogues reached, the two dialogues truncated after the
   h-th assistant message are compared by a judge: :class:`PairwiseJudge` (any :class:`~refuel_env.generation.TextGenerator`
   answering the appendix C.5 prompt: a local model, vLLM, or GPT-4 over HTTP) or
   :class:`RewardJudge` (the higher reward-model score wins; exact and cheap).
3. :func:`win_rates` aggregates the judgements: a win rate per turn with a Wilson 95 % interval,
   the average over turns (table 1's ``avg``), the appendix E weighted average (weights: the
   share of the test set's dataset dialogues of each length), and the full-dialogue win rate
   (each pair judged at its own last turn; table 2's ``Winrate``).
4. Also reported: the reward-model score (mean environment reward of the full dialogues, KL
   penalty off), a Monte-Carlo estimate of KL(pi || pi_ref) at temperature 1 from dialogues the
   policy sampled at temperature 1 (:func:`kl_estimate`), and the mean response length in words.

Outcomes are from the policy's side: 1 = the policy's dialogue is preferred, 0 = the
reference's, 0.5 = a tie. A comparison that yields no outcome (the judge's answer could not be
parsed, or the prompt does not fit the judge's context) is left out of the win rate and
counted. A pair in which either dialogue was truncated by the environment (it outgrew a model's
context) is judged at the turns both reached, has no full-dialogue judgement, and is counted as
``truncated_pairs``.

**Both orders** (``both_orders=True``): each comparison is judged with the policy's dialogue as
A and again as B. Both answers parsed: the same dialogue preferred both times gives 1 or 0;
different dialogues (the judge followed the position) give 0.5. One answer parsed: its outcome
counts, and the other is counted as a parse failure. None parsed: no outcome.

The package, one module per job:

- :mod:`~refuel_agents.evaluation.judges`: the judge prompts and templates, the parsing of a
  judge's answer, :class:`Comparison` and the judges;
- :mod:`~refuel_agents.evaluation.stats`: Wilson intervals, the appendix E weights, win rates;
- :mod:`~refuel_agents.evaluation.kl`: the Monte-Carlo KL estimate;
- :mod:`~refuel_agents.evaluation.specs`: model specs and the generators they load (also used by
  ``scripts/evaluate.py`` and ``scripts/reproduce_table1.py``);
- :mod:`~refuel_agents.evaluation.driver`: :func:`play_for_evaluation` and :func:`evaluate_policies`;
- :mod:`~refuel_agents.evaluation.report`: the Markdown report, the plot and the JSON file.

Every public name is importable from ``refuel_agents.evaluation`` itself.
"""

from refuel_agents.evaluation.driver import (
    DEFAULT_ENV_ID,
    DEFAULT_HORIZON,
    evaluate_policies,
    play_for_evaluation,
)
from refuel_agents.evaluation.judges import (
    HH_JUDGE_TEMPLATE,
    JUDGE_TEMPLATES,
    TEMPLATE_HELP,
    ULTRAINTERACT_JUDGE_TEMPLATE,
    Comparison,
    Judge,
    PairwiseJudge,
    RewardJudge,
    assistant_turns,
    build_judge,
    comparison_order,
    judge_prompt,
    load_judge_template,
    parse_preference,
    prompt_hash,
    render_dialogue,
    template_for_dataset,
    truncate_dialogue,
)
from refuel_agents.evaluation.kl import kl_estimate, response_logprobs, turn_pairs
from refuel_agents.evaluation.report import markdown_report, markdown_table, plot_win_rates, write_reports
from refuel_agents.evaluation.specs import (
    SPEC_HELP,
    ModelSpec,
    SpecError,
    check_spec,
    load_generator,
    parse_spec,
    split_named_spec,
)
from refuel_agents.evaluation.stats import (
    bootstrap_interval,
    length_weights,
    weighted_average,
    wilson_interval,
    win_rates,
)

__all__ = [
    "DEFAULT_ENV_ID", "DEFAULT_HORIZON", "bootstrap_interval", "assistant_turns", "judge_prompt", "prompt_hash",
    "Comparison", "HH_JUDGE_TEMPLATE", "JUDGE_TEMPLATES", "Judge", "ModelSpec", "PairwiseJudge",
    "RewardJudge", "SPEC_HELP", "SpecError", "ULTRAINTERACT_JUDGE_TEMPLATE", "build_judge", "check_spec", "evaluate_policies",
    "TEMPLATE_HELP", "comparison_order", "kl_estimate", "length_weights", "load_generator", "load_judge_template",
    "play_for_evaluation", "markdown_report", "markdown_table", "parse_preference",
    "parse_spec", "plot_win_rates", "render_dialogue", "response_logprobs", "split_named_spec", "template_for_dataset", "truncate_dialogue",
    "turn_pairs", "weighted_average", "wilson_interval", "win_rates", "write_reports",
]
