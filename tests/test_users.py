"""Simulated users: the Question: parser, its fallback, prompts, and the pre-sampled user."""

from __future__ import annotations

import pytest

from refuel_env.generation import SamplingParams
from refuel_env.types import DialogueItem
from refuel_env.users import (
    FALLBACK_QUESTION,
    ROLE_SWAP_CUE,
    LLMUser,
    PresampledUser,
    UserRequest,
    format_dialogue,
    parse_user_output,
)


@pytest.mark.parametrize(
    "raw, question",
    [
        ("Justification: I want more.\nQuestion: What is 3 + 4?", "What is 3 + 4?"),
        ("Justification: x\n\nQuestion:   Why does the loop stop?  ", "Why does the loop stop?"),
        ("**Justification:** x\n**Question:** How do I test it?", "How do I test it?"),
        ("question: lower case works too?", "lower case works too?"),
        ("Question: first?\nQuestion: second one?", "second one?"),
    ],
)
def test_paper_style_parses_question_line(raw, question):
    turn = parse_user_output(raw, "paper")
    assert (turn.text, turn.parsed, turn.fallback) == (question, True, "")


@pytest.mark.parametrize(
    "raw, text, fallback",
    [
        ("I would ask about primes. Is 7 prime? Sure.", "Is 7 prime?", "question_sentence"),
        ("Justification: none\nQuestion:", FALLBACK_QUESTION, "generic"),
        ("", FALLBACK_QUESTION, "generic"),
        ("The answer is 84.", FALLBACK_QUESTION, "generic"),
    ],
)
def test_paper_style_fallback(raw, text, fallback):
    turn = parse_user_output(raw, "paper")
    assert (turn.text, turn.parsed, turn.fallback, turn.raw) == (text, False, fallback, raw)


def test_role_swap_style():
    assert parse_user_output("Why is that? I wonder.", "role-swap").text == "Why is that?"
    assert parse_user_output("Question: Can you show code?", "role-swap").parsed
    failed = parse_user_output("Thanks, that helps.", "role-swap")
    assert (failed.parsed, failed.text) == (False, FALLBACK_QUESTION)


MESSAGES = (
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": "84."},
)


def test_prompts(tiny_generator):
    paper = LLMUser(tiny_generator, style="paper").build_prompt(MESSAGES)
    assert len(paper) == 1 and paper[0]["role"] == "user"
    assert "User: What is 12 * 7?\n\nAssistant: 84." in paper[0]["content"]
    assert "Question: <question to ask next>" in paper[0]["content"]
    swapped = LLMUser(tiny_generator, style="role-swap").build_prompt(MESSAGES)
    assert [m["role"] for m in swapped] == ["system", "assistant", "user"]
    assert swapped[1]["content"] == "What is 12 * 7?"
    assert swapped[2]["content"] == "84.\n\n" + ROLE_SWAP_CUE
    assert format_dialogue(MESSAGES).startswith("User:")
    with pytest.raises(ValueError, match="prompt style"):
        LLMUser(tiny_generator, style="pirate")


def test_llm_user_is_seeded_and_batched(tiny_generator):
    user = LLMUser(tiny_generator, sampling=SamplingParams(max_new_tokens=10, temperature=1.0))
    item = DialogueItem(item_id="x", source="t", questions=("q",))
    reqs = [UserRequest(messages=MESSAGES, item=item, turn=1, seed=s) for s in (3, 4)]
    a, b = user.respond(reqs), user.respond(reqs)
    assert a == b
    assert a[0].raw != a[1].raw
    assert a[0].prompt_tokens > 0 and a[0].completion_tokens == 10
    assert user.max_prompt_tokens == tiny_generator.max_context - 10


def test_presampled_user_asks_dataset_questions_in_order():
    item = DialogueItem(item_id="hh-1", source="t", questions=("q1", "q2", "q3"))
    user = PresampledUser()
    turns = user.respond([UserRequest(MESSAGES, item, turn=1, seed=0), UserRequest(MESSAGES, item, turn=2, seed=9)])
    assert [t.text for t in turns] == ["q2", "q3"]
    with pytest.raises(ValueError, match="has 3 questions"):
        user.respond([UserRequest(MESSAGES, item, turn=3, seed=0)])
