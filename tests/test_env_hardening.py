"""The environment under hostile use: copies of observations, atomic steps, async vectorisation,
pre-sampled horizons, and one table of bad inputs, each refused with a clear error that loses nothing.

A new argument or option gets a row in ``BAD_INPUTS``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import refuel_env  # noqa: F401
from refuel_env.data import ULTRAINTERACT_SAMPLE, DataError, load_items, split_of
from refuel_env.rewards import RewardModelError, TrajectoryRewardModel
from refuel_env.snapshot import SnapshotError
from refuel_env.synthetic import UTILITY
from refuel_env.types import DialogueItem

PRESAMPLED = "UltraInteractPresampled-v0"
SYNTHETIC = "SyntheticDialogue-v0"


class LengthReward(TrajectoryRewardModel):
    """A cheap reward: the last response's length in characters."""

    name = "length"
    max_length = None

    def _score(self, dialogues):
        return np.array([float(len(d[-1]["content"])) for d in dialogues])

    def count_tokens(self, dialogue):
        return sum(len(m["content"]) for m in dialogue)


class ScriptedReward(TrajectoryRewardModel):
    """Returns ``value`` for a dialogue whose last response is ``"boom"``, else 1.0."""

    max_length = None

    def __init__(self, value: Any):
        self.value = value
        self.name = f"scripted-{value!r}"

    def _score(self, dialogues):
        return [self.value if d[-1]["content"] == "boom" else 1.0 for d in dialogues]

    def count_tokens(self, dialogue):
        return 1


def make(env_id: str = PRESAMPLED, **kwargs):
    if env_id != SYNTHETIC:
        kwargs.setdefault("reward_model", LengthReward())
    return gym.make(env_id, disable_env_checker=True, **kwargs).unwrapped


def make_vec(env_id: str = PRESAMPLED, num_envs: int = 3, **kwargs):
    if env_id != SYNTHETIC:
        kwargs.setdefault("reward_model", LengthReward())
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs).unwrapped


# ---------------------------------------------------------------- observations are copies


def test_changing_an_observation_changes_nothing_in_the_env():
    """Renaming the user's state in the returned observation must not change the reward (0.2 -> 2.0)."""
    env = make(SYNTHETIC)
    index = next(i for i, item in enumerate(env.core.items) if item.questions[0] == "vague")
    obs, _ = env.reset(seed=0, options={"index": index, "horizon": 1})
    obs[0]["content"] = "clear"
    _, reward, terminated, _, _ = env.step("answer")
    assert terminated and reward == UTILITY["vague"]["answer"] == 0.2

    vec = make_vec(SYNTHETIC, num_envs=2)
    obs, _ = vec.reset(seed=0, options={"index": index, "horizon": [1, 2]})
    obs[0][0]["content"] = "clear"
    obs[1].append({"role": "assistant", "content": "ask"})
    _, rewards, terminated, _, _ = vec.step(["answer", "hint"])
    assert terminated[0] and rewards[0] == 0.2
    assert [m["content"] for m in vec.snapshot(1).messages][:2] == ["vague", "hint"]


# ---------------------------------------------------------------- atomic vector step


def test_failed_vector_step_after_an_autoreset_changes_nothing():
    """Env 0 autoresets while env 1's reward is NaN: the step fails and every sub-env stays as it was;
    the retry gives env 0 the episode its single-env twin gets."""
    kwargs = {"user": "instant", "reward_model": ScriptedReward(float("nan"))}
    vec = make_vec(num_envs=2, **kwargs)
    vec.reset(seed=5, options={"horizon": [1, 2]})
    vec.step(["first", "first"])
    assert vec._autoreset.tolist() == [True, False]
    before = ([vec.snapshot(i) for i in range(2)], [r.bit_generator.state for r in vec._rngs])
    with pytest.raises(RewardModelError, match="NaN"):
        vec.step(["ignored", "boom"])
    assert vec._autoreset.tolist() == [True, False]
    assert ([vec.snapshot(i) for i in range(2)], [r.bit_generator.state for r in vec._rngs]) == before
    obs, rewards, terminated, _, info = vec.step(["ignored", "fine"])

    twin = make(**kwargs)
    twin.reset(seed=5, options={"horizon": 1})
    twin.step("first")
    twin_obs, twin_info = twin.reset()
    assert obs[0] == twin_obs and rewards[0] == 0.0
    assert (info["item_id"][0], info["horizon"][0]) == (twin_info["item_id"], twin_info["horizon"])
    assert terminated[1] and rewards[1] == 1.0


# ---------------------------------------------------------------- seeds agree


