"""The documentation: README.md and docs/*.md.

- Every script command the pages show (``python scripts/X.py ...``, ``.venv/bin/python
  scripts/X.py ...``, and a launcher's ``deepspeed ... scripts/X.py ...``) names a script that
  runs ``--help`` successfully, and every ``--flag`` written after the script is one its help
  lists. Each distinct script runs ``--help`` once; all of them in one Python process, each
  through ``runpy`` as ``__main__`` with its own ``sys.argv`` and ``sys.path[0]``, as
  ``python scripts/X.py --help`` would run it, so the heavy imports are paid once.
- Every relative link resolves: the file or folder exists, and an ``#anchor`` into a Markdown
  page names one of its headings (GitHub's anchors).
- Every ```python block runs: the blocks of a page in order, in one namespace (as a reader pastes
  them), each page in its own. A block that needs what a test machine lacks (a GPU, a server, a
  hub model) is skipped only by a marker comment on the line before it that gives the reason,
  ``<!-- docs-test: skip (needs a GPU: ...) -->``; every block, skipped or not, must compile.
- The README is the front door: at most 200 lines, its test command is the one CI runs, and it
  links every page of docs/, each of which opens with the command or code it documents.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_SCRIPT = re.compile(r"^scripts/[\w./-]+\.py$")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_fences(text: str) -> str:
    return _FENCE.sub("", text)


def _command_texts(text: str) -> list[str]:
    """Shell command lines: the lines of fenced blocks (continuations joined) and inline code spans."""
    lines = []
    for block in _FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += [" ".join(span.split()) for span in _INLINE.findall(_without_fences(text))]
    return lines


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, the flags written after it) for every command in ``text`` that runs a scripts/*.py."""
    found = []
    for line in _command_texts(text):
        for segment in re.split(r"&&|;|\|\|", line):
            try:
                tokens = shlex.split(segment, comments=True)
            except ValueError:  # not shell (prose in backticks)
                continue
            scripts = [k for k, tok in enumerate(tokens) if _SCRIPT.match(tok)]
            if not scripts:
                continue
            k = scripts[0]
            launcher = tokens[:k]
            if launcher and not (launcher[-1].endswith("python") or launcher[0] in ("deepspeed", "torchrun", "accelerate")):
                continue  # e.g. "bash scripts/x.sh" (not .py) or a path in prose
            flags = []
            for tok in tokens[k + 1 :]:
                tok = tok.strip("[]")
                if tok.startswith("--") and not any(ch.isspace() for ch in tok):
                    flags.append(tok.split("=", 1)[0])
            found.append((tokens[k], flags))
    return found


def test_script_commands_are_found_in_the_pages_forms():
    """The extractor sees the forms the pages use; a page that shows none would make the check vacuous."""
    text = (
        "```bash\nbash scripts/setup.sh && .venv/bin/python scripts/train_agent.py --agent refuel   # train\n"
        "deepspeed --num_gpus 8 scripts/train_agent.py --preset x \\\n    --deepspeed cfg.json\n```\n"
        "Run `python scripts/evaluate.py --policy a\n--env-kwargs '{\"k\": 1}' [--no-kl]` or `scripts/demo_env.py`."
    )
    assert script_commands(text) == [
        ("scripts/train_agent.py", ["--agent"]),
        ("scripts/train_agent.py", ["--preset", "--deepspeed"]),
        ("scripts/evaluate.py", ["--policy", "--env-kwargs", "--no-kl"]),
        ("scripts/demo_env.py", []),
    ]
    every = [cmd for page in PAGES for cmd in script_commands(page.read_text())]
    assert {"scripts/train_agent.py", "scripts/evaluate.py", "scripts/reproduce_table1.py"} <= {s for s, _ in every}


_HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
scripts = sys.argv[1:]
results = {}
for script in scripts:
    out = io.StringIO()
    sys.argv = [script, "--help"]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = "returned without exiting"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
        except BaseException as err:
            code = repr(err)
    results[script] = {"code": code, "output": out.getvalue()}
