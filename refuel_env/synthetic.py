"""A small multi-turn dialogue task whose Q-values can be computed exactly (``SyntheticDialogue-v0``).

The task is built from the same parts as the language environments (a :class:`DialogueCore` with
a simulated user and a trajectory reward), so any agent written against them runs on it unchanged,
but every part is a small table:

* the user's message is one word naming the user's state: ``vague``, ``clear`` or ``lost``;
* the assistant's response is mapped to a move: ``ask``, ``answer`` or ``hint`` when the stripped
  response is exactly that word, otherwise ``invalid`` (any other text, the empty message included);
* the user's next message is drawn from ``TRANSITIONS[state][move]`` (it depends on the response);
* after turn H the dialogue's reward is the SUM over its turns of ``UTILITY[state][move]``.

Early turns matter for the outcome: asking when the user is vague earns nothing at once but makes
the user clear, where answering pays most; a myopic policy (the best move if the dialogue ended
now) gives hints instead. This is the setting in which last-turn optimisation suffers the
covariate shift of the REFUEL paper's section 2.1.

The offline data set (each item's ``responses`` and last-turn ``chosen`` / ``rejected``) comes
from :data:`BEHAVIOUR_POLICY`, a fixed policy unlike the initial synthetic policy, or, with
``behaviour="never-ask"``, from :data:`NEVER_ASK`.

:func:`build_synthetic_policy` writes a tiny transformers Llama with a word-level tokenizer and a
ChatML template whose responses are single tokens: at the position that starts the assistant's
turn it can emit only ``ask``, ``answer``, ``hint`` or the end-of-turn token (an empty, invalid
response); after any other token the end-of-turn token is certain in float32. Sampling one token
(``max_new_tokens=1``) therefore draws exactly the response distribution that
``refuel_agents.logprobs.sequence_logprobs`` scores (response token plus end-of-turn token, the
latter with log-probability exactly 0), and Q^pi can be enumerated exactly
(:mod:`refuel_env.synthetic_exact`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from refuel_env.core import DialogueCore
from refuel_env.rewards import RewardModelError, TrajectoryReward, TrajectoryRewardModel
from refuel_env.snapshot import config_digest
from refuel_env.types import DialogueItem, Message
from refuel_env.users import UserRequest, UserSimulator, UserTurn

STATES = ("vague", "clear", "lost")
"""The user's states; the user's message is the state's word."""
MOVES = ("ask", "answer", "hint")
"""The assistant's valid moves; a response is a move when its stripped text is the move's word."""
INVALID = "invalid"
"""The move of any other response (the empty one included)."""
ALL_MOVES = (*MOVES, INVALID)

UTILITY: dict[str, dict[str, float]] = {
    "vague": {"ask": 0.0, "answer": 0.2, "hint": 0.4, INVALID: -0.5},
    "clear": {"ask": 0.1, "answer": 2.0, "hint": 0.5, INVALID: -0.5},
    "lost": {"ask": 0.1, "answer": 0.0, "hint": 0.15, INVALID: -0.5},
}
"""Reward of one turn: UTILITY[user state][move]; the dialogue's reward is the sum over its turns."""

TRANSITIONS: dict[str, dict[str, dict[str, float]]] = {
    "vague": {
        "ask": {"clear": 0.9, "vague": 0.1},
        "answer": {"vague": 0.4, "lost": 0.6},
        "hint": {"clear": 0.1, "vague": 0.7, "lost": 0.2},
        INVALID: {"lost": 0.6, "vague": 0.4},
    },
    "clear": {
        "ask": {"clear": 0.9, "vague": 0.1},
        "answer": {"clear": 0.8, "vague": 0.2},
        "hint": {"clear": 0.8, "vague": 0.2},
        INVALID: {"lost": 0.6, "clear": 0.4},
    },
    "lost": {
        "ask": {"vague": 0.8, "lost": 0.2},
        "answer": {"lost": 0.9, "vague": 0.1},
        "hint": {"vague": 0.3, "lost": 0.7},
        INVALID: {"lost": 1.0},
    },
}
"""The user's next state: TRANSITIONS[state][move][next state] (probabilities)."""

START_PATTERN = ("vague", "vague", "clear", "lost")
"""Item i starts in START_PATTERN[i % 4]: half vague, a quarter clear, a quarter lost."""

