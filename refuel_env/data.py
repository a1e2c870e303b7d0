"""Dataset dialogues for the environment: UltraInteract and trl-style Anthropic HH as ``DialogueItem``.

Every loader reads rows from one of three sources and turns each row into a
:class:`~refuel_env.types.DialogueItem` with the same conversion code:

* ``"sample"``: the small JSONL file shipped in ``refuel_env/assets`` (written for this project in
  the real schema), read with ``datasets.load_dataset("json", data_files=...)``;
* ``"hub"``: the real Hugging Face dataset, ``datasets.load_dataset(<hub id>, split=...)``;
* a local path: a ``.json`` / ``.jsonl`` / ``.parquet`` file, or a folder of such files in one
  format, holding rows in the same schema.

Schemas (as published on the Hub)
---------------------------------
``openbmb/UltraInteract_pair`` (dataset card; OpenBMB/Eurus README "Dataset Format"), one split
``train`` of 219,522 rows::

    id          str   "<hash>_<tree depth>_<turn>", unique per row
    parent_id   str   rows with the same parent_id share the same first instruction
    task        str   "Coding" | "Math_CoT" | "Math_PoT" | "Logic"
    dataset     str   where the instruction comes from (e.g. "MATH", "codecontest", "hotpotqa")
    trajectory  list[{"from": "user" | "assistant", "value": str}]
                      the interaction so far: it starts with the task instruction and ends with a
                      user turn (observation plus critique after a wrong attempt)
    chosen      str   the preferred next assistant turn
    rejected    str   the dispreferred next assistant turn

``openbmb/UltraInteract_sft`` (dataset card), one split ``train`` of 288,579 rows: ``id``,
``parent_id``, ``task``, ``dataset`` as above, plus ``instruction`` (str) and ``response`` (str).
It is single-turn: a multi-turn history, where there is one, is already flattened into the
instruction text by the dataset, so it becomes one question and one response.

trl-style Anthropic HH, conversational preference format, splits ``train`` and ``test``:

* ``trl-internal-testing/hh-rlhf-trl-style`` (the default hub id: the whole of Anthropic HH,
  helpful and harmless, which the paper's setting two uses), implicit prompt as below.
* ``trl-lib/hh-rlhf-helpful-base`` (dataset card and trl
  ``examples/datasets/hh-rlhf-helpful-base.py``; the helpful half only), explicit prompt::

      prompt    list[{"role", "content"}]  the dialogue so far, ending with a user turn
      chosen    list[{"role": "assistant", "content"}]  one message, the preferred reply
      rejected  list[{"role": "assistant", "content"}]  one message, the dispreferred reply

* ``trl-internal-testing/hh-rlhf-helpful-base-trl-style`` (trl ``examples/datasets/anthropic_hh.py``),
  implicit prompt: ``chosen`` and ``rejected`` are whole conversations (``list[{"role",
  "content"}]``) that differ only in the last assistant message; ``prompt`` (str) is the first user
  message and is not needed. Pass it as ``hub_id=`` to load it.

A leading ``system`` message, where a conversation has one, becomes ``DialogueItem.system``.

Mapping to DialogueItem
-----------------------
``questions`` are the user turns; ``responses`` are the assistant turns, the last one being the
preferred (``chosen``) reply; ``chosen`` / ``rejected`` are the two last replies where the data has
a pair. ``task``: UltraInteract ``Coding`` -> ``"coding"``, ``Math_CoT`` / ``Math_PoT`` ->
``"math"``, ``Logic`` -> ``"logic"``; Anthropic HH -> ``"general"``. ``item_id``: UltraInteract's own
``id``; for HH (which has no id column) ``"hh-"`` plus a hash of the dialogue text, so it is stable
and the same in both HH formats. A repeated id gets a ``#2``, ``#3``... suffix in reading order,
counted in the load report. ``meta`` keeps UltraInteract's ``parent_id``, ``dataset`` and raw task.

Splits
------
``split`` is ``"train"``, ``"test"`` or ``"all"``. Where the source has no held-out split (the
samples, local files, UltraInteract on the Hub) the split is deterministic by hash: a row is in
``"test"`` when the SHA-256 of its key, read as a fraction of 2**64, is below ``test_fraction``
(default :data:`TEST_FRACTION` = 0.1). The key is UltraInteract's ``parent_id`` (rows that share an
instruction stay on the same side) and the item id otherwise. Anthropic HH on the Hub uses its real
``train`` / ``test`` splits (``"all"`` loads ``train+test``).

Filters and reporting
---------------------
Rows are dropped, as in the paper, when they have more than ``max_turns`` user turns (default 5)
or exceed a token limit counted with ``count_tokens`` (any ``Callable[[str], int]``, e.g.
``lambda s: len(tokenizer(s).input_ids)``; plain message text, no chat template):

* ``max_dialogue_tokens``: all questions and responses together, with the longer of the two last
  replies (paper: setting one 2048, setting two UltraInteract 3200);
* ``max_prompt_tokens``: every user turn (paper setting two, HH: 128);
* ``max_response_tokens``: every assistant turn, both last replies included (HH: 512).

A limit is a number, or a mapping from a dialogue's number of turns K to a number (setting two's
UltraInteract limits depend on K, paper table 5).

The limits from the paper are the ``SETTING_*`` constants below. A row is counted under the first
filter it fails, in the order split, turns, dialogue, prompt, response tokens. Nothing is dropped
silently: loaders return :class:`LoadedItems`, a list of items whose ``.report`` (a
:class:`LoadReport`) holds the counts, and the same summary is logged (a warning when rows were
dropped or skipped).

Malformed rows
--------------
A row with a missing field, a wrong type, roles that do not alternate user/assistant, an unknown
task or empty text raises :class:`DataError` naming the row index, its id and the problem. With
``on_malformed="skip"`` such rows are instead dropped, logged one by one and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from refuel_env.types import DialogueItem

logger = logging.getLogger(__name__)

Split = Literal["train", "test", "all"]
OnMalformed = Literal["raise", "skip"]
TokenCounter = Callable[[str], int]
#: A token limit: one number, or one per number of turns K of the dialogue ({K: tokens}).
Limit = int | Mapping[int, int] | None

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ULTRAINTERACT_SAMPLE = ASSETS_DIR / "ultrainteract_pair_sample.jsonl"
ANTHROPIC_HH_SAMPLE = ASSETS_DIR / "anthropic_hh_sample.jsonl"
ULTRAINTERACT_HUB_IDS = {"pair": "openbmb/UltraInteract_pair", "sft": "openbmb/UltraInteract_sft"}
ANTHROPIC_HH_HUB_ID = "trl-internal-testing/hh-rlhf-trl-style"

TEST_FRACTION = 0.1
SETTING_ONE_MAX_DIALOGUE_TOKENS = 2048
SETTING_TWO_ULTRAINTERACT_MAX_DIALOGUE_TOKENS = 3200
SETTING_TWO_HH_MAX_PROMPT_TOKENS = 128
SETTING_TWO_HH_MAX_RESPONSE_TOKENS = 512
#: Setting two, UltraInteract (paper table 5, the original release): every user turn and every assistant
#: turn of a dialogue of K turns at most this many tokens, so that the whole dialogue fits 3200.
SETTING_TWO_ULTRAINTERACT_MAX_PROMPT_TOKENS = {1: 1024, 2: 768, 3: 512, 4: 256, 5: 128}
SETTING_TWO_ULTRAINTERACT_MAX_RESPONSE_TOKENS = {1: 1024, 2: 768, 3: 512, 4: 512, 5: 512}

ULTRAINTERACT_TASKS = {"coding": "coding", "math_cot": "math", "math_pot": "math", "logic": "logic"}
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SPLITS = ("train", "test", "all")

_SCHEMA_HINTS = {
    "ultrainteract_pair": "openbmb/UltraInteract_pair rows need id, parent_id, task, "
    "trajectory [{from, value}, ...] starting and ending with a user turn, chosen and rejected",
    "ultrainteract_sft": "openbmb/UltraInteract_sft rows need id, parent_id, task, instruction and response",
    "anthropic_hh": "trl-style HH rows need either prompt [{role, content}, ...] ending with a user "
    "turn plus one-message chosen/rejected lists, or chosen/rejected whole conversations",
}


class DataError(ValueError):
    """A dataset row or file that cannot be turned into a ``DialogueItem``."""


class _RowProblem(Exception):
    """What is wrong with one row; the loader adds where the row is and what to do."""


@dataclass
class LoadReport:
    """What one loader call read, dropped and kept.

    ``other_split`` counts rows that belong to the other split; ``dropped`` maps a filter name
    (``max_turns``, ``max_dialogue_tokens``, ``max_prompt_tokens``, ``max_response_tokens``) to the
    rows it removed from this split; ``malformed_skipped`` is non-zero only with
    ``on_malformed="skip"``; ``limit_reached`` means reading stopped early at ``limit`` items.
    """

    dataset: str
    source: str
    split: str
    rows_read: int = 0
    other_split: int = 0
    malformed_skipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    renamed_duplicates: int = 0
    kept: int = 0
    limit_reached: bool = False

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        dropped = ", ".join(f"{name}: {count}" for name, count in self.dropped.items() if count) or "none"
        text = (
            f"{self.dataset} [{self.split}] from {self.source}: read {self.rows_read} rows, kept {self.kept}; "
            f"other split {self.other_split}; dropped by filters ({dropped}); "
            f"malformed skipped {self.malformed_skipped}; duplicate ids renamed {self.renamed_duplicates}"
        )
        return text + ("; stopped at limit" if self.limit_reached else "")


class LoadedItems(list[DialogueItem]):
    """The items a loader returns, with its :class:`LoadReport` as ``.report``."""

    def __init__(self, items: Iterable[DialogueItem], report: LoadReport) -> None:
        super().__init__(items)
        self.report = report


Filter = tuple[str, Callable[[DialogueItem], bool]]


# ----------------------------------------------------------------------------- public loaders


def load_ultrainteract(
    source: str | Path = "sample",
    *,
    variant: Literal["pair", "sft"] = "pair",
    split: Split = "train",
    max_turns: int | None = 5,
    max_dialogue_tokens: int | None = None,
    max_prompt_tokens: Limit = None,
    max_response_tokens: Limit = None,
    count_tokens: TokenCounter | None = None,
    limit: int | None = None,
    test_fraction: float = TEST_FRACTION,
    hub_id: str | None = None,
    on_malformed: OnMalformed = "raise",
) -> LoadedItems:
    """UltraInteract dialogues (``variant="pair"``: UltraInteract_pair, ``"sft"``: UltraInteract_sft).

    The hub dataset has only a ``train`` split, so ``split`` is always the hash split by
    ``parent_id`` (see the module docstring). There is no shipped sample for ``"sft"``.
    """
    if variant not in ULTRAINTERACT_HUB_IDS:
        raise ValueError(f"variant must be 'pair' or 'sft', got {variant!r}")
    if variant == "sft" and source == "sample":
        raise ValueError("there is no shipped UltraInteract_sft sample; pass source='hub' or a local path")
    _check_options(split, limit, test_fraction, on_malformed)
    filters = [
        *_turn_filter(max_turns),
        *_token_filters(count_tokens, max_dialogue_tokens=max_dialogue_tokens, max_prompt_tokens=max_prompt_tokens,
                        max_response_tokens=max_response_tokens),
    ]
    name = f"ultrainteract_{variant}"
    rows, where = _read_rows(source, ULTRAINTERACT_SAMPLE, hub_id or ULTRAINTERACT_HUB_IDS[variant], "train")
    convert = _ultrainteract_pair_item if variant == "pair" else _ultrainteract_sft_item
    return _load(name, rows, where, convert, split, filters, limit, test_fraction, on_malformed)


def load_anthropic_hh(
    source: str | Path = "sample",
    *,
    split: Split = "train",
    max_turns: int | None = 5,
    max_prompt_tokens: Limit = None,
    max_response_tokens: Limit = None,
    max_dialogue_tokens: int | None = None,
    count_tokens: TokenCounter | None = None,
    limit: int | None = None,
    test_fraction: float = TEST_FRACTION,
    hub_id: str | None = None,
    on_malformed: OnMalformed = "raise",
) -> LoadedItems:
    """trl-style Anthropic HH dialogues, explicit- or implicit-prompt format (see the module docstring).

    ``source="hub"`` reads the dataset's real ``train`` / ``test`` split (``test_fraction`` is then
    unused); the sample and local files use the hash split.
    """
    _check_options(split, limit, test_fraction, on_malformed)
    filters = [
        *_turn_filter(max_turns),
        *_token_filters(
            count_tokens,
            max_dialogue_tokens=max_dialogue_tokens,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
        ),
    ]
    hub_split = "train+test" if split == "all" else split
    rows, where = _read_rows(source, ANTHROPIC_HH_SAMPLE, hub_id or ANTHROPIC_HH_HUB_ID, hub_split)
    return _load(
        "anthropic_hh",
        rows,
        where,
        _hh_item,
        split,
        filters,
        limit,
        test_fraction,
        on_malformed,
        by_hash=source != "hub",
    )


_LOADERS: dict[str, Callable[..., LoadedItems]] = {
    "ultrainteract": load_ultrainteract,
    "anthropic_hh": load_anthropic_hh,
}


def load_items(dataset: str, source: str | Path = "sample", **kwargs: Any) -> LoadedItems:
    """``load_ultrainteract`` or ``load_anthropic_hh`` by name (``"ultrainteract"`` / ``"anthropic_hh"``)."""
    try:
        loader = _LOADERS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(_LOADERS)}") from None
    items = loader(source, **kwargs)
    if not items and kwargs.get("limit") != 0:
        report = items.report
        raise DataError(
            f"no {dataset} items in split {report.split!r} of {report.source}: {report.summary()}. "
            + _no_items_hint(report)
        )
    return items


def _no_items_hint(report: LoadReport) -> str:
    if report.rows_read == 0:
        return "The source holds no rows; pass a source with data."
    if report.other_split == report.rows_read:
        other = "'test'" if report.split == "train" else "'train'"
        return (
            f"All {report.rows_read} rows fall into the other split; pass split={other} or 'all', or a "
            "source with more rows (the split is by hash, see TEST_FRACTION)."
        )
    return "Loosen the filters that dropped them (max_turns, token limits) or pass a source with more rows."


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> Literal["train", "test"]:
    """The hash split of a key: ``"test"`` for a ``test_fraction`` share of keys, else ``"train"``."""
    fraction = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "test" if fraction < test_fraction else "train"


# ----------------------------------------------------------------------------- reading sources


def _read_rows(
    source: str | Path, sample: Path, hub_id: str, hub_split: str
) -> tuple[Iterable[Mapping[str, Any]], str]:
    """The rows of a source and a description of where they come from."""
    import datasets  # imported here: it is slow to import and only the loaders need it

    if source == "sample":
        return _read_local(sample), str(sample)
    if source == "hub":
        return datasets.load_dataset(hub_id, split=hub_split), f"hub {hub_id} [{hub_split}]"
    return _read_local(Path(source)), str(source)


def _read_local(path: Path) -> Iterable[Mapping[str, Any]]:
    import datasets

    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; source must be 'sample', 'hub' or a path to data files"
        )
    files = sorted(p for p in path.iterdir() if p.suffix in _LOCAL_FORMATS) if path.is_dir() else [path]
    formats = {_LOCAL_FORMATS.get(p.suffix) for p in files}
    if not files or None in formats or len(formats) > 1:
        raise DataError(
            f"{path}: expected one .json/.jsonl/.parquet file or a folder of files in one of these formats, "
            f"found {[p.name for p in files]}"
        )
    blank = [p.name for p in files if _LOCAL_FORMATS[p.suffix] == "json" and _is_blank(p)]
    if blank:
        raise DataError(
            f"{path}: {blank} hold no rows (empty or only blank lines); each line of a .jsonl file must be "
            "one JSON object in the dataset's schema"
        )
    try:
        return datasets.load_dataset(formats.pop(), data_files=[str(p) for p in files], split="train")
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as exc:
        raise DataError(
            f"{path} could not be read ({type(exc).__name__}: {exc.__cause__ or exc}); each JSONL line must be "
            "one JSON object in the dataset's schema"
        ) from exc


def _is_blank(path: Path) -> bool:
    """True when a text file holds nothing but whitespace (read only up to its first other character)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


