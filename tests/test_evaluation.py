"""The evaluation harness: judge-answer parsing, win-rate aggregation and the weighted average,
A/B randomisation and the both-orders rule, the KL estimate, scripts/evaluate.py end to end, and
a real SmolLM2 judge."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from refuel_agents.evaluation import (
    TEMPLATE_HELP,
    Comparison,
    PairwiseJudge,
    RewardJudge,
    SpecError,
    check_spec,
    evaluate_policies,
    judge_prompt,
    kl_estimate,
    length_weights,
    load_judge_template,
    markdown_report,
    parse_preference,
    parse_spec,
    split_named_spec,
    truncate_dialogue,
    weighted_average,
    wilson_interval,
    win_rates,
    write_reports,
)
from refuel_env.generation import Completion, SamplingParams, TextGenerator, TransformersGenerator
from refuel_env.rewards import TrajectoryRewardModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "evaluate.py")

# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Comparison: A is clearer.\nPreferred: A", "A"),
        ("Comparison: B answers the question.\nPreferred: B", "B"),
        ("preferred: b", "B"),
        ("PREFERRED: A.", "A"),
        ("**Preferred:** B", "B"),
        ("**Preferred: A**", "A"),
        ("### Preferred: B", "B"),
        ("Preferred: `A`", "A"),
        ('Preferred: "A"', "A"),
        ("Preferred: 'B'", "B"),
        ("Preferred: [B]", "B"),
        ("Preferred: (A)", "A"),
        ("Preferred: Dialogue B", "B"),
        ("Preferred dialogue: A", "A"),
        ("Preferred - B", "B"),
        ("Preferred: B, because it is concise.", "B"),
        ("Preferred: B. A repeats itself.", "B"),
        ("Comparison: B is better.\nPreferred: A\n\nA explains each step, unlike B.", "A"),
        ("Comparison: both fine.\nPreferred: B\nPreferred: B", "B"),
        ("Comparison: A wins.\nA", "A"),
        ("Comparison: B wins.\n\n**B**\n", "B"),
        # missing, ambiguous or contradictory: None
        ("", None),
        (None, None),
        ("I cannot decide.", None),
        ("Comparison: both are fine.", None),
        ("Preferred: A or B", None),
        ('Preferred: <"A" or "B">', None),
        ("Preferred: A/B", None),
        ("Preferred: Neither", None),
        ("Preferred: tie", None),
        ("Preferred: a longer answer would help", None),
        ("Preferred: A\nPreferred: B", None),
        ("Comparison: I would go with Dialogue A.", None),
        ("Preferred: C", None),
        ("Preferred: Alpha", None),
    ],
)
def test_parse_preference(text, expected):
    assert parse_preference(text) == expected


def test_bare_letter_only_from_a_complete_answer():
    assert parse_preference("Comparison: B wins.\nB", bare_letter=False) is None
    assert parse_preference("Comparison: B wins.\nPreferred: B", bare_letter=False) == "B"


def test_judge_prompt_carries_both_dialogues_and_the_format():
    a = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "answer one"}]
    b = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "answer two"}]
    for template in ("ultrainteract", "hh"):
        text = judge_prompt(template, a, b)
        assert text.index("answer one") < text.index("answer two")
        assert text.rstrip().endswith('Preferred: <"A" or "B">')
    with pytest.raises(ValueError, match="placeholders"):
        judge_prompt("no placeholders here", a, b)


def test_judge_template_from_a_file_with_either_placeholder_spelling(tmp_path):
    a = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "answer one"}]
    b = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "answer two {dialogue_a}"}]
    appendix = tmp_path / "appendix_c5.txt"  # appendix C.5 writes {{dialoguea}} / {{dialogueb}}
    appendix.write_text("Pick one.\n\nDialogue A:\n\n{{dialoguea}}\n\nDialogue B:\n\n{{ dialogueb }}\n\nPreferred: <A or B>\n")
    text = load_judge_template(str(appendix))
    assert text == appendix.read_text()
    prompt = judge_prompt(text, a, b)
    assert "{{" not in prompt and prompt.index("answer one") < prompt.index("answer two")
    assert "# User:\nq1\n\n# Chatbot:\nanswer one" in prompt
    assert "answer two {dialogue_a}" in prompt  # a transcript is not itself filled in
    ours = tmp_path / "ours.txt"
    ours.write_text("A: {dialogue_a}\nB: {dialogue_b}")
    assert judge_prompt(load_judge_template(str(ours)), a, b).startswith("A: # User:")
    assert load_judge_template("hh") == "hh"
    # the judge takes the file, and records the text it used
    scripted = ScriptedJudge("content")
    judge = PairwiseJudge(scripted, template=str(appendix), seed=0)
    records = judge.judge(_comparisons(4))
    assert all(r["outcome"] == 1.0 for r in records) and all(p.startswith("Pick one.") for p in scripted.prompts)
    assert judge.describe()["template"] == "custom" and judge.describe()["template_text"] == text
    # bad templates: the value, what is wrong, what to pass
    once = tmp_path / "once.txt"
    once.write_text("only {{dialoguea}} here")
    with pytest.raises(ValueError, match=r"1 placeholder\(s\) for dialogue A and 0 for dialogue B"):
        load_judge_template(str(once))
    with pytest.raises(ValueError, match=r"'missing.txt' is neither one of \['hh', 'ultrainteract'\] nor an existing file"):
        load_judge_template("missing.txt")
    assert "{{dialoguea}}" in TEMPLATE_HELP and "{dialogue_a}" in TEMPLATE_HELP


def test_truncate_dialogue():
    d = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    assert truncate_dialogue(d, 1) == d[:3]
    assert truncate_dialogue(d, 2) == d
    with pytest.raises(ValueError, match="2 assistant turns"):
        truncate_dialogue(d, 3)


# ------------------------------------------------------------------------------ aggregation


def _record(turn, outcome, full=False, parse_failures=0):
    return {"turn": turn, "outcome": outcome, "full": full, "parse_failures": parse_failures,
            "failure": None if outcome is not None else "parse"}


def test_win_rates_by_hand():
    records = [
        # turn 1: win, win, loss, tie -> (1 + 1 + 0 + 0.5) / 4 = 0.625
        _record(1, 1.0), _record(1, 1.0), _record(1, 0.0), _record(1, 0.5),
        # turn 2: loss, loss, win -> 1/3
        _record(2, 0.0), _record(2, 0.0, full=True), _record(2, 1.0, full=True),
        # turn 3: one win, one parse failure (left out, counted)
        _record(3, 1.0, full=True), _record(3, None, full=True, parse_failures=1),
    ]
    weights = {1: 0.5, 2: 0.3, 3: 0.2}
    result = win_rates(records, horizon=3, weights=weights)
    turns = result["per_turn"]
    assert turns[1]["win_rate"] == pytest.approx(0.625)
    assert (turns[1]["n"], turns[1]["wins"], turns[1]["ties"], turns[1]["losses"]) == (4, 2, 1, 1)
    assert turns[2]["win_rate"] == pytest.approx(1 / 3)
    assert turns[3]["win_rate"] == pytest.approx(1.0)
    assert (turns[3]["n"], turns[3]["failures"], turns[3]["parse_failures"]) == (1, 1, 1)
    # average over turns: (0.625 + 0.3333 + 1) / 3 = 0.65278
    assert result["average"] == pytest.approx(0.652777, abs=1e-5)
    # appendix E: 0.5 * 0.625 + 0.3 * 1/3 + 0.2 * 1.0 = 0.3125 + 0.1 + 0.2 = 0.6125
    assert result["weighted_average"] == pytest.approx(0.6125)
    # full dialogue: the records flagged full with an outcome: 0, 1, 1 -> 2/3
    assert result["full_dialogue"]["win_rate"] == pytest.approx(2 / 3)
    assert (result["n"], result["failures"], result["parse_failures"]) == (8, 1, 1)


def test_win_rates_turn_without_judgements():
    result = win_rates([_record(1, 1.0)], horizon=2)
    assert result["per_turn"][2]["n"] == 0 and math.isnan(result["per_turn"][2]["win_rate"])
    assert result["average"] == 1.0 and result["turns_in_average"] == [1]
    assert result["weighted_average"] is None


def test_wilson_interval_by_hand():
    # p = 0.5, n = 4, z = 1.96: centre 0.5, half = 1.96 * sqrt(0.0625 + 0.060025) / 1.9604 = 0.34996
    low, high = wilson_interval(2, 4, z=1.96)
    assert low == pytest.approx(0.15004, abs=1e-4) and high == pytest.approx(0.84996, abs=1e-4)
    # p = 1, n = 10: upper bound 1, lower bound 10 / (10 + 3.8416) = 0.72246
    low, high = wilson_interval(10, 10, z=1.96)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.72246, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_length_weights_and_weighted_average():
    # lengths 1, 1, 2, 5, 7 at horizon 3: 5 and 7 count as 3 -> {1: 2/5, 2: 1/5, 3: 2/5}
    assert length_weights([1, 1, 2, 5, 7], horizon=3) == {1: 0.4, 2: 0.2, 3: 0.4}
    # turn 2 has no win rate: weights renormalised over turns 1 and 3 -> (0.4 * 0.5 + 0.4 * 1.0) / 0.8 = 0.75
    assert weighted_average({1: 0.5, 3: 1.0}, {1: 0.4, 2: 0.2, 3: 0.4}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one"):
        length_weights([], horizon=3)


# ------------------------------------------------------------------------------ judges


class ScriptedJudge(TextGenerator):
    """A test double at the judge boundary: answers from the prompt text alone.

    ``mode``: 'content' prefers the dialogue holding GOOD; 'position' always answers A;
    'garbage' never gives a choice; 'only-b' answers only when GOOD is in dialogue B; 'cut' ends
    with the right bare letter but hit the token limit.
    """

    name = "scripted-judge"

    def __init__(self, mode: str, max_context: int = 100_000):
        self.mode = mode
        self.max_context = max_context
        self.prompts: list[str] = []

    def chat(self, conversations: Sequence, params: SamplingParams, seeds=None) -> list[Completion]:
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            self.prompts.append(prompt)
            a, b = re.split(r"\n(?:Dialogue|Conversation) B:\n",
                            re.split(r"\n(?:Dialogue|Conversation) A:\n", prompt, maxsplit=1)[1], maxsplit=1)
            b = b.split("\nInstructions:", 1)[0]
            good = "A" if "GOOD" in a else "B"
            text = {"content": f"Comparison: {good} is better.\nPreferred: {good}",
                    "position": "Comparison: the first.\n**Preferred:** A",
                    "garbage": "Both are lovely.",
                    "only-b": "Preferred: B" if good == "B" else "I am not sure.",
                    "cut": f"Comparison: B: A: B: A:\n{good}"}[self.mode]
            finish = "length" if self.mode == "cut" else "stop"
            out.append(Completion(text=text, prompt_tokens=0, completion_tokens=1, finish_reason=finish))
        return out

    def count_tokens(self, messages, *, add_generation_prompt=True) -> int:
        return sum(len(m["content"].split()) for m in messages)


def _comparisons(n: int) -> list[Comparison]:
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "GOOD answer"}]
    bad = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "poor answer"}]
    return [Comparison(good, bad, turn=1, index=i, full=True) for i in range(n)]


def test_pairwise_judge_randomises_the_order_with_its_seed():
    comparisons = _comparisons(40)
    records = PairwiseJudge(ScriptedJudge("content"), seed=3).judge(comparisons)
    orders = [r["order"] for r in records]
    assert {"policy=A", "policy=B"} == set(orders)
    assert 8 <= orders.count("policy=A") <= 32
    # a content judge prefers the policy's dialogue whatever its position
    assert all(r["outcome"] == 1.0 and r["failure"] is None for r in records)
    assert all(r["judgements"][0]["parsed"] == ("A" if r["order"] == "policy=A" else "B") for r in records)
    assert orders == [r["order"] for r in PairwiseJudge(ScriptedJudge("content"), seed=3).judge(comparisons)]
    assert orders != [r["order"] for r in PairwiseJudge(ScriptedJudge("content"), seed=4).judge(comparisons)]
    assert len({r["judgements"][0]["judge_prompt_hash"] for r in records}) == 2  # two orders, two prompts


def test_a_comparisons_order_does_not_depend_on_the_other_comparisons():
    """A/B order from (seed, prompt, policy, turn): judging another policy's comparisons first
    (or none) leaves this policy's orders and judge seeds as they are."""
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "GOOD answer"}]
    bad = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "poor answer"}]
    mine = [Comparison(good, bad, turn=1 + i % 3, index=i // 3, item_id=f"item-{i // 3}", policy="mine")
            for i in range(30)]
    other = [Comparison(good, bad, c.turn, c.index, c.item_id, policy="other") for c in mine]
    alone = PairwiseJudge(ScriptedJudge("content"), seed=2).judge(mine)
    after = PairwiseJudge(ScriptedJudge("content"), seed=2).judge(other + mine)[len(other):]
    assert [r["order"] for r in alone] == [r["order"] for r in after]
    assert {"policy=A", "policy=B"} == {r["order"] for r in alone}
    # the order is the policy's own: another policy's comparisons of the same prompts draw theirs
    theirs = PairwiseJudge(ScriptedJudge("content"), seed=2).judge(other)
    assert [r["order"] for r in theirs] != [r["order"] for r in alone]
    assert all(r["policy"] == "mine" for r in alone)


def test_position_biased_judge_with_and_without_both_orders():
    comparisons = _comparisons(20)
    single = PairwiseJudge(ScriptedJudge("position"), seed=0).judge(comparisons)
    assert [r["outcome"] for r in single] == [1.0 if r["order"] == "policy=A" else 0.0 for r in single]
    generator = ScriptedJudge("position")
    both = PairwiseJudge(generator, seed=0, both_orders=True).judge(comparisons)
    assert len(generator.prompts) == 40
    assert all(r["order"] == "both" and r["outcome"] == 0.5 for r in both)
    assert all({j["order"] for j in r["judgements"]} == {"policy=A", "policy=B"} for r in both)
    assert win_rates(both)["per_turn"][1]["ties"] == 20

    consistent = PairwiseJudge(ScriptedJudge("content"), seed=0, both_orders=True).judge(comparisons)
    assert all(r["outcome"] == 1.0 for r in consistent)


def test_judge_failures_are_counted_not_guessed():
    comparisons = _comparisons(6)
    garbage = PairwiseJudge(ScriptedJudge("garbage"), seed=0).judge(comparisons)
    assert all(r["outcome"] is None and r["failure"] == "parse" and r["parse_failures"] == 1 for r in garbage)
    summary = win_rates(garbage)
    assert summary["n"] == 0 and summary["failures"] == 6 and summary["parse_failures"] == 6
    # a bare letter at the end of an answer cut at the token limit is not a choice
    cut = PairwiseJudge(ScriptedJudge("cut"), seed=0).judge(comparisons)
    assert all(r["outcome"] is None and r["judgements"][0]["finish_reason"] == "length" for r in cut)
    # both orders, one answer parsed: that answer counts, the other is a parse failure
    one = PairwiseJudge(ScriptedJudge("only-b"), seed=0, both_orders=True).judge(comparisons)
    assert all(r["outcome"] == 1.0 and r["parse_failures"] == 1 for r in one)
    # a prompt that does not fit the judge's context is not sent
    small = ScriptedJudge("content", max_context=300)
    too_long = PairwiseJudge(small, seed=0, sampling=SamplingParams(max_new_tokens=256, temperature=0.0))
    records = too_long.judge(comparisons)
    assert all(r["outcome"] is None and r["failure"] == "context" for r in records) and small.prompts == []


class LengthReward:
    """Scores a dialogue by the words of its assistant messages (an exact, known reward)."""

    def score(self, dialogues):
        return [float(sum(len(m["content"].split()) for m in d if m["role"] == "assistant")) for d in dialogues]


def test_reward_judge_prefers_the_higher_score_and_ties_at_half():
    u = {"role": "user", "content": "q"}
    longer = [u, {"role": "assistant", "content": "one two three"}]
    shorter = [u, {"role": "assistant", "content": "one"}]
    comparisons = [Comparison(longer, shorter, 1, 0), Comparison(shorter, longer, 1, 1), Comparison(longer, longer, 1, 2)]
    records = RewardJudge(LengthReward()).judge(comparisons)
    assert [r["outcome"] for r in records] == [1.0, 0.0, 0.5]
    assert (records[0]["policy_score"], records[0]["reference_score"]) == (3.0, 1.0)
    tolerant = RewardJudge(LengthReward(), tie_tolerance=2.0).judge(comparisons)
    assert [r["outcome"] for r in tolerant] == [0.5, 0.5, 0.5]


# ------------------------------------------------------------------------------ KL


@pytest.fixture(scope="module")
def word_generators(word_lm_dir):
    """The word LM, and a copy whose output layer is scaled by 8 (a much sharper policy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = TransformersGenerator.from_pretrained(str(word_lm_dir), device="cpu")
    model = AutoModelForCausalLM.from_pretrained(word_lm_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    tokenizer = AutoTokenizer.from_pretrained(word_lm_dir)
    tokenizer.padding_side = "left"
    sharp = TransformersGenerator(model, tokenizer, name="sharp")
    return base, sharp


def _sampled_dialogues(policy: TransformersGenerator, n: int = 6) -> list[list[dict]]:
    states = [[{"role": "user", "content": f"what is {w}"}] for w in ("one two three four five six".split()[:n])]
    replies = policy.chat(states, SamplingParams(max_new_tokens=6, temperature=1.0), seeds=list(range(len(states))))
    return [[*s, {"role": "assistant", "content": r.text}] for s, r in zip(states, replies) if r.text]


def test_kl_is_zero_for_the_same_model_and_positive_otherwise(word_generators):
    base, sharp = word_generators
    same = kl_estimate(base, base, _sampled_dialogues(base))
    assert same["mean"] == 0.0 and all(x == 0.0 for x in same["per_dialogue"])
    dialogues = _sampled_dialogues(sharp)
    assert dialogues
    different = kl_estimate(sharp, base, dialogues)
    assert different["mean"] > 0.5
    assert different["n"] == len(dialogues) and different["stderr"] >= 0


# ------------------------------------------------------------------------------ specs


def test_model_specs(tmp_path, word_lm_dir, monkeypatch):
    assert parse_spec("embedded").backend == "transformers"
    assert parse_spec(str(word_lm_dir)).model == str(word_lm_dir)
    assert parse_spec("hf:org/model").model == "org/model"
    assert parse_spec("vllm:org/model").backend == "vllm"
    spec = parse_spec("openai:gpt-4-0613@http://localhost:8000/v1")
    assert (spec.backend, spec.model, spec.base_url) == ("openai", "gpt-4-0613", "http://localhost:8000/v1")
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(str(tmp_path / "missing"))
    with pytest.raises(SpecError, match="no config.json"):
        parse_spec(str(tmp_path))
    with pytest.raises(SpecError, match="unknown model spec prefix"):
        parse_spec("foo:bar")
    with pytest.raises(SpecError, match="http"):
        parse_spec("openai:gpt-4@localhost:8000")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SpecError, match="OPENAI_API_KEY"):
        check_spec("openai:gpt-4-0613")
    check_spec("openai:local@http://localhost:8000/v1")  # a local server needs no key
    assert split_named_spec("refuel=runs/a/final_model") == ("refuel", "runs/a/final_model")
    assert split_named_spec("openai:m@http://h/v1?x=1") == ("openai:m@http://h/v1?x=1",) * 2


# ------------------------------------------------------------------------------ the driver


ENV_KWARGS = {"user": "instant", "max_turns": 2}


def test_evaluate_policies_same_prompts_same_seeds(word_lm_dir, tmp_path):
    """The reference against itself: identical dialogues, every comparison a tie, KL 0."""
    results = evaluate_policies({"self": str(word_lm_dir)}, str(word_lm_dir), judge="reward", env_kwargs=ENV_KWARGS,
                                num_prompts=3, horizon=2, seed=5, sampling=SamplingParams(max_new_tokens=6),
                                progress=False)
    p = results["policies"]["self"]
    ours, theirs = p["dialogues"], results["reference"]["dialogues"]
    assert [r["item_id"] for r in ours] == [r["item_id"] for r in theirs] == results["config"]["item_ids"]
    assert [r["dialogue"] for r in ours] == [r["dialogue"] for r in theirs]
    assert all(r["outcome"] == 0.5 for r in p["records"])
    assert [p["win_rate"]["per_turn"][h]["n"] for h in (1, 2)] == [3, 3]
    assert p["kl"]["mean"] == 0.0 and p["rm_score"] == results["reference"]["rm_score"]
    assert results["config"]["env_kwargs"]["split"] == "test"
    paths = write_reports(results, tmp_path)
    assert json.loads(paths["json"].read_text())["config"]["horizon"] == 2


def test_evaluate_policies_with_a_pairwise_judge(word_generators, tmp_path):
    base, sharp = word_generators
    scripted = ScriptedJudge("position")
    judge = PairwiseJudge(scripted, seed=1, both_orders=True)
    results = evaluate_policies({"sharp": sharp, "base": base}, base, judge, env_kwargs=ENV_KWARGS, num_prompts=2,
                                horizon=2, seed=0, sampling=SamplingParams(max_new_tokens=6), progress=False)
    for name in ("sharp", "base"):
        wr = results["policies"][name]["win_rate"]
        assert wr["per_turn"][1]["win_rate"] == 0.5 and wr["per_turn"][2]["ties"] == 2
    assert len(scripted.prompts) == 2 * 2 * 2 * 2  # policies x prompts x turns x orders
    assert results["policies"]["sharp"]["kl"]["mean"] > 0
    md = write_reports(results, tmp_path)["markdown"].read_text()
    assert "| sharp | 50.0 | 50.0 | 50.0 |" in md


def test_evaluate_policies_presampled_hh_items_end_at_their_own_length(word_generators):
    """HH test items have 1, 4 and 5 questions: at H = 2 the first ends after one turn."""
    base, sharp = word_generators
    judge = PairwiseJudge(ScriptedJudge("position"), seed=0)
    results = evaluate_policies({"sharp": sharp}, base, judge, env_id="AnthropicHHPresampled-v0", num_prompts=3,
                                horizon=2, seed=0, sampling=SamplingParams(max_new_tokens=4), progress=False)
    assert sorted(results["config"]["dialogue_horizons"]) == [1, 2, 2]
    assert results["config"]["judge"]["template"] == "hh"
    wr = results["policies"]["sharp"]["win_rate"]
    assert (wr["per_turn"][1]["n"], wr["per_turn"][2]["n"], wr["full_dialogue"]["n"]) == (3, 2, 3)
    # appendix E weights from the test items' lengths 1, 4, 5 at H = 2: {1: 1/3, 2: 2/3}
    assert results["turn_weights"] == pytest.approx({1: 1 / 3, 2: 2 / 3})


def test_evaluate_policies_rejects_bad_arguments(word_lm_dir):
    with pytest.raises(ValueError, match="horizon must be in 1..2"):
        evaluate_policies({"p": str(word_lm_dir)}, str(word_lm_dir), env_kwargs=ENV_KWARGS, horizon=5, progress=False)
    with pytest.raises(ValueError, match="test split has only"):
        evaluate_policies({"p": str(word_lm_dir)}, str(word_lm_dir), env_kwargs=ENV_KWARGS, horizon=2,
                          num_prompts=500, progress=False)


class WordCountRM(TrajectoryRewardModel):
    """Scores a dialogue by its assistant words; reads at most ``max_length`` words (its context)."""

    name = "assistant-words"

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length

    def _score(self, dialogues):
        return [float(sum(len(m["content"].split()) for m in d if m["role"] == "assistant")) for d in dialogues]

    def count_tokens(self, dialogue):
        return sum(len(m["content"].split()) for m in dialogue)


def test_evaluation_drops_the_training_limit_and_judges_every_turn_both_dialogues_reached(word_lm_dir):
    """max_dialogue_tokens is a training-data filter: evaluation plays without it. A dialogue the
    environment still ends early (here: the reward model's context at the last turn) is judged at
    the turns it reached instead of losing its pair at every turn."""
    spec = str(word_lm_dir)
    common = {"judge": "reward", "num_prompts": 3, "horizon": 2, "seed": 5,
              "sampling": SamplingParams(max_new_tokens=6), "compute_kl": False, "progress": False}
    # A training limit of 1 token would end every dialogue after its first response.
    free = evaluate_policies({"self": spec}, spec, env_kwargs={**ENV_KWARGS, "max_dialogue_tokens": 1}, **common)
    wr = free["policies"]["self"]["win_rate"]
    assert [wr["per_turn"][h]["n"] for h in (1, 2)] == [3, 3] and wr["full_dialogue"]["n"] == 3
    assert (free["config"]["max_dialogue_tokens"], free["config"]["env_max_dialogue_tokens"]) == (None, 1)
    assert "training-data limit max_dialogue_tokens=1 is off" in markdown_report(free)
    # An evaluation limit set on purpose (max_dialogue_tokens=1) ends them after turn 1: h = 1 is still judged.
    short = evaluate_policies({"self": spec}, spec, env_kwargs=ENV_KWARGS, max_dialogue_tokens=1, **common)
    p = short["policies"]["self"]
    assert [p["win_rate"]["per_turn"][h]["n"] for h in (1, 2)] == [3, 0]
    assert p["truncated_pairs"] == 3 and p["win_rate"]["full_dialogue"]["n"] == 0
    assert all(r["turns_reached"] == 1 and r["reward"] is None for r in p["dialogues"])
    # A reward model that reads every turn-1 transcript but no full one.
    words = WordCountRM()
    dialogues = [r["dialogue"] for r in free["reference"]["dialogues"]]
    first = max(words.count_tokens(truncate_dialogue(d, 1)) for d in dialogues)
    assert min(words.count_tokens(d) for d in dialogues) > first  # the premise of this check
    limited = evaluate_policies({"self": spec}, spec, env_kwargs={**ENV_KWARGS, "reward_model": WordCountRM(first)}, **common)
    p = limited["policies"]["self"]
    assert all(r["reward"] is None and "reward model" in r["truncation_reason"] for r in p["dialogues"])
    assert [r["dialogue"] for r in p["dialogues"]] == dialogues  # the same dialogues, kept whole
    turn1, turn2 = p["win_rate"]["per_turn"][1], p["win_rate"]["per_turn"][2]
    assert (turn1["n"], turn1["win_rate"]) == (3, 0.5)  # judged although the pair never finished
    assert (turn2["n"], turn2["failures"]) == (0, 3)  # too long for the reward judge: counted, not dropped
    assert {r["failure"] for r in p["records"] if r["turn"] == 2} == {"context"}
    assert p["truncated_pairs"] == 3 and p["win_rate"]["full_dialogue"]["n"] == 0


def test_adding_a_policy_changes_no_other_rows_orders(word_generators):
    base, sharp = word_generators
    kw = {"env_kwargs": ENV_KWARGS, "num_prompts": 3, "horizon": 2, "seed": 0,
          "sampling": SamplingParams(max_new_tokens=4), "compute_kl": False, "progress": False}
    alone = evaluate_policies({"sharp": sharp}, base, PairwiseJudge(ScriptedJudge("content"), seed=0), **kw)
    both = evaluate_policies({"base": base, "sharp": sharp}, base, PairwiseJudge(ScriptedJudge("content"), seed=0), **kw)
    orders = [(r["index"], r["turn"], r["order"]) for r in alone["policies"]["sharp"]["records"]]
    assert orders == [(r["index"], r["turn"], r["order"]) for r in both["policies"]["sharp"]["records"]]
    assert len(orders) == 6


def test_kl_column_is_kl_at_temperature_one_whatever_the_sampling_temperature(word_generators):
    """KL(pi || pi_ref) of the models themselves: sampled from pi at T = 1 and scored at T = 1, so
    it does not change with the temperature the judged dialogues were sampled at."""
    base, sharp = word_generators
    kw = {"env_kwargs": ENV_KWARGS, "num_prompts": 3, "horizon": 2, "seed": 0, "progress": False}
    hot = evaluate_policies({"sharp": sharp}, base, "reward", sampling=SamplingParams(max_new_tokens=6, temperature=1.0), **kw)
    cool = evaluate_policies({"sharp": sharp}, base, "reward", sampling=SamplingParams(max_new_tokens=6, temperature=0.5), **kw)
    kl_hot, kl_cool = hot["policies"]["sharp"]["kl"], cool["policies"]["sharp"]["kl"]
    assert kl_hot["temperature"] == kl_cool["temperature"] == 1.0 and cool["config"]["kl_logprob_temperature"] == 1.0
    assert kl_cool["per_dialogue"] == pytest.approx(kl_hot["per_dialogue"], rel=1e-9, abs=1e-9) and kl_hot["mean"] > 0
    # at T = 1 the evaluation's own dialogues are pi's samples; at T = 0.5 pi plays again at T = 1
    assert "kl_dialogues" not in hot["policies"]["sharp"]
    assert [r["dialogue"] for r in cool["policies"]["sharp"]["kl_dialogues"]] == \
        [r["dialogue"] for r in hot["policies"]["sharp"]["dialogues"]]
    assert "KL(pi || pi_ref) at temperature 1" in markdown_report(cool)


def test_both_orders_with_the_reward_judge_is_refused(word_lm_dir):
    spec = str(word_lm_dir)
    with pytest.raises(ValueError, match="both_orders=True .* needs a pairwise LLM judge, but the judge is the reward"):
        evaluate_policies({"p": spec}, spec, "reward", env_kwargs=ENV_KWARGS, num_prompts=1, horizon=1,
                          both_orders=True, progress=False)
    with pytest.raises(ValueError, match="judges one order only"):
        evaluate_policies({"p": spec}, spec, PairwiseJudge(ScriptedJudge("content")), env_kwargs=ENV_KWARGS,
                          num_prompts=1, horizon=1, both_orders=True, progress=False)


@pytest.fixture(scope="module")
def evaluate_script():
    """The module whose ``main`` scripts/evaluate.py and ``refuel-evaluate`` run (patched here, so the module itself)."""
    from refuel_agents.commands import evaluate

    return evaluate


def _script_error(evaluate_script, capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SystemExit) as err:
        evaluate_script.main(list(argv))
    return f"{err.value.code if isinstance(err.value.code, str) else ''}{capsys.readouterr().err}"


def test_script_errors_name_the_flag_the_value_and_what_to_pass(evaluate_script, capsys, monkeypatch, tmp_path):
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--judge", "gpt4")
    assert "--judge 'gpt4'" in err and "does not exist" in err and "--judge takes 'reward'" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--reference", str(tmp_path / "nope"))
    assert f"--reference '{tmp_path / 'nope'}'" in err and "--reference takes a model spec" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", f"mine={tmp_path / 'nope'}")
    assert "--policy" in err and "does not exist" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--env-kwargs", "notjson")
    assert "argument --env-kwargs: 'notjson' is not valid JSON" in err and "pass a JSON object such as" in err
    assert "invalid loads value" not in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--env-kwargs", "[1]")
    assert "argument --env-kwargs: '[1]' is JSON but not an object" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--num-prompts", "0")
    assert "argument --num-prompts: '0' is below 1; pass an integer >= 1" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--horizon", "two")
    assert "argument --horizon: 'two' is not a whole number" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--temperature", "-1")
    assert "argument --temperature: '-1' is not a finite number >= 0" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--both-orders")
    assert "--both-orders needs an LLM judge, but --judge is 'reward'" in err
    err = _script_error(evaluate_script, capsys, monkeypatch, "--policy", "embedded", "--judge", "embedded",
                        "--judge-template", str(tmp_path / "c5.txt"))
    assert f"--judge-template '{tmp_path / 'c5.txt'}'" in err and "nor an existing file" in err


def test_script_accepts_a_judge_template_file(evaluate_script, tmp_path, monkeypatch):
    template = tmp_path / "c5.txt"
    template.write_text("Dialogue A:\n{{dialoguea}}\nDialogue B:\n{{dialogueb}}\n")
    seen = {}
    monkeypatch.setattr(evaluate_script, "evaluate_policies", lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(
        ValueError("stop here")))
    with pytest.raises(SystemExit, match="stop here"):
        evaluate_script.main(["--policy", "embedded", "--judge", "embedded", "--judge-template", str(template),
                              "--max-dialogue-tokens", "4096"])
    assert seen["judge_template"] == template.read_text() and seen["max_dialogue_tokens"] == 4096


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_script_end_to_end(word_lm_dir, tmp_path):
    out = tmp_path / "eval"
    proc = _run_script("--policy", f"mine={word_lm_dir}", "--reference", str(word_lm_dir), "--judge", "reward",
                       "--num-prompts", "2", "--horizon", "2", "--max-new-tokens", "6",
                       "--env-kwargs", json.dumps(ENV_KWARGS), "--output-dir", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mine | 50.0 | 50.0 |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["num_prompts"] == 2 and results["config"]["horizon"] == 2
    assert results["config"]["judge"]["kind"] == "reward"
    mine = results["policies"]["mine"]
    assert set(mine["win_rate"]["per_turn"]) == {"1", "2"}
    assert all(mine["win_rate"]["per_turn"][h]["n"] == 2 for h in ("1", "2"))
    assert mine["kl"]["mean"] == 0.0 and isinstance(mine["rm_score"], float)
    assert len(mine["records"]) == 4 and len(mine["dialogues"]) == 2
    md = (out / "results.md").read_text()
    assert "| policy | h=1 | h=2 | avg | weighted avg |" in md and "Wilson" in md
    assert (out / "winrate_by_turn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_script_reports_bad_specs(tmp_path):
    missing = _run_script("--policy", str(tmp_path / "no-such-model"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    no_key = _run_script("--policy", "embedded", "--judge", "openai:gpt-4-0613")
    assert no_key.returncode != 0 and "OPENAI_API_KEY" in no_key.stderr
    bad = _run_script("--policy", "nosuchbackend:model")
    assert bad.returncode != 0 and "unknown model spec prefix" in bad.stderr
    assert "environment-only benchmarking" in _run_script("--help").stdout


# ------------------------------------------------------------------------------ a real judge


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_as_judge_is_parsed_or_counted(smollm2_dir):
    judge_model = TransformersGenerator.from_pretrained(str(smollm2_dir), device="cpu")
    u = {"role": "user", "content": "What is 12 times 3?"}
    right = [u, {"role": "assistant", "content": "12 times 3 is 36."}]
    wrong = [u, {"role": "assistant", "content": "I like turtles."}]
    judge = PairwiseJudge(judge_model, seed=0, both_orders=True, sampling=SamplingParams(max_new_tokens=48, temperature=0.0))
    records = judge.judge([Comparison(right, wrong, 1, 0, full=True), Comparison(wrong, right, 1, 1, full=True)])
    for r in records:
        assert all(isinstance(j["raw"], str) and j["raw"] for j in r["judgements"])
        for j in r["judgements"]:
            assert j["parsed"] == parse_preference(j["raw"])
        parsed = sum(j["parsed"] is not None for j in r["judgements"])
        assert r["parse_failures"] == 2 - parsed
        assert (r["outcome"] is None) == (parsed == 0)
        assert r["outcome"] in (None, 0.0, 0.5, 1.0)
    summary = win_rates(records)
    assert summary["n"] + summary["failures"] == 2