sys.stdout.write("\n" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def script_help() -> dict[str, dict]:
    scripts = sorted({s for page in PAGES for s, _ in script_commands(page.read_text())})
    missing = [s for s in scripts if not (ROOT / s).is_file()]
    assert not missing, f"the docs show commands of scripts that do not exist: {missing}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _HELP_RUNNER, *scripts], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.rsplit("\n", 1)[-1])


def test_every_documented_script_runs_help_and_knows_every_documented_flag(script_help):
    problems = []
    for page in PAGES:
        for script, flags in script_commands(page.read_text()):
            result = script_help[script]
            if result["code"] != 0:
                problems.append(f"{_rel(page)}: `{script} --help` exited with {result['code']!r}: "
                                f"{result['output'][-500:]}")
                continue
            for flag in flags:
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result["output"]):
                    problems.append(f"{_rel(page)}: {script} has no flag {flag} (not in its --help)")
    assert not problems, "\n".join(problems)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown page's headings (lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ...)."""
    anchors: set[str] = set()
    for line in _without_fences(text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def test_heading_anchors_follow_githubs_rule():
    text = "# Evaluation\n## REFUEL: collection, and TRL's `DPOTrainer`\n## Columns\n## Columns\n```\n# not a heading\n```\n"
    assert heading_anchors(text) == {"evaluation", "refuel-collection-and-trls-dpotrainer", "columns", "columns-1"}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page):
    problems = []
    for target in _LINK.findall(_without_fences(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            problems.append(f"{target}: {path} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            problems.append(f"{target}: {_rel(path)} has no heading with the anchor #{anchor}")
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move a topic's details to its page in docs/"
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _LINK.findall(_without_fences(readme))}
    unlinked = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_test_command_is_the_one_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES[1:], ids=_rel)
def test_every_docs_page_opens_with_the_command_or_code_it_documents(page):
    body = [line for line in page.read_text().splitlines() if line.strip() and not line.startswith("<!-- docs-test:")]
    assert body[0].startswith("# "), f"{_rel(page)} should start with its title"
    assert body[1].startswith("```"), f"{_rel(page)} should open with the command or code it documents, not {body[1]!r}"


_PYTHON_BLOCK = re.compile(r"^(?:<!--(?P<marker>[^\n]*?)-->[ \t]*\n)?```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
_SKIP = re.compile(r"^\s*docs-test:\s*skip\s*\((?P<reason>[^()]*)\)\s*$")


def python_blocks(text: str) -> list[tuple[str | None, str]]:
    """(the marker comment on the line before, or None; the code) of every ```python block."""
    return [(m.group("marker"), m.group("code")) for m in _PYTHON_BLOCK.finditer(text)]


def marker_problem(marker: str | None) -> str | None:
    """Why a block's marker is not a skip with its reason (two words at least), or None."""
    if marker is None:
        return None
    match = _SKIP.match(marker)
    if not match or len(match.group("reason").split()) < 2:
        return f"<!--{marker}--> is not '<!-- docs-test: skip (the reason) -->'"
    return None


def test_python_blocks_are_found_and_a_skip_needs_its_reason():
    text = ("```python\nx = 1\n```\n<!-- docs-test: skip (needs a GPU: bf16 weights) -->\n```python\ny = 2\n```\n"
            "<!-- docs-test: skip -->\n```python\nz = 3\n```\n```bash\nls\n```\n")
    blocks = python_blocks(text)
    assert [code for _, code in blocks] == ["x = 1\n", "y = 2\n", "z = 3\n"]
    assert [marker_problem(marker) is None for marker, _ in blocks] == [True, True, False]
    assert marker_problem(" docs-test: skip () ") and marker_problem(" skip (no reason given) ")
    problems = []
    for page in PAGES:
        for i, (marker, code) in enumerate(python_blocks(page.read_text())):
            problems += [f"{_rel(page)} block {i}: {marker_problem(marker)}"] if marker_problem(marker) else []
            try:
                compile(code, f"{_rel(page)} block {i}", "exec")
            except SyntaxError as err:
                problems.append(f"{_rel(page)} block {i} does not compile: {err}")
    assert not problems, "\n".join(problems)


_BLOCK_RUNNER = r"""
import json, sys, traceback
pages = json.loads(sys.stdin.read())
errors = {}
for page, blocks in pages.items():
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page} block {i}", "exec"), namespace)
        except BaseException:
            errors[f"{page} block {i}"] = traceback.format_exc()[-3000:]
            break
sys.stdout.write("\n" + json.dumps(errors))
"""


@pytest.mark.slow
def test_every_python_block_runs():
    """The pages' Python blocks, unskipped, run as written (one process; the models load once)."""
    pages = {_rel(p): [code for marker, code in python_blocks(p.read_text()) if marker is None] for p in PAGES}
    pages = {page: blocks for page, blocks in pages.items() if blocks}
    assert {"README.md", "docs/environment.md"} <= set(pages)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _BLOCK_RUNNER], input=json.dumps(pages), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.rsplit("\n", 1)[-1])
    assert not errors, "\n\n".join(f"{where}:\n{trace}" for where, trace in errors.items())
