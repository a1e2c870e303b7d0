"""A tiny ArmoRM-style reward model, loaded in tests as remote code (``trust_remote_code=True``).

It has the shape of RLHFlow/ArmoRM-Llama3-8B-v0.1's custom head: a Llama body, a regression
layer onto several objectives, a softmax gate over them, and an output whose ``.score`` is the
gated sum. Like that code it imports ``LLAMA_INPUTS_DOCSTRING`` (gone from current transformers)
and reads the last token at the first pad position minus one. ``logits`` holds the per-objective
rewards, so a caller that reads ``logits`` instead of ``score`` gets different numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING
from transformers.utils import ModelOutput, add_start_docstrings_to_model_forward


@dataclass
class TinyGatedOutput(ModelOutput):
    score: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class TinyGatedRewardModel(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    @add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        states = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        batch = torch.arange(input_ids.shape[0], device=states.device)
        if self.config.pad_token_id is None:
            if input_ids.shape[0] != 1:
                raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
            last = torch.full_like(batch, input_ids.shape[1] - 1)
        else:
            last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        rewards = self.regression_layer(states[batch, last])
        gate = torch.softmax(self.gating(states[:, 0]), dim=-1)
        return TinyGatedOutput(score=(gate * rewards).sum(dim=-1), logits=rewards)
