"""Shared fixtures: tiny models built from a config (never downloaded), offline hub settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct checkpoint (converted once from the packaged GGUF)."""
    from refuel_env.embedded import smollm2_path

    return smollm2_path()


def _tiny_llama(path, smollm2_dir, hidden_size: int):
    """A 2-layer Llama with random weights (seed 0), ``hidden_size`` wide in 4 heads, with SmolLM2's tokenizer
    and chat template, saved to ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer Llama with random weights and SmolLM2's tokenizer and chat template."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, hidden_size=32)


@pytest.fixture(scope="session")
def vllm_lm_dir(tmp_path_factory, smollm2_dir):
    """The same, 256 wide: a head size of 64, which the vLLM CPU backend accepts."""
    return _tiny_llama(tmp_path_factory.mktemp("vllm-llama"), smollm2_dir, hidden_size=256)


@pytest.fixture(scope="session")
def tiny_generator(tiny_lm_dir):
    from refuel_env.generation import TransformersGenerator

    return TransformersGenerator.from_pretrained(str(tiny_lm_dir), device="cpu")


WORDS = ("yes no maybe the a of to and is in it you that what why how this one two three four five "
         "six seven eight nine ten").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_word_lm(path):
    """Save a tiny random Llama and a 32-word word-level tokenizer (ChatML template) to ``path``.

    Small enough to train in seconds, with a vocabulary small enough that sampling explores it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|im_end|>", "<|im_start|>", "[UNK]", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=0, pad_token_id=0, bos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def word_lm_dir(tmp_path_factory):
    return build_word_lm(tmp_path_factory.mktemp("word-lm"))


@dataclass
class RealServer:
    url: str
    model: str
    log: Path  # the server's output: one `POST /v1/chat/completions` line per request


@pytest.fixture(scope="session")
def transformers_server(smollm2_dir, tmp_path_factory) -> Iterator[RealServer]:
    """``transformers serve`` on CPU with the embedded SmolLM2 pinned, offline, on a free port, for the session."""
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.fail(f"{exe} not found: install transformers with its serving extras (`pip install 'transformers[serving]'`)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = str(smollm2_dir)
    log_path = tmp_path_factory.mktemp("transformers-serve") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [str(exe), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "info"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.returncode is not None else "not healthy after 180 s"
                pytest.fail(f"`{' '.join(command)}` {state}; its log:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield RealServer(f"http://127.0.0.1:{port}/v1", model, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