BEHAVIOUR_POLICY: dict[str, dict[str, float]] = {
    "vague": {"ask": 0.2, "answer": 0.5, "hint": 0.3},
    "clear": {"ask": 0.1, "answer": 0.7, "hint": 0.2},
    "lost": {"ask": 0.3, "answer": 0.4, "hint": 0.3},
}
"""The fixed policy that wrote the offline data set's responses (never invalid)."""

NEVER_ASK: dict[str, dict[str, float]] = {
    "vague": {"answer": 0.6, "hint": 0.4},
    "clear": {"answer": 0.3, "hint": 0.7},
    "lost": {"answer": 0.5, "hint": 0.5},
}
"""A second behaviour policy, far from a good one: it never asks, so its dialogues rarely reach a clear user."""

BEHAVIOUR_POLICIES = {"mixed": BEHAVIOUR_POLICY, "never-ask": NEVER_ASK}
"""The behaviour policies an offline data set can come from (``SyntheticEnvConfig.behaviour``)."""

SPLIT_SIZES = {"train": 48, "test": 24}
"""Items per split (multiples of 12): item i starts in START_PATTERN[i % 4] and its offline dialogue has
1 + (i // 4) % 3 turns (at most max_turns), so every start state comes with every dialogue length."""

MAX_TURNS = 3
"""Longest dialogue of the task (exact enumeration grows as 12^H)."""


def move_of(response: str) -> str:
    """The move a response makes: its stripped text if that is a move's word, else ``invalid``."""
    if not isinstance(response, str):
        raise TypeError(f"a response must be a str, got {type(response).__name__}")
    text = response.strip()
    return text if text in MOVES else INVALID


def state_of(message: str) -> str:
    """The user state a user message names; a clear error for any other text."""
    text = message.strip()
    if text not in STATES:
        raise ValueError(
            f"the synthetic task's user messages are one of {list(STATES)}, got {message[:40]!r}; "
            "start SyntheticDialogue-v0 episodes from its own items or from prefixes written in its words"
        )
    return text


