"""Chat completion over HTTP from an OpenAI-compatible server (``vllm serve``, the OpenAI API, ...).

:class:`OpenAIChatGenerator` puts a model served elsewhere (a 70B simulated user on
``vllm serve``, a judge behind the OpenAI API) behind the :class:`TextGenerator` interface. A
batch of N conversations becomes N concurrent ``POST {base_url}/chat/completions`` requests
(at most ``max_concurrency`` at a time) through the ``openai`` SDK; results come back in the
batch's order.

Where the endpoint comes from (first found wins):

- base URL: the ``base_url`` argument, ``$OPENAI_BASE_URL``, ``https://api.openai.com/v1``.
  It includes the API prefix, as in the OpenAI SDK: ``http://localhost:8000/v1`` for
  ``vllm serve --port 8000``.
- API key: the ``api_key`` argument, ``$OPENAI_API_KEY``, none (no ``Authorization`` header,
  as a local ``vllm serve`` without ``--api-key`` expects).

Request mapping: ``SamplingParams.max_new_tokens`` -> ``max_tokens``, ``temperature``,
``top_p``, ``stop``; ``top_k`` (when > 0) -> ``top_k``, an extension that vLLM accepts and the
OpenAI API and ``transformers serve`` reject. Each request's seed goes out as ``seed``. Servers
differ in what a seed buys: vLLM seeds each request on its own, so a seeded request gives the
same text whatever else is in flight; ``transformers serve`` sets the process-wide torch seed,
so its seeded requests repeat only when they do not overlap; the OpenAI API promises only
"best effort" determinism.

Failures, in two layers:

- The SDK retries 408, 409, 429, 5xx answers, connection errors and timeouts up to
  ``max_retries`` times, waiting 0.5 s doubling to 8 s with jitter, or what a ``Retry-After``
  (or ``retry-after-ms``) header says, up to 2 minutes.
- When those retries are spent, the request is tried again every few seconds until
  ``retry_window`` seconds have passed, so a server that restarts or stalls for minutes costs a
  wait, not the collection. Each time, ``GET {base_url}/models`` checks the server's health. A
  server that answers it without listing the model is the wrong server: that fails at once.
  When the window is spent, the error says whether the server is down (no connection) or up and
  slow (it answers ``/models``, but the request timed out or kept failing).

401/403 (bad key), 404 (unknown model or wrong path: the error lists the server's models) and
other 4xx raise :class:`EndpointError` at once with what to do; a prompt beyond the server's
context raises :class:`ContextLengthError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from refuel_env.generation import (
    Completion,
    ContextLengthError,
    GenerationError,
    SamplingParams,
    TextGenerator,
    apply_stop_strings,
    encode_chat,
    validate_request,
)
from refuel_env.types import Message

logger = logging.getLogger(__name__)

BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_PAUSE = 2.0
"""Seconds between two rounds of SDK retries inside the retry window."""
HEALTH_TIMEOUT = 10.0
"""Seconds the ``GET /models`` health check may take."""

ESTIMATE_BYTES_PER_TOKEN = 3.0
"""Token estimate without a tokenizer: UTF-8 bytes per token of message text. Measured with the
SmolLM2 tokenizer on the shipped samples (texts over 200 characters): median 4.3 bytes per
token, 25th percentile 3.3, 10th percentile 2.4 (math with many digits, split one per token)."""
ESTIMATE_TOKENS_PER_MESSAGE = 8
"""Chat-template tokens estimated around each message (role header, separators)."""
ESTIMATE_TEMPLATE_TOKENS = 32
"""Chat-template tokens estimated once per prompt (a default system header, the generation
prompt). Llama-3.1's template adds about 25 on its own."""


class EndpointError(GenerationError):
    """The HTTP endpoint refused or failed a request: bad key, unknown model or path, bad request,
    unreachable, or still failing at the end of the retry window."""


def resolve_base_url(base_url: str | None) -> str:
    """The base URL from the argument, else ``$OPENAI_BASE_URL``, else the OpenAI API."""
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    if not url.startswith(("http://", "https://")):
        raise GenerationError(
            f"openai backend: base URL {url!r} must start with http:// or https:// "
            f"(for example http://localhost:8000/v1); pass base_url= or set ${BASE_URL_ENV}"
        )
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> tuple[str | None, str]:
    """The API key and where it came from: the argument, ``$OPENAI_API_KEY``, or none."""
    if api_key:
        return api_key, "the api_key argument"
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    return None, f"none (neither api_key= nor ${API_KEY_ENV} is set)"