def test_numpy_int_seeds_work_alike_in_single_and_vector_envs():
    env, vec = make(SYNTHETIC), make_vec(SYNTHETIC, num_envs=2)
    assert env.reset(seed=np.int64(4)) == env.reset(seed=4)
    a, b = vec.reset(seed=np.int64(4)), vec.reset(seed=4)
    assert a[0] == b[0] and list(a[1]["item_id"]) == list(b[1]["item_id"])
    obs, _ = vec.reset(seed=[np.int64(4), None])
    assert obs[0] == env.reset(seed=4)[0]


# ---------------------------------------------------------------- pre-sampled horizon


@pytest.mark.parametrize("env_id", ["UltraInteractPresampled-v0", "AnthropicHHPresampled-v0"])
def test_presampled_horizon_is_the_items_number_of_turns(env_id):
    env = make(env_id, max_turns=3)
    env.reset(seed=0)
    assert len({item.num_turns for item in env.core.items}) >= 2
    for index, item in enumerate(env.core.items):
        _, info = env.reset(options={"index": index})
        assert info["horizon"] == item.num_turns, item.item_id
    long = next(i for i, item in enumerate(env.core.items) if item.num_turns >= 2)
    assert env.reset(options={"index": long, "horizon": 1})[1]["horizon"] == 1  # the option still overrides
    four = DialogueItem(item_id="four", source="test", questions=("a?", "b?", "c?", "d?"))
    assert env.reset(options={"item": four})[1]["horizon"] == 3  # capped at max_turns
    vec = make_vec(env_id, num_envs=2, max_turns=3)
    _, info = vec.reset(seed=0, options={"index": [long, long]})
    assert info["horizon"].tolist() == [env.core.items[long].num_turns] * 2


# ---------------------------------------------------------------- async vectorisation


def _play(vec, steps: int):
    out = [vec.reset(seed=3)]
    for t in range(steps):
        out.append(vec.step(tuple(["answer", "ask", "hint"][(t + i) % 3] for i in range(vec.num_envs))))
    return out


def _comparable(record):
    obs, *rest = record
    info = rest[-1]
    keys = ("turn", "horizon", "item_id")
    return [list(o) for o in obs], [np.asarray(x).tolist() for x in rest[:-1]], {k: list(info[k]) for k in keys}


@pytest.mark.parametrize("env_id", [SYNTHETIC, PRESAMPLED])
def test_sync_async_and_vector_entry_point_agree(env_id):
    kwargs = {} if env_id == SYNTHETIC else {"reward_model": LengthReward(), "user": "instant"}
    runs = {}
    for mode, vector_kwargs in (
        ("vector_entry_point", None),
        ("sync", None),
        ("async", None),
        ("async", {"shared_memory": False}),
    ):
        vec = gym.make_vec(env_id, num_envs=2, vectorization_mode=mode, vector_kwargs=vector_kwargs, **kwargs)
        try:
            runs[f"{mode} {vector_kwargs}"] = [_comparable(r) for r in _play(vec, 6)]
        finally:
            vec.close()
    first, *others = runs.values()
    assert all(other == first for other in others), list(runs)
    assert any(any(r[1][1]) for r in first[1:]), "some episode should have ended (autoreset covered)"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_refused_step_changes_no_sub_env_in_gymnasiums_modes(mode):
    """Gymnasium's sync and async vector envs step their sub-envs one by one: a bad action for env 1
    must be refused before env 0 steps (it went from turn 1 to 2), and async must stay usable."""
    vec = gym.make_vec(SYNTHETIC, num_envs=2, vectorization_mode=mode)
    try:
        vec.reset(seed=0, options={"horizon": 3})
        before = vec.call("snapshot")
        for actions, error, match in (
            (["ask", "x\ud800"], ValueError, r"env 1: the action is outside the action space \(Prose\): it is not valid Unicode"),
            (["ask", "x" * 100_001], ValueError, "env 1: the action is outside the action space .*100,001 characters"),
            (["ask", 7], TypeError, "env 1: the action must be the assistant's message as a str, got int"),
            (["ask"], ValueError, r"step\(\) takes a sequence of 2 actions \(one per sub-environment\)"),
            ("ab", ValueError, r"step\(\) takes a sequence of 2 actions"),
        ):
            with pytest.raises(error, match=match):
                vec.step(actions)
            assert vec.call("snapshot") == before, f"{actions!r:.40} changed a sub-environment"
        vec.step(["ask", "hint"])
        assert [snap.turn for snap in vec.call("snapshot")] == [2, 2]
    finally:
        vec.close()


# ---------------------------------------------------------------- snapshots between equal configurations

_FILTERS = {"max_prompt_tokens": 600, "max_dialogue_tokens": 2000}