# ----------------------------------------------------------------------------- the shared loop


def _load(
    name: str,
    rows: Iterable[Mapping[str, Any]],
    where: str,
    convert: Callable[[Mapping[str, Any]], DialogueItem],
    split: Split,
    filters: list[Filter],
    limit: int | None,
    test_fraction: float,
    on_malformed: OnMalformed,
    *,
    by_hash: bool = True,
) -> LoadedItems:
    """Convert, split (by hash unless the source already is the split), filter and count the rows."""
    report = LoadReport(dataset=name, source=where, split=split)
    report.dropped = {filter_name: 0 for filter_name, _ in filters}
    items: list[DialogueItem] = []
    seen_ids: dict[str, int] = {}
    for index, row in enumerate(rows):
        if limit is not None and len(items) >= limit:
            report.limit_reached = True
            break
        report.rows_read += 1
        item = _convert_row(name, where, index, row, convert, on_malformed)
        if item is None:
            report.malformed_skipped += 1
            continue
        key = dict(item.meta).get("parent_id", item.item_id)
        item = _unique_id(item, seen_ids, report)
        if by_hash and split != "all" and split_of(key, test_fraction) != split:
            report.other_split += 1
            continue
        failed = next((filter_name for filter_name, keep in filters if not keep(item)), None)
        if failed is not None:
            report.dropped[failed] += 1
            continue
        items.append(item)
    report.kept = len(items)
    level = logging.WARNING if report.total_dropped or report.malformed_skipped else logging.INFO
    logger.log(level, report.summary())
    return LoadedItems(items, report)