def request_options(
    model: str,
    messages: Sequence[Message],
    params: SamplingParams,
    seed: int | None,
    extra_body: Mapping[str, Any],
) -> dict[str, Any]:
    """The keyword arguments of one ``chat.completions.create`` call."""
    import openai

    options: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stop": list(params.stop) if params.stop else openai.omit,
        "seed": seed if seed is not None else openai.omit,
    }
    extra = {"top_k": params.top_k} if params.top_k > 0 else {}
    return {**options, "extra_body": {**extra, **extra_body}}


def retryable(status: int) -> bool:
    """Whether an HTTP status is worth retrying: timeout, conflict, rate limit, server error."""
    return status in (408, 409, 429) or status >= 500


def error_detail(err: Any) -> tuple[str, str | None]:
    """The server's error message and code from an SDK status error, whose ``body`` is the answer's
    ``error`` object (OpenAI), the whole JSON (vLLM, FastAPI's ``detail``) or the text."""
    body = err.body
    if isinstance(body, dict):
        code = body.get("code")
        return str(body.get("message") or body.get("detail") or body)[:500], None if code is None else str(code)
    return str(body or err.response.reason_phrase)[:500], None


_CONTEXT_PATTERN = re.compile(r"context.length|maximum context|context window|prompt is too long", re.IGNORECASE)


def is_context_length_error(status: int, message: str, code: str | None) -> bool:
    """Whether a 4xx answer says the prompt (plus ``max_tokens``) exceeds the model's context."""
    if status not in (400, 413, 422):
        return False
    return code == "context_length_exceeded" or bool(_CONTEXT_PATTERN.search(message))


def to_completion(payload: Any, stop: Sequence[str]) -> Completion:
    """A :class:`Completion` from a ``chat.completion`` response body.

    ``finish_reason`` "length" stays "length"; every other reason ("stop", a stop string,
    "content_filter", ...) becomes "stop". Stop strings are cut again here, for servers that
    leave them in the text. Token counts are the server's: ``completion_tokens`` includes the
    end-of-turn token when generation stopped on it (``transformers serve`` counts it), where
    :class:`refuel_env.generation.TransformersGenerator` leaves it out.
    """
    try:
        choice = payload["choices"][0]
        content = choice["message"].get("content") or ""
        usage = payload["usage"]
        prompt_tokens, completion_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise EndpointError(
            f"the response is not a chat completion with choices and usage ({type(err).__name__}: {err}): "
            f"{str(payload)[:300]}"
        ) from err
    text, stopped = apply_stop_strings(content, stop)
    finish: Literal["stop", "length"] = "length" if choice.get("finish_reason") == "length" and not stopped else "stop"
    return Completion(
        text=text.strip(),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish,
    )


def estimate_tokens(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> int:
    """An estimate of the prompt's tokens without a tokenizer (see ``ESTIMATE_*``)."""
    text_tokens = sum(math.ceil(len(m["content"].encode()) / ESTIMATE_BYTES_PER_TOKEN) for m in messages)
    overhead = ESTIMATE_TOKENS_PER_MESSAGE * len(messages) + (ESTIMATE_TEMPLATE_TOKENS if add_generation_prompt else 0)
    return text_tokens + overhead


def load_tokenizer(path: str) -> Any:
    """A local tokenizer with a chat template, for exact token counts."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise GenerationError(
            f"openai backend: cannot load the tokenizer {path!r} ({err}); pass the path of a local folder "
            "with the served model's tokenizer files, or tokenizer=None to estimate token counts"
        ) from err
    if tokenizer.chat_template is None:
        raise GenerationError(f"openai backend: the tokenizer {path!r} has no chat template; counts would be wrong")
    return tokenizer


def retry_after(err: BaseException) -> float:
    """A ``Retry-After`` in seconds from an error answer (the SDK honours one up to 2 minutes and does not
    retry past that), else 0."""
    response = getattr(err, "response", None)
    try:
        return max(0.0, float(response.headers.get("retry-after", 0))) if response is not None else 0.0
    except ValueError:
        return 0.0


def describe(err: BaseException) -> str:
    """An SDK error in a few words: the HTTP status and the server's message, or the transport failure."""
    import openai

    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}: {error_detail(err)[0]}"
    if isinstance(err, openai.APITimeoutError):
        return "timed out"
    cause = err.__cause__ or err
    return f"{type(cause).__name__}: {cause}"


