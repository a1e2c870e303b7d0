"""Dataset loaders on the shipped samples and on small files written here: offline and fast."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from refuel_env import data
from refuel_env.data import (
    ANTHROPIC_HH_SAMPLE,
    SETTING_ONE_MAX_DIALOGUE_TOKENS,
    SETTING_TWO_HH_MAX_PROMPT_TOKENS,
    SETTING_TWO_HH_MAX_RESPONSE_TOKENS,
    SETTING_TWO_ULTRAINTERACT_MAX_DIALOGUE_TOKENS,
    ULTRAINTERACT_SAMPLE,
    DataError,
    load_anthropic_hh,
    load_items,
    load_ultrainteract,
    split_of,
)


def words(text: str) -> int:
    return len(text.split())


def raw_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ui_row(row_id: str = "abc_1_1", **changes: Any) -> dict[str, Any]:
    row = {
        "id": row_id,
        "parent_id": row_id.split("_")[0],
        "task": "Math_CoT",
        "dataset": "test",
        "trajectory": [{"from": "user", "value": "What is 2 + 3?"}],
        "chosen": "2 + 3 = 5.\nAnswer:\n\\boxed{5}",
        "rejected": "2 + 3 = 6.\nAnswer:\n\\boxed{6}",
    }
    row.update(changes)
    return row


def hh_row(**changes: Any) -> dict[str, Any]:
    row = {
        "prompt": [{"role": "user", "content": "Hi, can you help me?"}],
        "chosen": [{"role": "assistant", "content": "Of course, what do you need?"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    row.update(changes)
    return row


# ----------------------------------------------------------------------------- shipped samples


def test_ultrainteract_sample_matches_the_raw_rows():
    raw = raw_rows(ULTRAINTERACT_SAMPLE)
    items = load_ultrainteract(split="all", max_turns=None)
    assert len(items) == len(raw) >= 50
    for row, item in zip(raw, items):
        users = [t["value"] for t in row["trajectory"] if t["from"] == "user"]
        assistants = [t["value"] for t in row["trajectory"] if t["from"] == "assistant"]
        assert item.item_id == row["id"]
        assert item.source == "ultrainteract_pair"
        assert item.questions == tuple(users)
        assert item.responses == (*assistants, row["chosen"])
        assert (item.chosen, item.rejected) == (row["chosen"], row["rejected"])
        assert dict(item.meta)["parent_id"] == row["parent_id"]
        assert dict(item.meta)["ultrainteract_task"] == row["task"]


def test_ultrainteract_sample_covers_tasks_and_multi_turn_dialogues():
    items = load_ultrainteract(split="all")
    assert Counter(item.task for item in items).keys() == {"math", "coding", "logic"}
    assert min(Counter(item.task for item in items).values()) >= 10
    turns = Counter(item.num_turns for item in items)
    assert turns[1] >= 30 and sum(n for t, n in turns.items() if t > 1) >= 10 and max(turns) >= 3
    for item in items:
        assert item.chosen != item.rejected
        for question in item.questions[1:]:
            assert question.startswith(("Your answer is wrong", "Out:"))


def test_ultrainteract_sample_answers_are_consistent():
    """Math items box an answer in chosen and a different one in rejected; code blocks compile."""
    for item in load_ultrainteract(split="all"):
        task = dict(item.meta)["ultrainteract_task"]
        if item.task == "math":
            chosen = re.findall(r"\\boxed\{(.+)\}", item.chosen or "")
            rejected = re.findall(r"\\boxed\{(.+)\}", item.rejected or "")
            assert chosen and rejected and chosen != rejected, item.item_id
        if task in ("Coding", "Math_PoT"):
            for text in (item.chosen, item.rejected):
                for block in re.findall(r"```python\n(.*?)```", text or "", re.S):
                    compile(block, item.item_id, "exec")
            assert "```python" in (item.chosen or "")


def test_anthropic_hh_sample_matches_the_raw_rows():
    raw = raw_rows(ANTHROPIC_HH_SAMPLE)
    items = load_anthropic_hh(split="all")
    assert len(items) == len(raw) >= 30
    for row, item in zip(raw, items):
        prompt = row["prompt"]
        assert item.questions == tuple(m["content"] for m in prompt if m["role"] == "user")
        assert item.responses[:-1] == tuple(m["content"] for m in prompt if m["role"] == "assistant")
        assert item.responses[-1] == item.chosen == row["chosen"][0]["content"]
        assert item.rejected == row["rejected"][0]["content"]
        assert item.task == "general" and item.source == "anthropic_hh"
        assert item.item_id.startswith("hh-")
    assert len({item.item_id for item in items}) == len(items)
    assert set(Counter(item.num_turns for item in items)) == {1, 2, 3, 4, 5}


def test_anthropic_hh_ids_are_stable():
    first = [item.item_id for item in load_anthropic_hh(split="all")]
    second = [item.item_id for item in load_anthropic_hh(split="all")]
    assert first == second


def test_prefix_of_loaded_items_rebuilds_the_dataset_state():
    hh = next(item for item in load_anthropic_hh(split="all") if item.num_turns == 3)
    raw = next(row for row in raw_rows(ANTHROPIC_HH_SAMPLE) if row["prompt"][0]["content"] == hh.questions[0])
    assert hh.prefix(3) == raw["prompt"]
    assert hh.prefix(1) == [{"role": "user", "content": hh.questions[0]}]

    ui = next(item for item in load_ultrainteract(split="all") if item.num_turns == 3)
    assert [m["role"] for m in ui.prefix(3)] == ["user", "assistant", "user", "assistant", "user"]
    assert ui.prefix(2)[1]["content"] == ui.responses[0]
    assert ui.prefix(3)[-1]["content"] == ui.questions[2]


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("dataset", ["ultrainteract", "anthropic_hh"])
def test_splits_are_disjoint_complete_and_deterministic(dataset):
    train = {item.item_id for item in load_items(dataset, split="train")}
    test = {item.item_id for item in load_items(dataset, split="test")}
    everything = {item.item_id for item in load_items(dataset, split="all")}
    assert train and test
    assert not train & test
    assert train | test == everything
    assert test == {item.item_id for item in load_items(dataset, split="test")}
    wider = {item.item_id for item in load_items(dataset, split="test", test_fraction=0.5)}
    assert test < wider < everything


def test_ultrainteract_rows_with_one_instruction_stay_in_one_split():
    by_parent: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for item in load_ultrainteract(split=split):
            by_parent.setdefault(dict(item.meta)["parent_id"], set()).add(split)
    counts = Counter(row["parent_id"] for row in raw_rows(ULTRAINTERACT_SAMPLE))
    assert any(n > 1 for n in counts.values())
    assert all(len(splits) == 1 for splits in by_parent.values())


def test_split_of_is_a_stable_fraction():
    keys = [f"key-{i}" for i in range(5000)]
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert 0.08 < share < 0.12
    assert [split_of(k) for k in keys[:50]] == [split_of(k) for k in keys[:50]]


def test_split_report_counts_the_other_split():
    items = load_ultrainteract(split="test")
    assert (
        items.report.other_split + items.report.kept
        == items.report.rows_read
        == len(raw_rows(ULTRAINTERACT_SAMPLE))
    )


# ----------------------------------------------------------------------------- filters


def test_max_turns_filter_drops_and_reports():
    raw = raw_rows(ULTRAINTERACT_SAMPLE)
    multi = sum(len(row["trajectory"]) > 1 for row in raw)
    items = load_ultrainteract(split="all", max_turns=1)
    assert all(item.num_turns == 1 for item in items)
    assert items.report.dropped == {"max_turns": multi}
    assert items.report.kept == len(items) == len(raw) - multi


def test_dialogue_token_filter_matches_a_direct_count(caplog):
    def dialogue_words(row):
        return sum(words(t["value"]) for t in row["trajectory"]) + max(
            words(row["chosen"]), words(row["rejected"])
        )

    lengths = [dialogue_words(row) for row in raw_rows(ULTRAINTERACT_SAMPLE)]
    limit = sorted(lengths)[len(lengths) // 2]
    with caplog.at_level(logging.WARNING, logger="refuel_env.data"):
        items = load_ultrainteract(split="all", max_turns=None, max_dialogue_tokens=limit, count_tokens=words)
    expected = sum(n > limit for n in lengths)
    assert expected > 0
    assert items.report.dropped == {"max_dialogue_tokens": expected}
    assert len(items) == len(lengths) - expected
    assert f"max_dialogue_tokens: {expected}" in caplog.text


def test_dialogue_length_counts_the_longer_last_reply(tmp_path):
    """A dialogue fits only if it fits with either last reply, chosen or rejected."""
    long_rejected = ui_row("b_1_1", rejected="no " * 50)
    path = write_jsonl(tmp_path / "rows.jsonl", [ui_row("a_1_1"), long_rejected])
    items = load_ultrainteract(path, split="all", max_dialogue_tokens=30, count_tokens=words)
    assert [item.item_id for item in items] == ["a_1_1"]
    assert items.report.dropped == {"max_turns": 0, "max_dialogue_tokens": 1}


def test_hh_prompt_and_response_filters_match_a_direct_count():
    rows = raw_rows(ANTHROPIC_HH_SAMPLE)
    max_prompt, max_response = 12, 40
    expected = Counter()
    for row in rows:
        users = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        replies = [m["content"] for m in row["prompt"] if m["role"] == "assistant"]
        replies += [row["chosen"][0]["content"], row["rejected"][0]["content"]]
        if max(map(words, users)) > max_prompt:
            expected["max_prompt_tokens"] += 1
        elif max(map(words, replies)) > max_response:
            expected["max_response_tokens"] += 1
    items = load_anthropic_hh(
        split="all", max_prompt_tokens=max_prompt, max_response_tokens=max_response, count_tokens=words
    )
    assert expected["max_prompt_tokens"] > 0 and expected["max_response_tokens"] > 0
    assert items.report.dropped == {"max_turns": 0, **expected}
    assert len(items) == len(rows) - sum(expected.values())
    for item in items:
        assert max(map(words, item.questions)) <= max_prompt
        assert max(map(words, (*item.responses, item.rejected))) <= max_response


def test_paper_limits_keep_the_short_samples():
    hh = load_anthropic_hh(
        split="all",
        max_prompt_tokens=SETTING_TWO_HH_MAX_PROMPT_TOKENS,
        max_response_tokens=SETTING_TWO_HH_MAX_RESPONSE_TOKENS,
        count_tokens=words,
    )
    assert hh.report.total_dropped == 0 and len(hh) == len(raw_rows(ANTHROPIC_HH_SAMPLE))
    for limit in (SETTING_ONE_MAX_DIALOGUE_TOKENS, SETTING_TWO_ULTRAINTERACT_MAX_DIALOGUE_TOKENS):
        ui = load_ultrainteract(split="all", max_dialogue_tokens=limit, count_tokens=words)
        assert ui.report.total_dropped == 0 and len(ui) == len(raw_rows(ULTRAINTERACT_SAMPLE))


def test_token_limit_needs_a_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        load_ultrainteract(max_dialogue_tokens=100)


def test_limit_stops_early_and_says_so():
    everything = load_ultrainteract(split="all")
    first = load_ultrainteract(split="all", limit=5)
    assert [i.item_id for i in first] == [i.item_id for i in everything[:5]]
    assert first.report.limit_reached and not everything.report.limit_reached


# ----------------------------------------------------------------------------- malformed rows


def _no_chosen(row):
    del row["chosen"]


BAD_UI_ROWS = {
    "missing field": (_no_chosen, "missing field 'chosen'"),
    "roles do not alternate": (
        lambda row: row.update(trajectory=[{"from": "user", "value": "a"}, {"from": "user", "value": "b"}]),
        "trajectory[1] has role 'user' where 'assistant' was expected",
    ),
    "ends with assistant": (
        lambda row: row["trajectory"].append({"from": "assistant", "value": "hi"}),
        "must end with a user turn",
    ),
    "unknown role": (
        lambda row: row.update(trajectory=[{"from": "gpt", "value": "a"}]),
        "has from 'gpt'",
    ),
    "empty text": (lambda row: row.update(rejected="   "), "field 'rejected' is empty"),
    "wrong type": (lambda row: row.update(chosen=5), "field 'chosen' must be a str, got int"),
    "unknown task": (lambda row: row.update(task="Poetry"), "unknown task 'Poetry'"),
}


@pytest.mark.parametrize("case", sorted(BAD_UI_ROWS))
def test_malformed_ultrainteract_row_raises_naming_the_row(tmp_path, case):
    corrupt, problem = BAD_UI_ROWS[case]
    bad = ui_row("bad_1_1")
    corrupt(bad)
    path = write_jsonl(tmp_path / "rows.jsonl", [ui_row("a_1_1"), ui_row("b_1_1"), bad])
    with pytest.raises(DataError) as caught:
        load_ultrainteract(path, split="all")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "row 2" in message and "'bad_1_1'" in message and str(path) in message
    assert problem in message
    assert "on_malformed='skip'" in message


BAD_HH_ROWS = {
    "prompt roles": (
        hh_row(prompt=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        "prompt[1] has role 'user' where 'assistant' was expected",
    ),
    "two replies": (
        hh_row(chosen=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
        "chosen must hold exactly one assistant message",
    ),
    "missing rejected": (
        {"prompt": hh_row()["prompt"], "chosen": hh_row()["chosen"]},
        "missing field 'rejected'",
    ),
    "empty content": (hh_row(rejected=[{"role": "assistant", "content": ""}]), "rejected[0] is empty"),
    "implicit prefixes differ": (
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}],
        },
        "differ before their last message",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HH_ROWS))
def test_malformed_hh_row_raises_naming_the_row(tmp_path, case):
    bad, problem = BAD_HH_ROWS[case]
    good = (
        hh_row()
        if "prompt" in bad
        else {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}],
        }
    )
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad])
    with pytest.raises(DataError, match=re.escape(problem)) as caught:
        load_anthropic_hh(path, split="all")
    assert "anthropic_hh row 1" in str(caught.value)


def test_skip_mode_drops_and_counts_malformed_rows(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "rows.jsonl", [ui_row("a_1_1"), ui_row("bad_1_1", chosen=""), ui_row("c_1_1")]
    )
    with caplog.at_level(logging.WARNING, logger="refuel_env.data"):
        items = load_ultrainteract(path, split="all", on_malformed="skip")
    assert [item.item_id for item in items] == ["a_1_1", "c_1_1"]
    assert items.report.malformed_skipped == 1
    assert "'bad_1_1'" in caplog.text


def test_unreadable_file_and_missing_path(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ui_row()) + "\n{not json\n")
    with pytest.raises(DataError, match="could not be read"):
        load_ultrainteract(broken, split="all")
    with pytest.raises(FileNotFoundError):
        load_ultrainteract(tmp_path / "nowhere.jsonl")


# ----------------------------------------------------------------------------- other formats and sources


def test_implicit_prompt_hh_format_gives_the_same_items(tmp_path):
    rows = []
    for row in raw_rows(ANTHROPIC_HH_SAMPLE):
        rows.append(
            {
                "chosen": row["prompt"] + row["chosen"],
                "rejected": row["prompt"] + row["rejected"],
                "prompt": row["prompt"][0]["content"],
            }
        )
    implicit = load_anthropic_hh(write_jsonl(tmp_path / "trl_style.jsonl", rows), split="all")
    assert list(implicit) == list(load_anthropic_hh(split="all"))


def test_hh_leading_system_message(tmp_path):
    row = hh_row(prompt=[{"role": "system", "content": "Be brief."}, *hh_row()["prompt"]])
    (item,) = load_anthropic_hh(write_jsonl(tmp_path / "rows.jsonl", [row]), split="all")
    assert item.system == "Be brief."
    assert item.prefix(1)[0] == {"role": "system", "content": "Be brief."}


def test_ultrainteract_sft_rows(tmp_path):
    rows = [
        {
            "id": "s_1_1",
            "parent_id": "s",
            "task": "Coding",
            "dataset": "x",
            "instruction": "Write hi.",
            "response": "print('hi')",
        },
        {
            "id": "t_1_1",
            "parent_id": "t",
            "task": "Math_PoT",
            "dataset": "x",
            "instruction": "1+1?",
            "response": "2",
        },
    ]
    items = load_ultrainteract(write_jsonl(tmp_path / "sft.jsonl", rows), variant="sft", split="all")
    assert [(i.item_id, i.questions, i.responses, i.task, i.chosen) for i in items] == [
        ("s_1_1", ("Write hi.",), ("print('hi')",), "coding", None),
        ("t_1_1", ("1+1?",), ("2",), "math", None),
    ]
    assert items[0].source == "ultrainteract_sft"
    with pytest.raises(ValueError, match="no shipped UltraInteract_sft sample"):
        load_ultrainteract(variant="sft")


def test_duplicate_ids_are_renamed_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [ui_row("a_1_1"), ui_row("a_1_1"), ui_row("a_1_1")])
    items = load_ultrainteract(path, split="all")
    assert [item.item_id for item in items] == ["a_1_1", "a_1_1#2", "a_1_1#3"]
    assert items.report.renamed_duplicates == 2


def test_folder_source_reads_every_file(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", [ui_row("a_1_1")])
    write_jsonl(tmp_path / "part2.jsonl", [ui_row("b_1_1"), ui_row("c_1_1")])
    items = load_ultrainteract(tmp_path, split="all")
    assert sorted(item.item_id for item in items) == ["a_1_1", "b_1_1", "c_1_1"]


def test_hub_sources_use_the_real_ids_and_splits(monkeypatch):
    """The hub path calls datasets.load_dataset with the hub id; HH keeps the hub's own split."""
    import datasets

    calls = []
    samples = {
        "openbmb/UltraInteract_pair": ULTRAINTERACT_SAMPLE,
        "trl-internal-testing/hh-rlhf-trl-style": ANTHROPIC_HH_SAMPLE,
    }

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return raw_rows(samples[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ui_test = load_ultrainteract("hub", split="test")
    hh_test = load_anthropic_hh("hub", split="test")
    hh_all = load_anthropic_hh("hub", split="all")
    assert calls == [
        ("openbmb/UltraInteract_pair", "train"),
        ("trl-internal-testing/hh-rlhf-trl-style", "test"),
        ("trl-internal-testing/hh-rlhf-trl-style", "train+test"),
    ]
    assert 0 < len(ui_test) < len(raw_rows(ULTRAINTERACT_SAMPLE))
    assert len(hh_test) == len(raw_rows(ANTHROPIC_HH_SAMPLE)) and hh_test.report.split == "test"
    assert hh_all.report.other_split == 0


def test_load_items_dispatches_and_rejects_unknown_names():
    assert load_items("anthropic_hh", split="all") == load_anthropic_hh(split="all")
    assert load_items("ultrainteract", limit=3) == load_ultrainteract(limit=3)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_items("mmlu")


@pytest.mark.parametrize(
    "kwargs",
    [{"split": "dev"}, {"limit": -1}, {"test_fraction": 1.0}, {"max_turns": 0}, {"on_malformed": "ignore"}],
)
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        data.load_ultrainteract(**kwargs)