def turns_of(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(user state, move) of every completed turn of a transcript (user, assistant, ...)."""
    body = [m for m in messages if m["role"] != "system"]
    return [(state_of(u["content"]), move_of(a["content"])) for u, a in zip(body[0::2], body[1::2])]


def dialogue_reward(messages: Sequence[Message]) -> float:
    """The trajectory reward: the sum of UTILITY over the transcript's completed turns."""
    return float(sum(UTILITY[z][a] for z, a in turns_of(messages)))


class SyntheticUser(UserSimulator):
    """The user of the synthetic task: x_{h+1} ~ TRANSITIONS[x_h][move(y_h)], drawn with the request's seed."""

    def messages_problem(self, messages: Sequence[Message]) -> str | None:
        for m in messages:
            if m["role"] == "user" and m["content"].strip() not in STATES:
                return (
                    f"the synthetic task's user messages are one of {list(STATES)}, got {m['content'][:40]!r}; "
                    "start SyntheticDialogue-v0 episodes from its own items or from prefixes written in its words"
                )
        return None

    def respond(self, requests: Sequence[UserRequest]) -> list[UserTurn]:
        turns = []
        for r in requests:
            users = [m for m in r.messages if m["role"] == "user"]
            if not users or r.messages[-1]["role"] != "assistant":
                raise ValueError("the synthetic user needs a dialogue that ends with the assistant's response")
            table = TRANSITIONS[state_of(users[-1]["content"])][move_of(r.messages[-1]["content"])]
            nxt = sample_next_state(table, np.random.default_rng(r.seed))
            turns.append(UserTurn(text=nxt, parsed=True, raw=nxt))
        return turns


def sample_next_state(table: dict[str, float], rng: np.random.Generator) -> str:
    """One draw from a {state: probability} table (STATES order, so a seed fixes the draw)."""
    probs = np.array([table.get(z, 0.0) for z in STATES])
    return STATES[int(rng.choice(len(STATES), p=probs / probs.sum()))]


class SyntheticReward(TrajectoryRewardModel):
    """The task's reward r(s_{H+1}) as a reward model: :func:`dialogue_reward` of each dialogue."""

    name = "synthetic-utility"
    max_length = None

    def count_tokens(self, dialogue: Sequence[Message]) -> int:
        return sum(len(m["content"].split()) for m in dialogue)

    def _score(self, dialogues: Sequence[Sequence[Message]]) -> np.ndarray:
        try:
            return np.array([dialogue_reward(d) for d in dialogues], dtype=np.float64)
        except ValueError as err:
            raise RewardModelError(str(err)) from err


def count_words(text: str) -> int:
    """Response length in words (the task's token count)."""
    return len(text.split())


# -------------------------------------------------------------------------------- data


def make_items(split: str, max_turns: int = MAX_TURNS, behaviour: str = "mixed") -> list[DialogueItem]:
    """The split's items: start state, a behaviour-policy dialogue of K turns (see
    :data:`SPLIT_SIZES`), and chosen / rejected responses at its last turn (two different behaviour
    moves, the one of higher utility chosen). Deterministic for a split."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; the synthetic task has {sorted(SPLIT_SIZES)}")
    policy = BEHAVIOUR_POLICIES[behaviour]
    seed = int.from_bytes(hashlib.sha256(f"synthetic-{split}".encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    items = []
    for i in range(SPLIT_SIZES[split]):
        states, responses = [START_PATTERN[i % len(START_PATTERN)]], []
        turns = min(1 + (i // len(START_PATTERN)) % MAX_TURNS, max_turns)
        for h in range(turns):
            move = _draw(policy[states[-1]], rng)
            responses.append(move)
            if h + 1 < turns:
                states.append(sample_next_state(TRANSITIONS[states[-1]][move], rng))
        last = states[-1]
        first = _draw(policy[last], rng)
        others = {a: p for a, p in policy[last].items() if a != first}
        second = _draw(others, rng)
        chosen, rejected = sorted((first, second), key=lambda a: UTILITY[last][a], reverse=True)
        items.append(DialogueItem(
            item_id=f"synthetic-{split}-{i:03d}", source="synthetic", questions=tuple(states),
            responses=tuple(responses), chosen=chosen, rejected=rejected, task="synthetic",
            meta=(("behaviour_policy", "BEHAVIOUR_POLICY" if behaviour == "mixed" else behaviour),),
        ))
    return items


def _draw(table: dict[str, float], rng: np.random.Generator) -> str:
    keys = list(table)
    probs = np.array([table[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=probs / probs.sum()))]


def start_distribution(split: str = "train") -> dict[str, float]:
    """P(x_1 = state) over the split's items (the environment picks items uniformly)."""
    items = make_items(split, 1)
    return {z: sum(it.questions[0] == z for it in items) / len(items) for z in STATES}


# -------------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class SyntheticEnvConfig:
    """Keyword arguments of ``SyntheticDialogue-v0`` (a subset of the language environments' ones)."""

    max_turns: int = MAX_TURNS
    """Longest dialogue H (1..3); without a 'horizon' reset option H ~ U{1..max_turns}."""
    split: str = "train"
    """'train' or 'test' items (both start half vague, a quarter clear, a quarter lost)."""
    kl_coef: float = 0.0
    """KL penalty coefficient of eq. 11 (log-probs through ``set_logprobs``); 0 keeps Q exact."""
    behaviour: str = "mixed"
    """The behaviour policy of the offline data set: 'mixed' (BEHAVIOUR_POLICY) or 'never-ask' (NEVER_ASK)."""

    def config_id(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k != "behaviour" or v != "mixed"}  # the default keeps its id
        return config_digest("synthetic-v0", fields)


def make_synthetic_config(**kwargs: object) -> SyntheticEnvConfig:
    names = set(SyntheticEnvConfig.__dataclass_fields__)
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown SyntheticDialogue-v0 argument(s) {sorted(unknown)}; valid: {sorted(names)}")
    config = SyntheticEnvConfig(**kwargs)  # type: ignore[arg-type]
    turns = config.max_turns
    if isinstance(turns, bool) or not isinstance(turns, int | np.integer) or not 1 <= turns <= MAX_TURNS:
        raise ValueError(
            f"max_turns must be an int in 1..{MAX_TURNS} for the synthetic task, got {type(turns).__name__} {turns!r:.80}"
        )
    if not isinstance(config.split, str) or config.split not in SPLIT_SIZES:
        raise ValueError(
            f"split must be one of {sorted(SPLIT_SIZES)} (a str), got {type(config.split).__name__} "
            f"{config.split!r:.80}; e.g. split='test'"
        )
    kl = config.kl_coef
    if isinstance(kl, bool) or not isinstance(kl, int | float | np.integer | np.floating) or not np.isfinite(kl) or kl < 0:
        raise ValueError(
            f"kl_coef must be a finite number >= 0, got {type(kl).__name__} {kl!r:.80}; e.g. kl_coef=0.05 (0 keeps Q exact)"
        )
    if not isinstance(config.behaviour, str) or config.behaviour not in BEHAVIOUR_POLICIES:
        raise ValueError(f"unknown behaviour {config.behaviour!r:.80}; the synthetic task has {sorted(BEHAVIOUR_POLICIES)}, "
                         "e.g. behaviour='never-ask'")
    return replace(config, max_turns=int(turns), kl_coef=float(kl))


def build_synthetic_core(config: SyntheticEnvConfig) -> DialogueCore:
    return DialogueCore(
        items=make_items(config.split, config.max_turns, config.behaviour),
        user=SyntheticUser(),
        reward=TrajectoryReward(SyntheticReward(), kl_coef=config.kl_coef),
        max_turns=config.max_turns,
        count_tokens=count_words,
        max_response_tokens=None,
        max_dialogue_tokens=None,
        config_id=config.config_id(),
    )


# -------------------------------------------------------------------------------- policy

SPECIAL_TOKENS = ("<|im_end|>", "<|im_start|>", "[UNK]")
ROLE_TOKENS = ("user", "assistant")
POLICY_VOCAB = (*SPECIAL_TOKENS, *ROLE_TOKENS, *STATES, *MOVES)
RESPONSES = ("", *MOVES)
"""Every response the synthetic policy can give: the empty one (its end-of-turn token first) and the moves."""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SATURATION = 200.0
"""Weight of the marker features on the output layer (see :func:`build_synthetic_policy`)."""


def build_synthetic_policy(path: str | Path, seed: int = 0, *, hidden_size: int = 32, logit_scale: float = 0.3) -> Path:
    """Write the synthetic task's policy (a 2-layer transformers Llama and its tokenizer) to ``path``.

    Word-level tokenizer over :data:`POLICY_VOCAB`, eos = pad = ``<|im_end|>``, a ChatML template
    whose generation prompt ends with the token ``assistant``. Two residual features make the
    response a single token, exactly:

    * feature 0 is set in the embedding of every token except ``assistant``; the output row of
      ``<|im_end|>`` reads it with weight +SATURATION, so after a response token the end of the turn
      has a logit margin of about 150 (probability 1 in float32, log-probability exactly 0);
    * feature 1 is set only in the embedding of ``assistant``; the output rows of every token that is
      not a possible first response token read it with weight -SATURATION, so at the start of a turn
      only ``ask``, ``answer``, ``hint`` and ``<|im_end|>`` have non-zero probability (the others about
      e^-150).

    The layers' output projections start with zero rows for both features, so the initial policy's
    choice among the four responses depends only on the other features (random, scale
    ``logit_scale``, seeded by ``seed``). Everything is an ordinary parameter; training keeps the
    margins far above what float32 resolves (``refuel_agents.exact`` checks them on every use).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if hidden_size < 8:
        raise ValueError(f"hidden_size must be at least 8, got {hidden_size}")
    vocab = {w: i for i, w in enumerate(POLICY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=0, pad_token_id=0, bos_token_id=1,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    allowed = [vocab[t] for t in ("<|im_end|>", *MOVES)]
    forbidden = [i for i in range(len(vocab)) if i not in allowed]
    reply = vocab["assistant"]
    marker = 2.0 * float(np.sqrt(hidden_size - 2))  # four times the energy of the random features
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 1.0)
        emb[:, :2] = 0.0
        emb[:, 0] = marker
        emb[reply, 0] = 0.0
        emb[reply, 1] = marker
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:2] = 0.0
            layer.mlp.down_proj.weight[:2] = 0.0
        head = model.lm_head.weight
        head.normal_(0.0, logit_scale)
        head[:, :2] = 0.0
        head[0, 0] = SATURATION
        head[forbidden, 1] = -SATURATION
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0, bos_token_id=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