class OpenAIChatGenerator(TextGenerator):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Arguments:
        model: the served model's name (``vllm serve``'s model or ``--served-model-name``,
            an OpenAI model id).
        base_url: the endpoint, API prefix included (see the module docstring for the fallbacks).
        api_key: the bearer key (fallback ``$OPENAI_API_KEY``).
        max_context: the served model's context in tokens (``vllm serve --max-model-len``). The
            server does not tell us; the environment compares ``count_tokens`` with it to end a
            dialogue that no longer fits, so set it to what the server really allows.
        tokenizer: a local tokenizer (folder or cached hub id) of the served model. With it,
            ``count_tokens`` is exact under its chat template; without it, ``count_tokens`` is an
            estimate (UTF-8 bytes / 3 plus template overhead), which overcounts English prose by
            about a third and can undercount digit-heavy text, so the environment may end a
            dialogue somewhat early, or a request may still exceed the server's context and raise
            :class:`ContextLengthError`.
        max_concurrency: requests in flight at once.
        timeout: seconds to wait for a response (generation included); ``connect_timeout`` for a
            connection.
        max_retries: the SDK's retries after the first attempt, for 408/409/429/5xx, connection
            errors and timeouts (backoff from 0.5 s to 8 s, or the server's ``Retry-After``).
        retry_window: seconds during which a request whose SDK retries are spent is tried again
            (every ``RETRY_PAUSE`` seconds plus the SDK's backoff), so that a server restart or a
            stall of minutes does not fail the batch. 0 gives up after the SDK's retries.
        extra_body: extra JSON fields sent with every request (server extensions such as vLLM's
            ``repetition_penalty`` or ``transformers serve``'s ``generation_config``).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_context: int = 8192,
        tokenizer: str | os.PathLike[str] | None = None,
        max_concurrency: int = 16,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        retry_window: float = 600.0,
        extra_body: Mapping[str, Any] | None = None,
    ):
        import openai

        if not isinstance(model, str) or not model:
            raise GenerationError(f"openai backend: model must be the served model's name, got {model!r}")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise GenerationError(f"openai backend: max_context must be a positive int, got {max_context!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise GenerationError(f"openai backend: max_concurrency must be a positive int, got {max_concurrency!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise GenerationError(f"openai backend: max_retries must be an int >= 0, got {max_retries!r}")
        if isinstance(retry_window, bool) or not isinstance(retry_window, int | float) or not 0 <= retry_window < math.inf:
            raise GenerationError(
                f"openai backend: retry_window must be a finite number of seconds >= 0, got {retry_window!r} "
                "(e.g. 600 to keep trying a stalled or restarting server for 10 minutes, 0 for no window)"
            )
        self.name = model
        self.base_url = resolve_base_url(base_url)
        self.api_key, self.api_key_source = resolve_api_key(api_key)
        self.max_context = max_context
        self.tokenizer = load_tokenizer(str(tokenizer)) if tokenizer is not None else None
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.retry_window = float(retry_window)
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        # Without a key no Authorization header goes out: the SDK wants some key, and each request omits it.
        self._headers = {} if self.api_key else {"Authorization": openai.omit}
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key or "none",
            timeout=openai.Timeout(timeout, connect=connect_timeout),
            max_retries=max_retries,
        )

    @property
    def backend(self) -> str:
        return f"openai backend ({self.name} at {self.base_url})"

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> OpenAIChatGenerator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def count_tokens(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> int:
        """Exact under the local tokenizer's chat template if one was given, else an estimate."""
        if self.tokenizer is None:
            return estimate_tokens(messages, add_generation_prompt=add_generation_prompt)
        return len(encode_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt))

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        validate_request(conversations, seeds, self.backend)
        requests = [
            request_options(self.name, conv, params, seeds[i] if seeds is not None else None, self.extra_body)
            for i, conv in enumerate(conversations)
        ]
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
            futures = [pool.submit(self._complete, i, request, params.stop) for i, request in enumerate(requests)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _complete(self, index: int, request: dict[str, Any], stop: Sequence[str]) -> Completion:
        try:
            payload = self._create_within_window(index, request).to_dict()
        except json.JSONDecodeError as err:  # a 200 answer whose body is not JSON
            raise EndpointError(f"{self.backend}, conversation {index}: the answer is not JSON ({err})") from err
        try:
            return to_completion(payload, stop)
        except EndpointError as err:
            raise EndpointError(f"{self.backend}, conversation {index}: {err}") from err

    def _create_within_window(self, index: int, request: dict[str, Any]) -> Any:
        """One chat completion: the SDK's retries, then further rounds until ``retry_window`` is spent."""
        import openai

        first_failure, rounds = None, 0
        while True:
            rounds += 1
            try:
                return self._client.chat.completions.create(**request, extra_headers=self._headers)
            except openai.APIStatusError as err:
                if not retryable(err.status_code):
                    raise self._refusal(index, err) from err
                fault: openai.APIError = err
            except openai.APIConnectionError as err:
                fault = err
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            answered, served = self._health()
            if isinstance(served, list) and self.name not in served:
                raise EndpointError(
                    f"{self.backend}, conversation {index}: {describe(fault)}, and the server at {self.base_url} "
                    f"does not serve {self.name!r} (GET /models lists {served}): a dead or wrong server for this "
                    "model. Restart it with the model, or pass one of those names as the model."
                ) from fault
            waited = now - first_failure
            if waited >= self.retry_window:
                raise self._exhausted(index, fault, answered, served, waited, rounds) from fault
            pause = min(max(RETRY_PAUSE, retry_after(fault)), self.retry_window - waited)
            health = f"up ({'it lists the model' if isinstance(served, list) else served})" if answered else "down"
            logger.warning(
                "%s, conversation %d: %s (%d attempts); the server is %s; trying again in %.1f s "
                "(%.1f of the %g s retry window spent)",
                self.backend, index, describe(fault), self.max_retries + 1, health, pause, waited, self.retry_window,
            )
            time.sleep(pause)

    def _health(self) -> tuple[bool, list[str] | str]:
        """``GET {base_url}/models``: whether the server answered, and the model ids it lists (or why none)."""
        import openai

        try:
            listing = self._client.with_options(max_retries=0, timeout=HEALTH_TIMEOUT).models.list(
                extra_headers=self._headers
            )
            return True, [m.id for m in listing.data]
        except openai.APIStatusError as err:
            return True, f"GET /models answered {describe(err)}"
        except openai.APIConnectionError as err:
            return False, f"GET /models failed too ({describe(err)})"
        except (openai.APIError, ValueError, TypeError, AttributeError) as err:
            return True, f"GET /models gave no model list ({type(err).__name__}: {err})"

    def _refusal(self, index: int, err: Any) -> GenerationError:
        """The error for a 4xx answer that retrying cannot fix."""
        status = err.status_code
        message, code = error_detail(err)
        where = f"{self.backend}, conversation {index}: HTTP {status}"
        if status in (401, 403):
            return EndpointError(
                f"{where}, the server refused the API key ({message}). Key used: {self.api_key_source}. "
                f"Set ${API_KEY_ENV} (or pass api_key=) to a key this server accepts."
            )
        if status == 404:
            served = self._health()[1]
            listing = (
                f"The server at {self.base_url} serves: {served}; pass one of them as the model."
                if isinstance(served, list) else f"Listing the served models failed too: {served}."
            )
            return EndpointError(
                f"{where}, model {self.name!r} or path {self.base_url}/chat/completions not found ({message}). "
                f"{listing} The base URL must include the API prefix, as in http://localhost:8000/v1."
            )
        if is_context_length_error(status, message, code):
            return ContextLengthError(
                f"{where}, the prompt plus max_tokens exceeds the served model's context ({message}); "
                f"shorten the dialogue or lower max_new_tokens, and set max_context (now {self.max_context}) "
                "to the server's real context so the environment ends such dialogues itself"
            )
        return EndpointError(f"{where}, the server rejected the request: {message}")

    def _exhausted(
        self, index: int, fault: Any, answered: bool, served: list[str] | str, waited: float, rounds: int
    ) -> EndpointError:
        """The error at the end of the retry window: the server is down, or up and slow or failing."""
        import openai

        where = f"{self.backend}, conversation {index}"
        tries = f"{rounds * (self.max_retries + 1)} attempts over {waited:.1f} s of retry window (retry_window={self.retry_window:g})"
        if not answered:
            return EndpointError(
                f"{where}: the server is down: cannot reach {self.base_url} ({describe(fault)}; {served}) after {tries}. "
                f"Start the server (e.g. `vllm serve <model> --port 8000`), point base_url / ${BASE_URL_ENV} at where "
                "it runs, or raise retry_window if it needs longer to come back."
            )
        if isinstance(fault, openai.APITimeoutError):
            return EndpointError(
                f"{where}: the server is slow: it answers GET /models, but the request "
                f"timed out after {self.timeout:g} s, {tries}. Raise timeout, lower max_concurrency or "
                "max_new_tokens, or give the server more capacity."
            )
        return EndpointError(
            f"{where}: the server is up (it answers GET /models) but still failing after {tries} "
            f"(last: {describe(fault)}). It is overloaded or broken: check its log, lower max_concurrency, "
            "or raise retry_window."
        )
