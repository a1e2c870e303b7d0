"""The generator that plays the policy: the trained module itself, or a vLLM replica of it.

With ``policy_backend='transformers'`` collection and evaluation sample from the very module being
trained, so they always see the current weights. With ``'vllm'`` each rank has a replica of its
own (:func:`refuel_agents.distributed.start_policy_replica`) that gets the trained weights pushed
in when they changed, and, with ``policy_vllm_sleep``, sleeps while scoring and training use the
GPU (vLLM's sleep mode, level 1: weights to CPU memory, KV cache freed). ``residency.py`` says what
that leaves on a training GPU in each phase.
"""

from __future__ import annotations

from typing import Any

import torch

from refuel_agents import distributed as dist
from refuel_agents import lora, residency
from refuel_env.generation import TextGenerator


class PolicyRollout:
    """The rollout generator of one rank: the trained module's own generator, or its vLLM replica."""

    def __init__(self, generator: TextGenerator, model: Any, path: str, config: Any, rank: int, world: int):
        if config.policy_vllm_sleep and not torch.cuda.is_available():
            raise ValueError("policy_vllm_sleep: vLLM's sleep mode exists on CUDA (and ROCm, XPU) only; this machine has "
                             "no CUDA device, and vLLM refuses it on CPU. Drop --policy-vllm-sleep here")
        self.generator, self.model, self.path, self.config, self.rank, self.world = generator, model, path, config, rank, world
        self.replica: TextGenerator | None = None  # the vLLM engine, once started
        self.weight_pushes = 0  # how often the trained weights were pushed into the replica
        self.pushed_group_numel = 0  # the most parameter elements gathered at once by the last push
        self.pushed_step = 0  # the optimizer step whose weights the replica holds
        self.asleep = False

    @property
    def current(self) -> TextGenerator:
        """The generator collection and evaluation play with (no push, no wake-up: see :meth:`ready`)."""
        return self.replica if self.replica is not None else self.generator

    def start_replica(self) -> None:
        """Start this rank's vLLM replica (LoRA: it takes merged weights). With several ranks, call it after
        DeepSpeed has set up the process group that vLLM's external launcher joins."""
        self.replica = lora.merged_replica(self.model, dist.start_policy_replica(
            self.path, self.config.policy_vllm_kwargs, self.rank, self.world, sleep=self.config.policy_vllm_sleep))

    def ready(self, engine: Any, step: int) -> TextGenerator:
        """The generator, holding the weights of optimizer step ``step``.

        The replica is woken up first if it sleeps (cached allocator blocks go back to the device
        before, so vLLM finds them free), then gets the trained weights if they changed since the
        last push: one group of whole decoder layers at a time, gathered from the ZeRO-3 shards and
        released before the next (:func:`distributed.push_weights`).
        """
        if self.replica is not None:
            if self.asleep:
                residency.empty_cache()
                self.replica.llm.wake_up()
                self.asleep = False
            if step != self.pushed_step:
                self.pushed_group_numel = dist.push_weights(engine, self.replica, self.config.policy_vllm_push_bytes)
                self.pushed_step, self.weight_pushes = step, self.weight_pushes + 1
        return self.current

    def sleep(self) -> None:
        """Free the replica's GPU memory for scoring and training (``policy_vllm_sleep``), and return the freed
        blocks to the device (``empty_cache``)."""
        if self.config.policy_vllm_sleep and self.replica is not None and not self.asleep:
            self.replica.llm.sleep(level=1)
            self.asleep = True
            residency.empty_cache()