def _convert_row(
    name: str,
    where: str,
    index: int,
    row: Mapping[str, Any],
    convert: Callable[[Mapping[str, Any]], DialogueItem],
    on_malformed: OnMalformed,
) -> DialogueItem | None:
    try:
        return convert(row)
    except _RowProblem as problem:
        row_id = row.get("id") if isinstance(row, Mapping) else None
        named = f" (id {row_id!r})" if row_id is not None else ""
        message = (
            f"{name} row {index}{named} in {where}: {problem}. Expected schema: {_SCHEMA_HINTS[name]}. "
            "Fix or remove the row, or pass on_malformed='skip' to drop malformed rows (they are counted)."
        )
        if on_malformed == "raise":
            raise DataError(message) from None
        logger.warning("skipping malformed row: %s", message)
        return None


def _unique_id(item: DialogueItem, seen_ids: dict[str, int], report: LoadReport) -> DialogueItem:
    count = seen_ids.get(item.item_id, 0) + 1
    seen_ids[item.item_id] = count
    if count == 1:
        return item
    report.renamed_duplicates += 1
    return replace(item, item_id=f"{item.item_id}#{count}")


def _check_options(split: str, limit: int | None, test_fraction: float, on_malformed: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if on_malformed not in ("raise", "skip"):
        raise ValueError(f"on_malformed must be 'raise' or 'skip', got {on_malformed!r}")


# ----------------------------------------------------------------------------- filters


def _turn_filter(max_turns: int | None) -> list[Filter]:
    if max_turns is None:
        return []
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    return [("max_turns", lambda item: item.num_turns <= max_turns)]


def _token_filters(count_tokens: TokenCounter | None, **limits: Limit) -> list[Filter]:
    """Filters for the token limits that are set, in the order given."""
    active = {name: limit for name, limit in limits.items() if limit is not None}
    if not active:
        return []
    if count_tokens is None:
        raise ValueError(f"{', '.join(active)} need count_tokens, a Callable[[str], int]")
    for name, limit in active.items():
        values = limit.values() if isinstance(limit, Mapping) else [limit]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"{name} must be an int >= 1, a mapping of turns to such ints, or None, got {limit!r}")
    measures: dict[str, Callable[[DialogueItem], int]] = {
        "max_dialogue_tokens": lambda item: _dialogue_tokens(item, count_tokens),
        "max_prompt_tokens": lambda item: max(count_tokens(q) for q in item.questions),
        "max_response_tokens": lambda item: max(count_tokens(r) for r in _assistant_texts(item)),
    }
    return [(name, _at_most(measures[name], limit)) for name, limit in active.items()]


