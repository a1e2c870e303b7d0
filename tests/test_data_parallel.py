"""The data-parallel pieces that need no second process: shards, the global batch, the tuple layout."""

from __future__ import annotations

from collections import Counter

import pytest

from refuel_agents import distributed as dist
from refuel_agents.collection import CollectionStats
from refuel_agents.modes import ModeStats


def test_shards_are_disjoint_contiguous_and_cover_everything():
    items = list(range(10))
    blocks = [dist.shard(items, r, 3) for r in range(3)]
    assert [b[1] for b in blocks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [b[0] for b in blocks] == [0, 4, 7]
    assert dist.shard(items, 0, 1) == (0, items)
    with pytest.raises(ValueError, match="rank must be in"):
        dist.shard(items, 3, 3)


def test_merged_stats_add_counts_and_keep_what_describes_the_dataset():
    a = ModeStats(prompts=2, tuples=2, prompts_by_h=Counter({1: 2}), mode="lt-offline", usable_items=49,
                  unusable_items=Counter({"x": 3}))
    b = ModeStats(prompts=3, tuples=1, dropped_truncated=2, prompts_by_h=Counter({1: 1, 2: 2}), dropped_by_h=Counter({2: 2}),
                  mode="lt-offline", usable_items=49, unusable_items=Counter({"x": 3}))
    m = dist.merge_stats([a, b])
    assert (m.prompts, m.tuples, m.dropped_truncated, m.usable_items) == (5, 3, 2, 49)
    assert m.prompts_by_h == Counter({1: 3, 2: 2}) and m.unusable_items == Counter({"x": 3})
    assert m.as_dict()["drop_rate_by_h"] == {"1": 0.0, "2": 1.0}
    assert dist.merge_stats([CollectionStats(prompts=1)]).prompts == 1


def test_tuples_of_several_ranks_load_as_one_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"item_id": "a", "rank": 0}]).save_to_disk(str(tmp_path / "one"))
    assert dist.load_tuples(tmp_path / "one")["item_id"] == ["a"]
    tuples = tmp_path / "tuples"
    for r, ids in enumerate([["a", "b"], ["c"]]):
        datasets.Dataset.from_list([{"item_id": i, "rank": r, "note": None} for i in ids]).save_to_disk(
            str(dist.shard_dir(tuples, r, 2)))
    loaded = dist.load_tuples(tuples)
    assert loaded["item_id"] == ["a", "b", "c"] and loaded["rank"] == [0, 0, 1]
    import shutil

    shutil.rmtree(dist.shard_dir(tuples, 1, 2))
    with pytest.raises(FileNotFoundError, match="1 of 2 rank shards"):
        dist.load_tuples(tuples)


def test_a_global_batch_that_the_ranks_cannot_share_is_refused(word_lm_dir, tmp_path, monkeypatch):
    from refuel_agents.baselines import make_trainer

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    small = {"policy_model": str(word_lm_dir), "env_kwargs": {"user": "instant", "max_turns": 2, "tokenizer": None},
             "device": "cpu", "output_dir": str(tmp_path), "micro_batch_size": 1}
    with pytest.raises(ValueError, match=r"batch_size=6 is the global batch over 4 ranks.*--batch-size 8"):
        make_trainer("refuel", None, batch_size=6, **small)
    trainer = make_trainer("refuel", None, batch_size=8, **small)
    assert (trainer.rank_batch_size, trainer.world) == (2, 4)
    with pytest.raises(ValueError, match="3 prompts for 4 ranks"):
        trainer.rank_prompts([0, 1, 2], 0)
    assert trainer.rank_prompts([5, 6, 7, 8, 9], 0)[0] == [5, 6]


def test_rows_of_uneven_shards_are_shared_out_and_used_evenly(word_lm_dir, tmp_path, monkeypatch):
    """Kept counts [5, 3, 4, 0] on 4 ranks, 4 epochs, global batch 4: each rank trains on one row per update, and
    every row of the 12 is used 4 times, in the order a one-rank run draws."""
    from refuel_agents.baselines import make_trainer

    small = {"policy_model": str(word_lm_dir), "env_kwargs": {"user": "instant", "max_turns": 2, "tokenizer": None},
             "device": "cpu", "output_dir": str(tmp_path), "micro_batch_size": 1, "batch_size": 4, "epochs": 4}
    one = make_trainer("refuel", None, **small)
    monkeypatch.setenv("WORLD_SIZE", "4")
    four = make_trainer("refuel", None, **small)
    steps = four._steps_for(12)
    assert steps == 12
    parts = [four._minibatch_order(3, 12, steps, rank=r) for r in range(4)]
    assert [len(p) for p in parts] == [steps] * 4
    assert Counter(i for p in parts for i in p) == dict.fromkeys(range(12), 4)
    assert [p[s] for s in range(steps) for p in parts] == one._minibatch_order(3, 12) == four._minibatch_order(
        3, 12, steps, every_rank=True)
    assert dist.rank_slices(list(range(8)), 4, 1, 2) == [2, 3, 6, 7]


def test_one_rank_keeps_its_own_rows_when_shared():
    rows = [{"a": 0}, {"a": 1}]
    got = dist.share_rows(rows, 5, [[6, 5, 6]])
    assert got == {5: rows[0], 6: rows[1]} and got[5] is rows[0]


def test_a_rank_without_rows_stores_that_it_has_none(tmp_path):
    import datasets

    from refuel_agents.checkpoint import check_stored_tuples

    tuples = tmp_path / "tuples"
    datasets.Dataset.from_list([{"item_id": "a", "rank": 0}]).save_to_disk(str(dist.shard_dir(tuples, 0, 2)))
    dist.store_empty_shard(dist.shard_dir(tuples, 1, 2))
    check_stored_tuples(dist.shard_dir(tuples, 1, 2))  # (a resume accepts it)
    assert dist.load_tuples(dist.shard_dir(tuples, 1, 2)).to_list() == []
    assert dist.load_tuples(tuples)["item_id"] == ["a"]
