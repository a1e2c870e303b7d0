"""The dialogue MDP itself, batched: episodes, resets, and one step for many episodes at once.

:class:`DialogueCore` holds the parts (items, simulated user, reward, token counter) and advances
a list of :class:`Episode` objects together: one batched user call for every episode that goes
on, one batched reward call for every episode that ends. The single environment steps a list of
one; the vector environment steps all of its episodes. Both therefore produce the same
transcripts and rewards for the same seeds.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refuel_env.rewards import TrajectoryReward
from refuel_env.snapshot import Snapshot, SnapshotError, rng_from_state, rng_state, rng_state_problem
from refuel_env.spaces import MAX_CHARS, conversation_problem, text_problem
from refuel_env.types import DialogueItem, Message
from refuel_env.users import UserRequest, UserSimulator

RESET_OPTIONS = ("index", "item", "horizon", "snapshot", "prefix")


class EpisodeError(RuntimeError):
    """A call the episode's state does not allow (step before reset or after the end)."""


def copy_messages(messages: Sequence[Message]) -> list[Message]:
    """A new list of new message dicts: what callers get, so that changing it changes no episode."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]  # type: ignore[typeddict-item]


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """``seed`` as an int (numpy ints accepted), or None; a clear error for anything else."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"{name} must be a non-negative int or None, got {type(seed).__name__} {seed!r:.80}")
    if seed < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {seed}")
    return int(seed)