def _at_most(measure: Callable[[DialogueItem], int], limit: int | Mapping[int, int]) -> Callable[[DialogueItem], bool]:
    if isinstance(limit, Mapping):
        by_turns = {int(k): v for k, v in limit.items()}
        # A dialogue longer than the mapping covers has no limit set for it: it does not pass.
        return lambda item: item.num_turns in by_turns and measure(item) <= by_turns[item.num_turns]
    return lambda item: measure(item) <= limit


def _assistant_texts(item: DialogueItem) -> list[str]:
    return [text for text in (*item.responses, item.rejected) if text is not None]


def _dialogue_tokens(item: DialogueItem, count_tokens: TokenCounter) -> int:
    """Tokens of the whole dialogue ending in the longer of its two last replies."""
    body = [item.system or "", *item.questions, *(r or "" for r in item.responses[:-1])]
    last = max((count_tokens(t) for t in (item.responses[-1], item.rejected) if t is not None), default=0)
    return sum(count_tokens(text) for text in body if text) + last


# ----------------------------------------------------------------------------- row conversion


def _ultrainteract_pair_item(row: Mapping[str, Any]) -> DialogueItem:
    trajectory = _field(row, "trajectory", list)
    turns = [_turn(entry, f"trajectory[{i}]", "from", "value") for i, entry in enumerate(trajectory)]
    _, questions, responses = _alternate(turns, "trajectory", last_role="user")
    chosen = _text(row, "chosen")
    return DialogueItem(
        item_id=_text(row, "id"),
        source="ultrainteract_pair",
        questions=questions,
        responses=(*responses, chosen),
        chosen=chosen,
        rejected=_text(row, "rejected"),
        task=_ultrainteract_task(row),
        meta=_ultrainteract_meta(row),
    )


