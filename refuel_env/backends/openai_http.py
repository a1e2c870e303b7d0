"""Chat completion over HTTP from an OpenAI-compatible server (``vllm serve``, the OpenAI API, ...).

:class:`OpenAIChatGenerator` puts a model served elsewhere (a 70B simulated user on
``vllm serve``, a judge behind the OpenAI API) behind the :class:`TextGenerator` interface. A
batch of N conversations becomes N concurrent ``POST {base_url}/chat/completions`` requests
(at most ``max_concurrency`` at a time); results come back in the batch's order.

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

Failures: 408, 409, 429, 5xx answers and connection errors are retried up to ``max_retries``
times with exponential backoff and jitter (a ``Retry-After`` header sets the wait instead);
401/403 (bad key), 404 (unknown model or wrong path: the error lists the server's models),
other 4xx, and retries spent raise :class:`EndpointError` with what to do; a prompt beyond the
server's context raises :class:`ContextLengthError`.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Literal

import httpx

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
    unreachable, or still failing after the retries."""


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


def request_body(
    model: str,
    messages: Sequence[Message],
    params: SamplingParams,
    seed: int | None,
    extra_body: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON body of one ``/chat/completions`` request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if seed is not None:
        body["seed"] = seed
    return {**body, **extra_body}


def retryable(status: int) -> bool:
    """Whether an HTTP status is worth retrying: timeout, conflict, rate limit, server error."""
    return status in (408, 409, 429) or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def backoff_delay(
    attempt: int, retry_after: float | None, *, base: float, cap: float, rng: random.Random
) -> float:
    """Wait before retry ``attempt`` (0-based): the server's ``Retry-After`` if it sent one, else
    ``base * 2**attempt`` scaled by a random factor in [0.5, 1]; never more than ``cap``."""
    if retry_after is not None:
        return min(retry_after, cap)
    return min(cap, base * 2**attempt) * rng.uniform(0.5, 1.0)


def error_detail(response: httpx.Response) -> tuple[str, str | None]:
    """The server's error message and code, from the OpenAI, vLLM or FastAPI error shapes."""
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase, None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail") or payload.get("detail")
            code = error.get("code")
            return str(message or payload)[:500], str(code) if code is not None else None
        return str(error)[:500], None
    return str(payload)[:500], None


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
        max_retries: retries after the first attempt, for 408/409/429/5xx and connection errors.
        backoff_base, backoff_max: the first backoff in seconds, and the longest wait.
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
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        extra_body: Mapping[str, Any] | None = None,
    ):
        if not isinstance(model, str) or not model:
            raise GenerationError(f"openai backend: model must be the served model's name, got {model!r}")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
            raise GenerationError(f"openai backend: max_context must be a positive int, got {max_context!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise GenerationError(f"openai backend: max_concurrency must be a positive int, got {max_concurrency!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise GenerationError(f"openai backend: max_retries must be an int >= 0, got {max_retries!r}")
        self.name = model
        self.base_url = resolve_base_url(base_url)
        self.api_key, self.api_key_source = resolve_api_key(api_key)
        self.max_context = max_context
        self.tokenizer = load_tokenizer(str(tokenizer)) if tokenizer is not None else None
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.extra_body = dict(extra_body or {})
        self._rng = random.Random()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
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
        bodies = [
            request_body(self.name, conv, params, seeds[i] if seeds is not None else None, self.extra_body)
            for i, conv in enumerate(conversations)
        ]
        with ThreadPoolExecutor(min(self.max_concurrency, len(bodies))) as pool:
            futures = [pool.submit(self._complete, i, body, params.stop) for i, body in enumerate(bodies)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _complete(self, index: int, body: dict[str, Any], stop: Sequence[str]) -> Completion:
        payload = self._post_with_retries(index, body)
        try:
            return to_completion(payload, stop)
        except EndpointError as err:
            raise EndpointError(f"{self.backend}, conversation {index}: {err}") from err

    def _post_with_retries(self, index: int, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}/chat/completions"
        failure, status = "", None
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as err:
                failure, status = f"{type(err).__name__}: {err}", None
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError as err:
                        raise EndpointError(
                            f"{self.backend}, conversation {index}: the answer is not JSON: {response.text[:300]!r}"
                        ) from err
                if not retryable(response.status_code):
                    raise self._refusal(index, response)
                message, _ = error_detail(response)
                failure, status = f"HTTP {response.status_code}: {message}", response.status_code
                retry_after = parse_retry_after(response.headers)
            if attempt == self.max_retries:
                break
            delay = backoff_delay(attempt, retry_after, base=self.backoff_base, cap=self.backoff_max, rng=self._rng)
            logger.warning(
                "%s, conversation %d: %s; retry %d of %d in %.2f s",
                self.backend, index, failure, attempt + 1, self.max_retries, delay,
            )
            time.sleep(delay)
        raise self._exhausted(index, failure, status)

    def _refusal(self, index: int, response: httpx.Response) -> GenerationError:
        """The error for a 4xx answer that retrying cannot fix."""
        status = response.status_code
        message, code = error_detail(response)
        where = f"{self.backend}, conversation {index}: HTTP {status}"
        if status in (401, 403):
            return EndpointError(
                f"{where}, the server refused the API key ({message}). Key used: {self.api_key_source}. "
                f"Set ${API_KEY_ENV} (or pass api_key=) to a key this server accepts."
            )
        if status == 404:
            return EndpointError(
                f"{where}, model {self.name!r} or path {self.base_url}/chat/completions not found ({message}). "
                f"{self._served_models()} The base URL must include the API prefix, as in http://localhost:8000/v1."
            )
        if is_context_length_error(status, message, code):
            return ContextLengthError(
                f"{where}, the prompt plus max_tokens exceeds the served model's context ({message}); "
                f"shorten the dialogue or lower max_new_tokens, and set max_context (now {self.max_context}) "
                "to the server's real context so the environment ends such dialogues itself"
            )
        return EndpointError(f"{where}, the server rejected the request: {message}")

    def _served_models(self) -> str:
        """A sentence naming the models that ``GET {base_url}/models`` lists, or why it could not."""
        url = f"{self.base_url}/models"
        try:
            response = self._client.get(url, timeout=10.0)
            response.raise_for_status()
            ids = [m["id"] for m in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            return f"Listing the served models at {url} failed too ({type(err).__name__}: {err})."
        return f"The server at {self.base_url} serves: {ids}; pass one of them as the model."

    def _exhausted(self, index: int, failure: str, status: int | None) -> EndpointError:
        """The error after the last retry; ``status`` is None when the last try got no answer."""
        attempts = self.max_retries + 1
        where = f"{self.backend}, conversation {index}"
        if status is not None:
            return EndpointError(
                f"{where}: still failing after {attempts} attempts (last: {failure}). The server is overloaded "
                "or broken: check its log, lower max_concurrency, or raise max_retries."
            )
        return EndpointError(
            f"{where}: cannot reach {self.base_url} after {attempts} attempts (last: {failure}). Start the server "
            f"(e.g. `vllm serve <model> --port 8000`) or point base_url / ${BASE_URL_ENV} at where it runs."
        )