@pytest.mark.parametrize(
    ("env_id", "first", "second"),
    [
        (PRESAMPLED, {"kl_coef": 0}, {"kl_coef": 0.0}),
        (PRESAMPLED, {"max_turns": np.int64(5)}, {"max_turns": 5}),
        (PRESAMPLED, {"data_filters": _FILTERS}, {"data_filters": dict(reversed(_FILTERS.items()))}),
        (SYNTHETIC, {"kl_coef": 0, "max_turns": np.int64(2)}, {"kl_coef": 0.0, "max_turns": 2}),
    ],
    ids=["kl_coef 0 and 0.0", "max_turns np.int64", "data_filters order", "synthetic"],
)
def test_a_snapshot_restores_into_an_env_made_with_equal_arguments(env_id, first, second):
    source, target = make(env_id, **first), make(env_id, **second)
    source.reset(seed=0)
    snap = source.snapshot()
    target.reset(options={"snapshot": snap})
    assert target.snapshot() == snap
    other = make(env_id, kl_coef=0.5)  # a different configuration is still refused
    with pytest.raises(SnapshotError, match="restore it into an environment made with the same id and arguments"):
        other.reset(options={"snapshot": snap})


class TorchReward(TrajectoryRewardModel):
    """A reward computed by a small torch model: a forward big enough to run on torch's thread pool."""

    name = "torch-sum"
    max_length = None

    def _score(self, dialogues):
        import torch

        torch.manual_seed(0)
        layer = torch.nn.Linear(256, 256)
        with torch.no_grad():
            out = layer(torch.ones(512, 256) * float(len(dialogues[0][-1]["content"])))
        return [float(out.mean()) + len(d[-1]["content"]) for d in dialogues]

    def count_tokens(self, dialogue):
        return 1


@pytest.mark.slow
def test_async_workers_do_not_hang_after_the_parent_ran_torch():
    """A forked worker hangs in its first parallel torch op once the parent has run one; refuel-gym ids start
    async workers with forkserver (or spawn) unless the caller names a start method."""
    import torch

    from refuel_env.vectorize import SAFE_START_METHOD

    torch.nn.Linear(256, 256)(torch.ones(512, 256))  # the parent's thread pool is now running
    kwargs = {"user": "instant", "reward_model": TorchReward()}
    results = {}
    for mode in ("sync", "async"):
        vec = gym.make_vec(PRESAMPLED, num_envs=2, vectorization_mode=mode, **kwargs)
        try:
            vec.reset(seed=1, options={"horizon": 1})
            if mode == "async":
                assert vec.unwrapped.context == SAFE_START_METHOD != "fork"
                vec.step_async(["a short reply", "a longer reply, with more words"])
                results[mode] = vec.step_wait(timeout=240)[1].tolist()  # raises multiprocessing.TimeoutError on a hang
            else:
                results[mode] = vec.step(["a short reply", "a longer reply, with more words"])[1].tolist()
        finally:
            vec.close(terminate=True) if mode == "async" else vec.close()
    assert results["async"] == results["sync"] and results["sync"][0] != results["sync"][1]
    chosen = gym.make_vec(SYNTHETIC, num_envs=1, vectorization_mode="async", vector_kwargs={"context": "fork"})
    assert chosen.unwrapped.context == "fork"  # the caller's start method is kept
    chosen.close()


# ---------------------------------------------------------------- one table of bad inputs


def _forged(**changes):
    """A call that restores a valid snapshot of the env with some fields changed."""
    return lambda env: env.reset(options={"snapshot": dataclasses.replace(env.snapshot(), **changes)})


def _other_split_file(tmp_path):
    """A UltraInteract file whose one row falls into the test split."""
    row = json.loads(ULTRAINTERACT_SAMPLE.read_text().splitlines()[0])
    row["parent_id"] = next(f"p{i}" for i in range(1000) if split_of(f"p{i}") == "test")
    path = tmp_path / "test_only.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def _write(tmp_path, text):
    path = tmp_path / "rows.jsonl"
    path.write_text(text)
    return path


@dataclass
class Bad:
    """One bad input: ``call`` must raise ``error`` matching ``match``.

    ``target``: "make" (``call()`` builds something), "data" (``call(tmp_path)``), "env" / "vec"
    (``call(env)`` on an env made with ``env_id`` and ``kwargs``, reset with ``seed=0`` and
    ``options={"horizon": 2}``, then ``setup(env)``; afterwards its state, random streams
    included, must be as it was before the call).
    """

    id: str
    target: str
    call: Callable
    error: type[BaseException]
    match: str
    env_id: str = PRESAMPLED
    kwargs: dict[str, Any] = field(default_factory=dict)
    setup: Callable | None = None
    """Steps that succeed before the bad call (the state is compared from after them)."""


