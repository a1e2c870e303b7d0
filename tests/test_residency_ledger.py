"""The memory ledger (refuel_agents/memory_ledger.py) against the tensors really resident on a rank.

Two gloo ranks run two REFUEL iterations under ZeRO-3 (tests/residency_worker.py) with a tiny
policy and a tiny Llama reward model; every phase's peak of resident tensor bytes
(``trainer.residency.resident``) must agree within 10 % with the ledger's figure for the same
run, item by item. Activations are transient and not measured here; the vLLM replica is not used.
"""

from __future__ import annotations

import pytest
import torch
from torchrun_worker import run_ranks

from refuel_agents.residency import PHASES

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

WORLD = 2
PERSISTENT = ("policy", "gradients", "reference", "gathered", "reward")


@pytest.fixture(scope="module")
def reports(word_lm_dir, tmp_path_factory) -> list[dict]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("ledger")
    reward = out / "reward"
    config = LlamaConfig.from_pretrained(word_lm_dir)
    config.num_labels, config.architectures = 1, None
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(reward)
    AutoTokenizer.from_pretrained(word_lm_dir).save_pretrained(reward)
    return run_ranks("residency_worker.py", ["--policy", str(word_lm_dir), "--reward", str(reward), "--out", str(out)],
                     out, world=WORLD)


def _off(measured: int, ledger: int) -> float:
    return abs(measured - ledger) / max(ledger, 1)


def test_every_phase_is_recorded_with_the_items_the_ledger_names(reports):
    for report in reports:
        assert (report["world"], report["zero_stage"]) == (WORLD, 3)
        assert set(report["resident"]) == set(PHASES) == set(report["ledger"])
        for phase in PHASES:
            ledger = {k for k, v in report["ledger"][phase].items() if v and k not in ("activations", "replica")}
            assert ledger == set(report["resident"][phase]), phase


def test_the_ledger_agrees_with_the_resident_bytes_within_10_percent(reports):
    for report in reports:
        for phase in PHASES:
            measured, ledger = report["resident"][phase], report["ledger"][phase]
            for item in PERSISTENT:
                if item in ledger:
                    assert _off(measured.get(item, 0), ledger[item]) <= 0.10, (report["rank"], phase, item, measured, ledger)


def test_the_ledger_agrees_on_the_optimizer_state(reports):
    for report in reports:
        for phase in PHASES:
            measured, ledger = report["resident"][phase], report["ledger"][phase]
            assert _off(measured.get("optimizer", 0), ledger["optimizer"]) <= 0.10, (report["rank"], phase, measured, ledger)