def check_options(options: Any) -> dict[str, Any]:
    """The reset options as a new dict (None: no options); a clear error for a non-mapping."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"options must be a dict of reset options (keys among {list(RESET_OPTIONS)}) or None, "
            f"got {type(options).__name__} {options!r:.80}; e.g. options={{'horizon': 3}}"
        )
    return dict(options)


def check_option_names(options: Mapping[Any, Any], allowed: Sequence[str]) -> None:
    """A ``ValueError`` naming every key of ``options`` not in ``allowed`` (keys of any type), with the
    closest allowed name for a misspelt one."""
    unknown = sorted((k for k in options if not (isinstance(k, str) and k in allowed)), key=repr)
    if not unknown:
        return
    hints = [
        f"{k!r} -> {close[0]!r}"
        for k in unknown
        if isinstance(k, str) and (close := difflib.get_close_matches(k, allowed, n=1, cutoff=0.6))
    ]
    raise ValueError(
        f"unknown reset option(s) {unknown!r:.200}; the options are {list(allowed)} (str keys)"
        + (f"; did you mean {', '.join(hints)}?" if hints else "")
    )


def _positive_int_or_none(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1):
        raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")


@dataclass
class Episode:
    """The mutable state of one dialogue."""

    item: DialogueItem
    messages: list[Message]
    turn: int  # h: the observation asks for y_h
    horizon: int  # H
    rng: np.random.Generator
    user_parse_failures: int = 0
    hit_length_limit: bool = False
    response_tokens: list[int] = field(default_factory=list)
    policy_logprob: float = 0.0
    reference_logprob: float = 0.0
    logprob_turns: int = 0
    pending_logprobs: tuple[float, float] | None = None
    done: bool = False
    last_user_parsed: bool = True
    last_user_fallback: str = ""


@dataclass
class StepResult:
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]


class DialogueCore:
    """Items, user, reward and limits of one environment configuration."""

    def __init__(
        self,
        *,
        items: Sequence[DialogueItem],
        user: UserSimulator,
        reward: TrajectoryReward,
        max_turns: int,
        count_tokens: Callable[[str], int] | None,
        max_response_tokens: int | Mapping[int, int] | None,
        max_dialogue_tokens: int | None,
        config_id: str,
    ):
        if not items:
            raise ValueError("the environment has no dataset items; check the dataset source and filters")
        if isinstance(max_turns, bool) or not isinstance(max_turns, int | np.integer) or max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
        for limit in max_response_tokens.values() if isinstance(max_response_tokens, Mapping) else [max_response_tokens]:
            _positive_int_or_none(limit, "max_response_tokens")
        _positive_int_or_none(max_dialogue_tokens, "max_dialogue_tokens")
        if count_tokens is None:
            needing = [
                f"{name}={value!r}"
                for name, value in (
                    ("max_response_tokens", max_response_tokens),
                    ("max_dialogue_tokens", max_dialogue_tokens),
                    ("truncation_penalty", reward.truncation_penalty),
                )
                if value is not None
            ]
            if needing:
                raise ValueError(
                    f"{' and '.join(needing)} {'needs' if len(needing) == 1 else 'need'} token counts, but "
                    "count_tokens is None; pass a token counter, or leave these limits unset"
                )
        self.items = list(items)
        self.user = user
        self.reward = reward
        self.max_turns = max_turns
        self.count_tokens = count_tokens
        self.max_response_tokens = max_response_tokens
        self.max_dialogue_tokens = max_dialogue_tokens
        self.config_id = config_id

    def response_limit(self, horizon: int) -> int | None:
        """The response length limit of a dialogue of length ``horizon`` (one, or one per H)."""
        if isinstance(self.max_response_tokens, Mapping):
            return self.max_response_tokens.get(horizon)
        return self.max_response_tokens

    # ------------------------------------------------------------------ reset

    def max_horizon(self, item: DialogueItem) -> int:
        return min(self.max_turns, item.num_turns) if self.user.presampled else self.max_turns

    def new_episode(
        self, np_random: np.random.Generator, options: dict[str, Any] | None, *, reseed: bool = False
    ) -> Episode:
        """Start an episode as ``reset(options=...)`` asks (see ``DialogueEnv`` for the options).

        A restored snapshot keeps its own random state, unless ``reseed`` (a seed was passed to
        ``reset``): then the episode's generator is drawn from ``np_random``.
        """
        options = check_options(options)
        check_option_names(options, RESET_OPTIONS)
        if options.get("snapshot") is not None:
            others = sorted(k for k, v in options.items() if k != "snapshot" and v is not None)
            if others:
                raise ValueError(
                    f"pass either 'snapshot' or {others} to reset, not both: a snapshot already fixes the "
                    "item, the transcript and the horizon"
                )
            return self.restore(options["snapshot"], np_random if reseed else None)

        item = self._choose_item(np_random, options)
        prefix = options.get("prefix")
        if prefix is not None:
            messages, turn = self._check_prefix(prefix)
            if options.get("index") is None and options.get("item") is None:
                item = _item_from_prefix(messages)
        else:
            messages = item.prefix(1)
            turn = 1
        if prefix is not None or options.get("item") is not None:
            problem = self.user.messages_problem(messages)
            if problem:
                source = "prefix" if prefix is not None else "item"
                raise ValueError(f"invalid {source!r} for reset: {problem}")
        max_h = self.max_horizon(item)
        horizon = options.get("horizon")
        if horizon is None:
            if turn > max_h:
                raise ValueError(f"the prefix is at turn {turn}, past the longest horizon {max_h} of this item")
            # A pre-sampled user asks the item's own questions: H is their number (as in the original
            # release), capped at max_turns. Otherwise H ~ U{turn..max_turns}.
            horizon = max_h if self.user.presampled else int(np_random.integers(turn, max_h + 1))
        elif isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or not turn <= horizon <= max_h:
            raise ValueError(
                f"horizon must be an int in {turn}..{max_h} for this item and start turn, got {horizon!r}"
            )
        rng = np.random.default_rng(int(np_random.integers(0, 2**63 - 1)))
        return Episode(item=item, messages=messages, turn=turn, horizon=int(horizon), rng=rng)

    def _choose_item(self, np_random: np.random.Generator, options: dict[str, Any]) -> DialogueItem:
        if options.get("item") is not None:
            if options.get("index") is not None:
                raise ValueError("pass either 'index' or 'item' to reset, not both")
            if not isinstance(options["item"], DialogueItem):
                raise TypeError(f"option 'item' must be a DialogueItem, got {type(options['item']).__name__}")
            problem = item_problem(options["item"])
            if problem:
                raise ValueError(f"invalid 'item' for reset: {problem}")
            return options["item"]
        index = options.get("index")
        if index is None:
            return self.items[int(np_random.integers(len(self.items)))]
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < len(self.items):
            raise ValueError(f"option 'index' must be an int in 0..{len(self.items) - 1}, got {index!r}")
        return self.items[int(index)]

    @staticmethod
    def _check_prefix(prefix: Any) -> tuple[list[Message], int]:
        problem = conversation_problem(prefix, end_role="user")
        if problem is not None:
            raise ValueError(f"invalid 'prefix' for reset: {problem}")
        messages = copy_messages(prefix)
        turn = sum(m["role"] == "user" for m in messages)
        return messages, turn

    def restore(self, snapshot: Snapshot, reseed_from: np.random.Generator | None) -> Episode:
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"option 'snapshot' must be a Snapshot, got {type(snapshot).__name__}")
        if snapshot.config_id != self.config_id:
            raise SnapshotError(
                f"this snapshot was taken in an environment with configuration {snapshot.config_id}, "
                f"but this environment's is {self.config_id}; restore it into an environment made "
                "with the same id and arguments"
            )
        if snapshot.done:
            raise SnapshotError("this snapshot is of a finished episode; there is nothing to continue")
        problem = self._snapshot_problem(snapshot)
        if problem:
            raise SnapshotError(
                f"this snapshot cannot be restored: {problem}; pass a snapshot taken from an environment "
                "(env.snapshot() or info['snapshot']), unchanged"
            )
        rng = (
            np.random.default_rng(int(reseed_from.integers(0, 2**63 - 1)))
            if reseed_from is not None
            else rng_from_state(snapshot.rng_state)
        )
        return Episode(
            item=snapshot.item,
            messages=snapshot.messages,
            turn=snapshot.turn,
            horizon=snapshot.horizon,
            rng=rng,
            user_parse_failures=snapshot.user_parse_failures,
            hit_length_limit=snapshot.hit_length_limit,
            response_tokens=list(snapshot.response_tokens),
            policy_logprob=snapshot.policy_logprob,
            reference_logprob=snapshot.reference_logprob,
            logprob_turns=snapshot.logprob_turns,
        )

    def _snapshot_problem(self, snap: Snapshot) -> str | None:
        """Why a snapshot's fields cannot be a state of this environment, or None."""
        if not isinstance(snap.item, DialogueItem):
            return f"item is a {type(snap.item).__name__}, not a DialogueItem"
        for name in ("turn", "horizon", "user_parse_failures", "logprob_turns"):
            value = getattr(snap, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                return f"{name} must be a non-negative int, got {value!r:.80}"
        max_h = self.max_horizon(snap.item)
        if not 1 <= snap.turn <= snap.horizon <= max_h:
            return f"turn {snap.turn} and horizon {snap.horizon} must satisfy 1 <= turn <= horizon <= {max_h}"
        pairs = snap.message_pairs
        if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            return "message_pairs must be a tuple of (role, content) pairs"
        messages = [{"role": role, "content": content} for role, content in pairs]
        problem = conversation_problem(messages, end_role="user")
        if problem:
            return f"its messages are not a state: {problem}"
        users = sum(m["role"] == "user" for m in messages)
        if users != snap.turn:
            return f"its messages hold {users} user turns, but turn is {snap.turn}"
        problem = self.user.messages_problem(messages)
        if problem:
            return problem
        tokens = snap.response_tokens
        if not isinstance(tokens, tuple) or len(tokens) > snap.turn - 1 or not all(
            isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 0 for n in tokens
        ):
            return f"response_tokens must be a tuple of at most {snap.turn - 1} non-negative ints, got {tokens!r:.80}"
        for name in ("policy_logprob", "reference_logprob"):
            value = getattr(snap, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not math.isfinite(value):
                return f"{name} must be a finite number, got {value!r}"
        if not isinstance(snap.hit_length_limit, bool | np.bool_):
            return f"hit_length_limit must be a bool, got {snap.hit_length_limit!r:.80}"
        return rng_state_problem(snap.rng_state)

    def snapshot(self, ep: Episode) -> Snapshot:
        return Snapshot(
            config_id=self.config_id,
            item=ep.item,
            message_pairs=tuple((m["role"], m["content"]) for m in ep.messages),
            turn=ep.turn,
            horizon=ep.horizon,
            rng_state=rng_state(ep.rng),
            user_parse_failures=ep.user_parse_failures,
            hit_length_limit=ep.hit_length_limit,
            response_tokens=tuple(ep.response_tokens),
            policy_logprob=ep.policy_logprob,
            reference_logprob=ep.reference_logprob,
            logprob_turns=ep.logprob_turns,
            done=ep.done,
        )

    def reset_info(self, ep: Episode) -> dict[str, Any]:
        return self._info(ep, action_tokens=None, user_prompt_tokens=0, user_completion_tokens=0)

    # ------------------------------------------------------------------ step

    def check_action(self, ep: Episode | None, action: Any, where: str = "") -> None:
        if ep is None:
            raise EpisodeError(f"{where}step() called before reset(); call reset() first")
        if ep.done:
            raise EpisodeError(f"{where}step() called after the episode ended; call reset() to start a new one")
        if not isinstance(action, str):
            raise TypeError(f"{where}the action must be the assistant's message as a str, got {type(action).__name__}")
        problem = text_problem(action, MAX_CHARS)
        if problem:
            raise ValueError(f"{where}the action is outside the action space (Prose): {problem}")
        if self.reward.kl_coef > 0 and ep.pending_logprobs is None:
            raise ValueError(
                f"{where}this environment has a KL penalty (kl_coef={self.reward.kl_coef}); call "
                "set_logprobs(policy=..., reference=...) with the response's log-probs before each step"
            )

    @staticmethod
    def check_logprobs(policy: Any, reference: Any, where: str = "") -> None:
        for name, value in (("policy", policy), ("reference", reference)):
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) or not math.isfinite(value):
                raise ValueError(f"{where}the {name} log-prob must be a finite number, got {value!r:.80}")

    def set_logprobs(self, ep: Episode, policy: float, reference: float) -> None:
        self.check_logprobs(policy, reference)
        ep.pending_logprobs = (float(policy), float(reference))

    def advance(self, episodes: Sequence[Episode], actions: Sequence[str]) -> list[StepResult]:
        """Step every episode with its action: one user call and one reward call for the batch.

        If the user or the reward model fails (an error, a NaN score), every episode is put back
        as it was before the step and the error is raised: nothing is half-applied.
        """
        for i, (ep, action) in enumerate(zip(episodes, actions)):
            self.check_action(ep, action, where=f"env {i}: " if len(episodes) > 1 else "")
        saved = [(copy.copy(ep), list(ep.messages), list(ep.response_tokens), ep.rng.bit_generator.state) for ep in episodes]
        try:
            return self._advance(episodes, actions)
        except BaseException:
            for ep, (old, messages, response_tokens, rng_state_) in zip(episodes, saved):
                ep.__dict__.update(old.__dict__)
                ep.messages, ep.response_tokens = messages, response_tokens
                ep.rng.bit_generator.state = rng_state_
            raise

    def _advance(self, episodes: Sequence[Episode], actions: Sequence[str]) -> list[StepResult]:
        action_tokens = []
        for ep, action in zip(episodes, actions):
            ep.messages.append({"role": "assistant", "content": action})
            n = self.count_tokens(action) if self.count_tokens is not None else None
            action_tokens.append(n)
            if n is not None:
                ep.response_tokens.append(n)
                limit = self.response_limit(ep.horizon)
                if limit is not None and n >= limit:
                    ep.hit_length_limit = True
            if ep.pending_logprobs is not None:
                ep.policy_logprob += ep.pending_logprobs[0]
                ep.reference_logprob += ep.pending_logprobs[1]
                ep.logprob_turns += 1
                ep.pending_logprobs = None

        results: list[StepResult | None] = [None] * len(episodes)
        ending = [i for i, ep in enumerate(episodes) if ep.turn >= ep.horizon]
        going_on = [i for i, ep in enumerate(episodes) if ep.turn < ep.horizon]

        scored = []
        for i in ending:
            reason = self._reward_truncation(episodes[i])
            if reason:
                results[i] = self._truncate(episodes[i], reason, action_tokens[i])
            else:
                scored.append(i)
        if scored:
            parts = self.reward.compute(
                [copy_messages(episodes[i].messages) for i in scored],
                policy_logprobs=[episodes[i].policy_logprob for i in scored],
                reference_logprobs=[episodes[i].reference_logprob for i in scored],
                hit_length_limit=[episodes[i].hit_length_limit for i in scored],
            )
            for i, part in zip(scored, parts):
                ep = episodes[i]
                ep.done = True
                ep.turn += 1
                info = self._info(ep, action_tokens[i], 0, 0)
                # A part that does not apply (the model score when Gamma replaced it) is left out.
                info["reward_parts"] = {k: float(v) for k, v in part.items() if v is not None}
                results[i] = StepResult(float(part["reward"]), True, False, info)

        asking = []
        for i in going_on:
            reason = self._user_truncation(episodes[i])
            if reason:
                results[i] = self._truncate(episodes[i], reason, action_tokens[i])
            else:
                asking.append(i)
        if asking:
            requests = [
                UserRequest(
                    messages=tuple(copy_messages(episodes[i].messages)),
                    item=episodes[i].item,
                    turn=episodes[i].turn,
                    seed=int(episodes[i].rng.integers(0, 2**31 - 1)),
                )
                for i in asking
            ]
            for i, user_turn in zip(asking, self.user.respond(requests)):
                ep = episodes[i]
                ep.messages.append({"role": "user", "content": user_turn.text})
                ep.turn += 1
                ep.last_user_parsed = user_turn.parsed
                ep.last_user_fallback = user_turn.fallback
                ep.user_parse_failures += not user_turn.parsed
                info = self._info(ep, action_tokens[i], user_turn.prompt_tokens, user_turn.completion_tokens)
                info["user_raw_output"] = user_turn.raw
                results[i] = StepResult(0.0, False, False, info)
        return results  # type: ignore[return-value]

    def _reward_truncation(self, ep: Episode) -> str:
        model = self.reward.model
        if model.max_length is not None:
            n = model.count_tokens(ep.messages)
            if n > model.max_length:
                return f"the dialogue has {n} tokens, more than the reward model's context of {model.max_length}"
        return self._dialogue_length_problem(ep)

    def _user_truncation(self, ep: Episode) -> str:
        limit = self.user.max_prompt_tokens
        if limit is not None:
            n = self.user.prompt_tokens(ep.messages)
            if n > limit:
                return (
                    f"the simulated user's prompt has {n} tokens, more than the {limit} its context leaves "
                    "after the room for its answer"
                )
        return self._dialogue_length_problem(ep)

    def _dialogue_length_problem(self, ep: Episode) -> str:
        if self.max_dialogue_tokens is None or self.count_tokens is None:
            return ""
        n = sum(self.count_tokens(m["content"]) for m in ep.messages)
        if n > self.max_dialogue_tokens:
            return f"the dialogue has {n} tokens, more than max_dialogue_tokens={self.max_dialogue_tokens}"
        return ""

    def _truncate(self, ep: Episode, reason: str, action_tokens: int | None) -> StepResult:
        ep.done = True
        info = self._info(ep, action_tokens, 0, 0)
        info["truncation_reason"] = reason
        return StepResult(0.0, False, True, info)

    def _info(
        self, ep: Episode, action_tokens: int | None, user_prompt_tokens: int, user_completion_tokens: int
    ) -> dict[str, Any]:
        info: dict[str, Any] = {
            "turn": ep.turn,
            "horizon": ep.horizon,
            "item_id": ep.item.item_id,
            "user_parsed": ep.last_user_parsed,
            "user_fallback": ep.last_user_fallback,
            "user_parse_failures": ep.user_parse_failures,
            "response_tokens": sum(ep.response_tokens),
            "user_prompt_tokens": user_prompt_tokens,
            "user_completion_tokens": user_completion_tokens,
            "response_hit_length_limit": ep.hit_length_limit,
            "snapshot": self.snapshot(ep),
        }
        if action_tokens is not None:
            info["action_tokens"] = action_tokens
        return info


def item_problem(item: DialogueItem) -> str | None:
    """Why ``item`` cannot start an episode (the checks a prefix's messages get), or None.

    Its questions must be a tuple of str (each becomes a user message), its responses str or None,
    its system prompt str or None, each valid Unicode of at most :data:`MAX_CHARS` characters.
    """
    fields = [("questions", item.questions, False), ("responses", item.responses, True)]
    for name, values, none_ok in fields:
        if not isinstance(values, tuple | list):
            example = f"({values!r:.40},)" if isinstance(values, str) else "('What is 2+2?',)"
            return f"{name} must be a tuple of str, got {type(values).__name__} {values!r:.80}; e.g. {name}={example}"
        for i, text in enumerate(values):
            if text is None and none_ok:
                continue
            if not isinstance(text, str):
                return f"{name}[{i}] must be a str{' or None' if none_ok else ''}, got {type(text).__name__} {text!r:.80}"
            problem = text_problem(text)
            if problem:
                return f"{name}[{i}]: {problem}"
    if item.system is not None:
        problem = text_problem(item.system) if isinstance(item.system, str) else f"expected a str, got {type(item.system).__name__}"
        if problem:
            return f"system: {problem}"
    return None


def _item_from_prefix(messages: list[Message]) -> DialogueItem:
    """An item for a prefix that names no dataset item: its user turns are the questions."""
    questions = tuple(m["content"] for m in messages if m["role"] == "user")
    responses = tuple(m["content"] for m in messages if m["role"] == "assistant") + (None,)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    digest = hashlib.sha1(repr(messages).encode()).hexdigest()[:12]
    return DialogueItem(item_id=f"prefix-{digest}", source="prefix", questions=questions, responses=responses, system=system)


def render_transcript(messages: Sequence[Message]) -> str:
    """The transcript as text, one block per message."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages) + "\n"