def _make_with(env_id=PRESAMPLED, **kwargs):
    return lambda: make(env_id, **kwargs)


BAD_INPUTS = [
    # ---- environment arguments
    Bad("max_turns float", "make", _make_with(max_turns=2.5), ValueError, "max_turns must be an int >= 1, got float 2.5"),
    Bad("max_turns bool", "make", _make_with(max_turns=True), ValueError, "max_turns must be an int >= 1, got bool True"),
    Bad("max_turns str", "make", _make_with(max_turns="3"), ValueError, "max_turns must be an int >= 1, got str '3'"),
    Bad("max_turns 0", "make", _make_with(max_turns=0), ValueError, "max_turns must be an int >= 1, got int 0"),
    Bad("kl_coef str", "make", _make_with(kl_coef="0.1"), ValueError, "kl_coef must be a finite number >= 0, got str '0.1'"),
    Bad("kl_coef negative", "make", _make_with(kl_coef=-1.0), ValueError, "kl_coef must be a finite number >= 0"),
    Bad("kl_coef nan", "make", _make_with(kl_coef=float("nan")), ValueError, "kl_coef must be a finite number >= 0"),
    Bad("truncation_penalty inf", "make", _make_with(truncation_penalty=float("inf"), max_response_tokens=5),
        ValueError, "truncation_penalty must be a finite number or None"),
    Bad("user_temperature negative", "make", _make_with("UltraInteractDialogue-v0", user_temperature=-0.5),
        ValueError, "user_temperature must be a finite number >= 0"),
    Bad("user_max_new_tokens 0", "make", _make_with("UltraInteractDialogue-v0", user_max_new_tokens=0),
        ValueError, "user_max_new_tokens must be an int >= 1 or None"),
    Bad("max_response_tokens 0", "make", _make_with(max_response_tokens=0), ValueError,
        "max_response_tokens must be an int >= 1 or None"),
    Bad("max_response_tokens negative", "make", _make_with(max_response_tokens=-3), ValueError,
        "max_response_tokens must be an int >= 1 or None"),
    Bad("max_response_tokens per-H zero", "make", _make_with(max_response_tokens={1: 0}), ValueError,
        "max_response_tokens as a dict must map dialogue lengths H >= 1 to ints >= 1"),
    Bad("max_dialogue_tokens 0", "make", _make_with(max_dialogue_tokens=0), ValueError,
        "max_dialogue_tokens must be an int >= 1 or None"),
    Bad("data_filters unknown limit", "make", _make_with(data_filters={"max_words": 5}), ValueError,
        "data_filters has unknown limit.*max_words"),
    Bad("data_filters per-K zero", "make", _make_with(data_filters={"max_prompt_tokens": {2: 0}}), ValueError,
        "must be an int >= 1 or a dict .turns K"),
    Bad("data_filters not a dict", "make", _make_with(data_filters=128), TypeError, "data_filters must be a dict or None"),
    Bad("tokenizer None with data_filters", "make", _make_with(tokenizer=None, data_filters={"max_dialogue_tokens": 99}),
        ValueError, "needs token counts, but tokenizer=None"),
    Bad("tokenizer None with max_response_tokens", "make", _make_with(tokenizer=None, max_response_tokens=5),
        ValueError, "max_response_tokens=5 needs token counts, but tokenizer=None"),
    Bad("tokenizer None with max_dialogue_tokens", "make", _make_with(tokenizer=None, max_dialogue_tokens=50),
        ValueError, "max_dialogue_tokens=50 needs token counts, but tokenizer=None"),
    Bad("tokenizer None with Gamma", "make", _make_with(tokenizer=None, truncation_penalty=-4.0),
        ValueError, "truncation_penalty=-4.0 needs token counts, but tokenizer=None"),
    Bad("tokenizer missing path", "make", _make_with(tokenizer="/nonexistent"), OSError,
        "tokenizer='/nonexistent' cannot be loaded .*pass 'embedded'"),
    Bad("tokenizer int", "make", _make_with(tokenizer=7), TypeError, "tokenizer must be 'embedded', a tokenizer path"),
    Bad("reward_model int", "make", lambda: gym.make(PRESAMPLED, reward_model=42), TypeError,
        "reward_model must be 'embedded', 'armorm', 'fsfairx', a model path or hub id, or a TrajectoryRewardModel, got int 42"),
    Bad("user_model int", "make", lambda: gym.make("UltraInteractDialogue-v0", user_model=3), TypeError,
        "user_model must be 'embedded', a model path or hub id, or a TextGenerator, got int 3"),
    Bad("user_device missing gpu", "make", _make_with("UltraInteractDialogue-v0", user_device="cuda:99"),
        ValueError, r"user_device='cuda:99', but this machine has (no CUDA device|\d+ CUDA device)"),
    Bad("user_device nonsense", "make", _make_with("UltraInteractDialogue-v0", user_device="banana"),
        ValueError, "user_device='banana' is not a device"),
    Bad("reward_device missing gpu", "make", lambda: make(PRESAMPLED, reward_model="embedded", reward_device="cuda:99"),
        ValueError, "reward_device='cuda:99', but this machine has"),
    Bad("dataset unknown", "make", _make_with(dataset="mmlu"), ValueError, "dataset must be one of"),
    Bad("data_source int", "make", _make_with(data_source=5), TypeError, "data_source must be 'sample', 'hub' or a path, got 5"),
    Bad("user unknown", "make", _make_with(user="robot"), ValueError, r"user must be one of \['llm', 'presampled', 'instant'\]"),
    Bad("user_backend unknown", "make", _make_with("UltraInteractDialogue-v0", user_backend="tgi"), ValueError,
        "user_backend must be one of"),
    Bad("user_prompt_style unknown", "make", _make_with("UltraInteractDialogue-v0", user_prompt_style="chat"), ValueError,
        "user_prompt_style must be one of"),
    Bad("user_tensor_parallel_size 0", "make", _make_with("UltraInteractDialogue-v0", user_tensor_parallel_size=0),
        ValueError, "user_tensor_parallel_size must be an int >= 1"),
    Bad("user_vllm_kwargs list", "make", _make_with("UltraInteractDialogue-v0", user_vllm_kwargs=["x"]), TypeError,
        "user_vllm_kwargs must be a dict or None"),
    Bad("user_openai_kwargs str", "make", _make_with("UltraInteractDialogue-v0", user_openai_kwargs="x"), TypeError,
        "user_openai_kwargs must be a dict or None"),
    Bad("user_base_url int", "make", _make_with("UltraInteractDialogue-v0", user_base_url=8000), TypeError,
        "user_base_url must be a URL str or None"),
    Bad("split unknown", "make", _make_with(split="dev"), ValueError, r"split must be one of \['train', 'test', 'all'\]"),
    Bad("preset of another dataset", "make", _make_with(preset="paper-setting-two-hh"), ValueError,
        r"preset 'paper-setting-two-hh' is for dataset='anthropic_hh', but the environment has dataset='ultrainteract'"
        r".*AnthropicHHPresampled-v0"),
    Bad("preset of another user", "make", _make_with("UltraInteractDialogue-v0", preset="paper-setting-two-ultrainteract"),
        ValueError, "preset 'paper-setting-two-ultrainteract' is for user='presampled', but the environment has user='llm'"),
    Bad("preset unknown", "make", _make_with(preset="paper"), ValueError, "unknown preset 'paper'"),
    Bad("synthetic max_turns 4", "make", lambda: make(SYNTHETIC, max_turns=4), ValueError, "max_turns must be an int in 1..3"),
    Bad("user_model folder without a model", "data",
        lambda tmp: gym.make("UltraInteractDialogue-v0", user_model=str(tmp), reward_model=LengthReward()), OSError,
        r"user_model='.*' is a folder without a model: it holds \[\] and no config.json; pass 'embedded', a folder"),
    Bad("split list", "make", _make_with(split=["train"]), ValueError,
        r"split must be one of \['train', 'test', 'all'\], got list \['train'\]"),
    Bad("synthetic kl_coef str", "make", lambda: make(SYNTHETIC, kl_coef="abc"), ValueError,
        "kl_coef must be a finite number >= 0, got str 'abc'; e.g. kl_coef=0.05"),
    Bad("synthetic split list", "make", lambda: make(SYNTHETIC, split=["train"]), ValueError,
        r"split must be one of \['test', 'train'\] \(a str\), got list \['train'\]; e.g. split='test'"),
    # ---- data files
    Bad("empty jsonl", "data", lambda tmp: load_items("ultrainteract", _write(tmp, "")), DataError,
        r"\['rows.jsonl'\] hold no rows \(empty or only blank lines\)"),
    Bad("blank-lines jsonl", "data", lambda tmp: load_items("ultrainteract", _write(tmp, "\n  \n\n")), DataError,
        "hold no rows"),
    Bad("all rows in the other split", "data", lambda tmp: load_items("ultrainteract", _other_split_file(tmp)),
        DataError, r"no ultrainteract items in split 'train'.*read 1 rows, kept 0; other split 1.*pass split='test'"),
    Bad("env on an other-split file", "data", lambda tmp: make(data_source=str(_other_split_file(tmp))),
        DataError, "All 1 rows fall into the other split"),
    # ---- reset options and seeds (single env)
    Bad("options str", "env", lambda env: env.reset(options="horizon"), TypeError,
        "options must be a dict of reset options .* got str 'horizon'"),
    Bad("unknown option", "env", lambda env: env.reset(options={"snapshots": 1}), ValueError, "unknown reset option"),
    Bad("options misspelt and non-str keys", "env", lambda env: env.reset(options={1: "x", "hoizon": 2}), ValueError,
        r"unknown reset option\(s\) \['hoizon', 1\]; the options are .* did you mean 'hoizon' -> 'horizon'\?"),
    Bad("item questions a str", "env",
        lambda env: env.reset(options={"item": DialogueItem(item_id="s", source="test", questions="What is 2+2?")}),
        ValueError, r"invalid 'item' for reset: questions must be a tuple of str, got str 'What is 2\+2\?'; "
        r"e.g. questions=\('What is 2\+2\?',\)"),
    Bad("item question None", "env",
        lambda env: env.reset(options={"item": DialogueItem(item_id="n", source="test", questions=(None,))}),
        ValueError, r"invalid 'item' for reset: questions\[0\] must be a str, got NoneType None"),
    Bad("item question not Unicode", "env",
        lambda env: env.reset(options={"item": DialogueItem(item_id="u", source="test", questions=("a?", "b \ud800"))}),
        ValueError, r"invalid 'item' for reset: questions\[1\]: it is not valid Unicode: '\\ud800' at position 2"),
    Bad("item question oversized", "env",
        lambda env: env.reset(options={"item": DialogueItem(item_id="o", source="test", questions=("q" * 200_000,))}),
        ValueError, r"invalid 'item' for reset: questions\[0\]: it has 200,000 characters, more than the 100,000"),
    Bad("item response not Unicode", "env",
        lambda env: env.reset(options={"item": DialogueItem(item_id="r", source="test", questions=("a?", "b?"),
                                                             responses=("\udfff", None))}),
        ValueError, r"invalid 'item' for reset: responses\[0\]: it is not valid Unicode"),
    Bad("index out of range", "env", lambda env: env.reset(options={"index": 10_000}), ValueError,
        "option 'index' must be an int in 0.."),
    Bad("horizon too long", "env", lambda env: env.reset(options={"horizon": 6}), ValueError, "horizon must be an int in"),
    Bad("snapshot with horizon", "env", lambda env: env.reset(options={"snapshot": env.snapshot(), "horizon": 2}),
        ValueError, r"pass either 'snapshot' or \['horizon'\] to reset, not both"),
    Bad("snapshot with index", "env", lambda env: env.reset(options={"snapshot": env.snapshot(), "index": 0}),
        ValueError, r"pass either 'snapshot' or \['index'\] to reset, not both"),
    Bad("snapshot turn past horizon", "env", _forged(turn=3), SnapshotError, "turn 3 and horizon 2 must satisfy"),
    Bad("snapshot horizon past max_turns", "env", _forged(horizon=9), SnapshotError, r"must satisfy 1 <= turn <= horizon <= \d"),
    Bad("snapshot turn not int", "env", _forged(turn=1.0), SnapshotError, "turn must be a non-negative int"),
    Bad("snapshot messages not at turn", "env", _forged(turn=2), SnapshotError, "its messages hold 1 user turns, but turn is 2"),
    Bad("snapshot messages not a state", "env", _forged(message_pairs=(("assistant", "hi"),)), SnapshotError,
        "its messages are not a state"),
    Bad("snapshot rng_state shape", "env", _forged(rng_state=(1, 2)), SnapshotError,
        r"rng_state must be a tuple \(state, inc, has_uint32, uinteger\)"),
    Bad("snapshot rng_state value", "env", _forged(rng_state=(-1, 1, 0, 0)), SnapshotError,
        "rng_state's state must be an int in 0.."),
    Bad("snapshot item", "env", _forged(item="item"), SnapshotError, "item is a str, not a DialogueItem"),
    Bad("snapshot log-prob nan", "env", _forged(policy_logprob=float("nan")), SnapshotError,
        "policy_logprob must be a finite number"),
    Bad("snapshot not a snapshot", "env", lambda env: env.reset(options={"snapshot": {"turn": 1}}), TypeError,
        "option 'snapshot' must be a Snapshot, got dict"),
    Bad("seed negative", "env", lambda env: env.reset(seed=-1), ValueError, "seed must be a non-negative int or None, got -1"),
    Bad("seed float", "env", lambda env: env.reset(seed=1.5), TypeError, "seed must be a non-negative int or None, got float"),
    Bad("seed bool", "env", lambda env: env.reset(seed=True), TypeError, "seed must be a non-negative int or None, got bool"),
    # ---- actions and log-probs (single env)
    Bad("action oversized", "env", lambda env: env.step("x" * 100_001), ValueError,
        r"outside the action space \(Prose\): it has 100,001 characters, more than the 100,000"),
    Bad("action not Unicode", "env", lambda env: env.step("ok \ud800"), ValueError,
        r"outside the action space \(Prose\): it is not valid Unicode: '\\ud800' at position 3"),
    Bad("action not str", "env", lambda env: env.step(42), TypeError, "must be the assistant's message as a str, got int"),
    Bad("synthetic action not Unicode", "env", lambda env: env.step("\udfff"), ValueError, "not valid Unicode",
        env_id=SYNTHETIC),
    Bad("log-prob nan", "env", lambda env: env.set_logprobs(float("nan"), 0.0), ValueError,
        "the policy log-prob must be a finite number, got nan", kwargs={"kl_coef": 0.1}),
    Bad("log-prob str", "env", lambda env: env.set_logprobs(-1.0, "-2"), ValueError,
        "the reference log-prob must be a finite number, got '-2'", kwargs={"kl_coef": 0.1}),
    # ---- reward model results (single env; the step is undone)
    Bad("reward None", "env", lambda env: env.step("boom"), RewardModelError,
        r"returned None \(NoneType\) for dialogue 0", kwargs={"reward_model": ScriptedReward(None)},
        setup=lambda env: env.step("a")),
    Bad("reward str", "env", lambda env: env.step("boom"), RewardModelError,
        r"returned 'high' \(str\) for dialogue 0", kwargs={"reward_model": ScriptedReward("high")},
        setup=lambda env: env.step("a")),
    Bad("reward inf", "env", lambda env: env.step("boom"), RewardModelError,
        r"non-finite score \(NaN or inf\) for dialogue\(s\) 0; the score\(s\): inf",
        kwargs={"reward_model": ScriptedReward(float("inf"))}, setup=lambda env: env.step("a")),
    Bad("reward overflows with the KL penalty", "env", lambda env: env.step("boom"), RewardModelError,
        r"dialogue 0's reward is inf \(model score 1.7e\+308 minus KL penalty -1e\+308\)",
        kwargs={"reward_model": ScriptedReward(1.7e308), "kl_coef": 1.0},
        setup=lambda env: (env.set_logprobs(-1e308, 0.0), env.step("a"), env.set_logprobs(0.0, 0.0))),
    Bad("log-probs overflow", "env", lambda env: env.step("b"), RewardModelError, "the KL penalty of dialogue 0 is inf",
        kwargs={"kl_coef": 1.0}, setup=lambda env: (env.set_logprobs(1e308, -1e308), env.step("a"), env.set_logprobs(0.0, 0.0))),
    Bad("summed log-probs overflow", "env", lambda env: env.step("b"), RewardModelError,
        "the policy log-prob of dialogue 0 is -inf", kwargs={"kl_coef": 1.0},
        setup=lambda env: (env.set_logprobs(-1.5e308, 0.0), env.step("a"), env.set_logprobs(-1.5e308, 0.0))),
    # ---- synthetic task: prefixes it cannot read are refused at reset
    Bad("synthetic prefix off vocabulary", "env", lambda env: env.reset(options={"prefix": [{"role": "user", "content": "hello"}]}),
        ValueError, r"invalid 'prefix' for reset: the synthetic task's user messages are one of \['vague', 'clear', 'lost'\], got 'hello'",
        env_id=SYNTHETIC),
    Bad("synthetic item off vocabulary", "env",
        lambda env: env.reset(options={"item": DialogueItem(item_id="x", source="test", questions=("hi?",))}),
        ValueError, "invalid 'item' for reset: the synthetic task's user messages", env_id=SYNTHETIC),
    Bad("prefix oversized message", "env",
        lambda env: env.reset(options={"prefix": [{"role": "user", "content": "q" * 100_001}]}),
        ValueError, "invalid 'prefix' for reset: turn 0's content: it has 100,001 characters"),
    # ---- vector env
    Bad("vec snapshot past the end", "vec", lambda vec: vec.snapshot(5), IndexError,
        r"snapshot\(index\): index must be an int in 0..2, got 5"),
    Bad("vec snapshot negative", "vec", lambda vec: vec.snapshot(-1), IndexError, "index must be an int in 0..2, got -1"),
    Bad("vec reset_mask strings", "vec", lambda vec: vec.reset(options={"reset_mask": ["no", "no", "no"]}), ValueError,
        r"reset_mask must be 3 bools .* got \['no', 'no', 'no'\]"),
    Bad("vec reset_mask indices", "vec", lambda vec: vec.reset(options={"reset_mask": [0, 2, 5]}), ValueError,
        r"reset_mask must be 3 bools .*dtype int64"),
    Bad("vec reset_mask shape", "vec", lambda vec: vec.reset(options={"reset_mask": [True]}), ValueError,
        r"reset_mask must be 3 bools .*shape \(1,\)"),
    Bad("vec prefix empty", "vec", lambda vec: vec.reset(options={"prefix": []}), ValueError,
        "env 0: invalid 'prefix' for reset: it has no user message"),
    Bad("vec horizon count", "vec", lambda vec: vec.reset(options={"horizon": [1, 2]}), ValueError,
        r"options\['horizon'\]: got 2 values for 3 sub-environments"),
    Bad("vec bad horizon in one env", "vec", lambda vec: vec.reset(options={"horizon": [1, 1, 9]}), ValueError,
        "env 2: horizon must be an int in"),
    Bad("vec options str", "vec", lambda vec: vec.reset(options="horizon"), TypeError, "options must be a dict"),
    Bad("vec seed negative", "vec", lambda vec: vec.reset(seed=-1), ValueError, "seed must be a non-negative int or None, got -1"),
    Bad("vec seed list with negative", "vec", lambda vec: vec.reset(seed=[0, -1, 2]), ValueError,
        r"seed\[1\] must be a non-negative int"),
    Bad("vec seed count", "vec", lambda vec: vec.reset(seed=[0, 1]), ValueError, "seed: got 2 seeds for 3 sub-environments"),
    Bad("vec action oversized", "vec", lambda vec: vec.step(["a", "x" * 100_001, "c"]), ValueError,
        "env 1: the action is outside the action space"),
    Bad("vec action count", "vec", lambda vec: vec.step(["a"]), ValueError, "step\\(\\) takes a sequence of 3 actions"),
    Bad("vec options misspelt", "vec", lambda vec: vec.reset(options={"reset_mak": [True] * 3, 0: 1}), ValueError,
        r"unknown reset option\(s\) \['reset_mak', 0\].* did you mean 'reset_mak' -> 'reset_mask'\?"),
    Bad("vec set_logprobs ints", "vec", lambda vec: vec.set_logprobs(5, 5), ValueError,
        r"set_logprobs takes one policy log-prob per sub-environment, 3 numbers, got int 5; e.g. set_logprobs\(\[-1.5\] \* 3"),
    Bad("vec log-prob nan in one env", "vec", lambda vec: vec.set_logprobs([0.0, 0.0, float("nan")], [0.0] * 3),
        ValueError, "env 2: the policy log-prob must be a finite number", kwargs={"kl_coef": 0.1}),
]

