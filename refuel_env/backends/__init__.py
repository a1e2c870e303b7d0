"""Generation backends served outside this process, behind :class:`refuel_env.generation.TextGenerator`.

- :class:`OpenAIChatGenerator`: any OpenAI-compatible ``/v1/chat/completions`` endpoint
  (``vllm serve``, ``transformers serve``, the OpenAI API).
"""

from refuel_env.backends.openai_http import EndpointError, OpenAIChatGenerator

__all__ = ["EndpointError", "OpenAIChatGenerator"]