def _ultrainteract_sft_item(row: Mapping[str, Any]) -> DialogueItem:
    return DialogueItem(
        item_id=_text(row, "id"),
        source="ultrainteract_sft",
        questions=(_text(row, "instruction"),),
        responses=(_text(row, "response"),),
        task=_ultrainteract_task(row),
        meta=_ultrainteract_meta(row),
    )


def _ultrainteract_task(row: Mapping[str, Any]) -> str:
    task = _text(row, "task")
    try:
        return ULTRAINTERACT_TASKS[task.lower()]
    except KeyError:
        raise _RowProblem(
            f"unknown task {task!r}; UltraInteract tasks are Coding, Math_CoT, Math_PoT, Logic"
        ) from None


def _ultrainteract_meta(row: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    meta = [("parent_id", _text(row, "parent_id")), ("ultrainteract_task", _text(row, "task"))]
    dataset = row.get("dataset")
    if isinstance(dataset, str) and dataset:
        meta.append(("dataset", dataset))
    return tuple(meta)


def _hh_item(row: Mapping[str, Any]) -> DialogueItem:
    """One trl-style HH row, explicit prompt (``prompt`` is a list) or implicit (whole conversations)."""
    if isinstance(row.get("prompt"), list):
        where, context = "prompt", _messages(row["prompt"], "prompt")
        chosen, rejected = _single_reply(row, "chosen"), _single_reply(row, "rejected")
    else:
        chosen_dialogue = _messages(_field(row, "chosen", list), "chosen")
        rejected_dialogue = _messages(_field(row, "rejected", list), "rejected")
        if not all(
            dialogue and dialogue[-1][0] == "assistant" for dialogue in (chosen_dialogue, rejected_dialogue)
        ):
            raise _RowProblem("chosen and rejected conversations must end with an assistant message")
        if chosen_dialogue[:-1] != rejected_dialogue[:-1]:
            raise _RowProblem("chosen and rejected conversations differ before their last message")
        where, context = "chosen", chosen_dialogue[:-1]
        chosen, rejected = chosen_dialogue[-1][1], rejected_dialogue[-1][1]
    system, questions, responses = _alternate(context, where, last_role="user", allow_system=True)
    return DialogueItem(
        item_id=_hh_id(system, questions, responses, chosen, rejected),
        source="anthropic_hh",
        questions=questions,
        responses=(*responses, chosen),
        system=system,
        chosen=chosen,
        rejected=rejected,
        task="general",
    )


def _single_reply(row: Mapping[str, Any], name: str) -> str:
    reply = _messages(_field(row, name, list), name)
    if len(reply) != 1 or reply[0][0] != "assistant":
        raise _RowProblem(
            f"{name} must hold exactly one assistant message when prompt is given, got roles "
            f"{[role for role, _ in reply]}"
        )
    return reply[0][1]


def _hh_id(
    system: str | None, questions: tuple[str, ...], responses: tuple[str, ...], chosen: str, rejected: str
) -> str:
    text = json.dumps([system, questions, responses, chosen, rejected], ensure_ascii=False)
    return "hh-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- validation helpers


def _field(row: Mapping[str, Any], name: str, kind: type) -> Any:
    value = row.get(name)
    if value is None:
        raise _RowProblem(f"missing field {name!r}")
    if not isinstance(value, kind):
        raise _RowProblem(f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _text(row: Mapping[str, Any], name: str) -> str:
    return _nonempty(_field(row, name, str), f"field {name!r}")


def _nonempty(text: str, where: str) -> str:
    if not text.strip():
        raise _RowProblem(f"{where} is empty")
    return text


def _turn(entry: Any, where: str, role_key: str, text_key: str) -> tuple[str, str]:
    """``(role, text)`` of one message given as ``{role_key: ..., text_key: ...}``."""
    if not isinstance(entry, Mapping):
        raise _RowProblem(
            f"{where} must be an object with {role_key!r} and {text_key!r}, got {type(entry).__name__}"
        )
    role, text = entry.get(role_key), entry.get(text_key)
    if role not in ("system", "user", "assistant"):
        raise _RowProblem(f"{where} has {role_key} {role!r}; expected 'user' or 'assistant'")
    if not isinstance(text, str):
        raise _RowProblem(f"{where} {text_key!r} must be a str, got {type(text).__name__}")
    return role, _nonempty(text, where)


def _messages(entries: list[Any], where: str) -> list[tuple[str, str]]:
    return [_turn(entry, f"{where}[{i}]", "role", "content") for i, entry in enumerate(entries)]


def _alternate(
    turns: list[tuple[str, str]], where: str, *, last_role: str, allow_system: bool = False
) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """System text, questions and responses of turns that alternate user/assistant up to ``last_role``.

    With ``allow_system`` the first turn may be a system message.
    """
    start = 1 if allow_system and turns and turns[0][0] == "system" else 0
    system = turns[0][1] if start else None
    if len(turns) == start:
        raise _RowProblem(f"{where} has no user message")
    for i, (role, _) in enumerate(turns[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise _RowProblem(
                f"{where}[{i}] has role {role!r} where {expected!r} was expected "
                "(roles must alternate user/assistant, starting with user)"
            )
    if turns[-1][0] != last_role:
        raise _RowProblem(f"{where} ends with a {turns[-1][0]} turn; it must end with a {last_role} turn")
    questions = tuple(text for role, text in turns[start:] if role == "user")
    return system, questions, tuple(text for role, text in turns[start:] if role == "assistant")