_ENVS: dict[tuple, Any] = {}


def _cached(kind: str, env_id: str, kwargs: dict[str, Any]):
    key = (kind, env_id, repr(sorted(kwargs.items())))
    if key not in _ENVS:
        _ENVS[key] = make(env_id, **kwargs) if kind == "env" else make_vec(env_id, num_envs=3, **kwargs)
    return _ENVS[key]


def _state(env) -> Any:
    if hasattr(env, "num_envs"):
        return (
            [env.snapshot(i) for i in range(env.num_envs)],
            [r.bit_generator.state for r in env._rngs],
            env._autoreset.tolist(),
            [ep.pending_logprobs for ep in env._episodes],
        )
    return env.snapshot(), env.np_random.bit_generator.state, env.np_random_seed, env._episode.pending_logprobs


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_is_refused_clearly_and_loses_nothing(case, tmp_path):
    if case.target == "make":
        with pytest.raises(case.error, match=case.match):
            case.call()
    elif case.target == "data":
        with pytest.raises(case.error, match=case.match):
            case.call(tmp_path)
    else:
        env = _cached(case.target, case.env_id, case.kwargs)
        index = next(i for i, item in enumerate(env.core.items) if item.num_turns >= 2)  # H = 2 fits
        env.reset(seed=0, options={"horizon": 2, "index": index})
        if case.setup is not None:
            case.setup(env)
        before = _state(env)
        with pytest.raises(case.error, match=case.match):
            case.call(env)
        assert _state(env) == before, "a refused input changed the environment"


def test_every_env_argument_has_a_bad_input_row():
    """A new EnvConfig field must get a row in BAD_INPUTS (or be listed here as taking any value)."""
    from refuel_env.components import EnvConfig

    names = {f.name for f in dataclasses.fields(EnvConfig)}
    covered = {name for name in names if any(case.id.split()[0] == name for case in BAD_INPUTS)}
    missing = names - covered
    assert not missing, f"add rows to BAD_INPUTS for {sorted(missing)}"
