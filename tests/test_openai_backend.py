"""The OpenAI-compatible HTTP backend against real local servers.

- A real ``transformers serve`` on CPU serving the embedded SmolLM2 checkpoint (started once per
  session on a free loopback port; the tests that use it are marked slow).
- A small stdlib HTTP server scripted per test for the failure paths (429, 500, 401, 404, 400,
  a slow answer), stopped and restarted on its port for a server outage, and a closed port for an
  unreachable endpoint.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from refuel_env.backends import EndpointError, OpenAIChatGenerator, openai_http
from refuel_env.backends.openai_http import (
    estimate_tokens,
    resolve_api_key,
    resolve_base_url,
    to_completion,
)
from refuel_env.generation import (
    ContextLengthError,
    GenerationError,
    SamplingParams,
    TransformersGenerator,
    encode_chat,
)
from refuel_env.rewards import TrajectoryRewardModel

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class ConstantReward(TrajectoryRewardModel):
    name, max_length = "constant", None

    def _score(self, dialogues):
        return np.zeros(len(dialogues))

    def count_tokens(self, dialogue):
        return 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def completion_payload(text: str, finish: str = "stop", prompt: int = 7, completion: int = 3) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


# ---------------------------------------------------------------- a scripted local server


@dataclass
class Reply:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class FakeServer:
    """A loopback HTTP server; ``respond(body)`` decides each chat answer, ``models`` is /v1/models."""

    url: str
    respond: Callable[[dict], Reply]
    models: list[str] | None
    requests: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, *replies: Reply) -> None:
        """Answer with ``replies`` in turn, then repeat the last one."""
        queue = list(replies)
        self.respond = lambda body: queue.pop(0) if len(queue) > 1 else queue[0]


def echo(body: dict) -> Reply:
    return Reply(200, completion_payload("echo: " + body["messages"][-1]["content"]))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.payload).encode()
        self.send_response(reply.status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **reply.headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        fake: FakeServer = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.requests.append(body)
            fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            reply = fake.respond(body) if self.path == "/v1/chat/completions" else Reply(404, {"detail": "Not Found"})
        time.sleep(reply.delay)
        with fake.lock:
            fake.in_flight -= 1
        self._send(reply)

    def do_GET(self) -> None:  # noqa: N802
        if self.server.fake.models is None:  # a server without the models endpoint
            self._send(Reply(404, {"detail": "Not Found"}))
            return
        models = [{"id": m, "object": "model"} for m in self.server.fake.models]
        self._send(Reply(200, {"object": "list", "data": models}))

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    """Keeps its open connections, so that ``stop`` can drop them as a dying server would."""

    daemon_threads = True
    connections: set[socket.socket]

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)


@dataclass
class LocalServer:
    """A :class:`FakeServer` on a fixed loopback port that can be stopped and started again."""

    fake: FakeServer
    port: int
    httpd: _Server | None = None

    def start(self) -> None:
        self.httpd = _Server(("127.0.0.1", self.port), _Handler)
        self.httpd.connections = set()
        self.httpd.fake = self.fake  # type: ignore[attr-defined]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """Stop listening and cut every open connection (refused connections until ``start``)."""
        assert self.httpd is not None
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in self.httpd.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd = None


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    port = free_port()
    server = LocalServer(FakeServer(f"http://127.0.0.1:{port}/v1", echo, ["served-model"]), port)
    server.start()
    yield server
    if server.httpd is not None:
        server.stop()


@pytest.fixture
def fake(local_server) -> FakeServer:
    return local_server.fake


def client(fake: FakeServer, **kwargs: Any) -> OpenAIChatGenerator:
    options = {"base_url": fake.url, "api_key": "sk-test", "max_retries": 2, "retry_window": 0, **kwargs}
    return OpenAIChatGenerator("served-model", **options)


# ---------------------------------------------------------------- requests and answers


def test_batch_is_concurrent_and_in_order(fake):
    # The first request is the slowest: answers must still come back in the batch's order. Every
    # request takes at least 0.3 s, so all four overlap even when the client starts them a little apart.
    delays = {"q0": 0.9, "q1": 0.7, "q2": 0.5, "q3": 0.3}
    fake.respond = lambda body: Reply(**{**vars(echo(body)), "delay": delays[body["messages"][-1]["content"]]})
    gen = client(fake, max_concurrency=4)
    start = time.perf_counter()
    out = gen.chat([[{"role": "user", "content": f"q{i}"}] for i in range(4)], SamplingParams())
    elapsed = time.perf_counter() - start
    assert [c.text for c in out] == ["echo: q0", "echo: q1", "echo: q2", "echo: q3"]
    assert fake.max_in_flight == 4
    assert elapsed < 1.8  # one after the other would take 2.4 s


def test_max_concurrency_bounds_requests_in_flight(fake):
    fake.respond = lambda body: Reply(**{**vars(echo(body)), "delay": 0.05})
    client(fake, max_concurrency=2).chat([QUESTION] * 6, SamplingParams())
    assert len(fake.requests) == 6 and fake.max_in_flight == 2


def test_request_maps_sampling_params_seeds_and_extra_body(fake):
    gen = client(fake, extra_body={"repetition_penalty": 1.1})
    params = SamplingParams(max_new_tokens=17, temperature=0.3, top_p=0.9, top_k=5, stop=("\n\n",))
    gen.chat([QUESTION, QUESTION], params, seeds=[11, 12])
    first, second = sorted(fake.requests, key=lambda b: b["seed"])
    assert first == {
        "model": "served-model",
        "messages": QUESTION,
        "max_tokens": 17,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["\n\n"],
        "seed": 11,
        "repetition_penalty": 1.1,
    }
    assert second["seed"] == 12
    assert fake.headers[0]["authorization"] == "Bearer sk-test"


def test_unseeded_request_sends_no_seed_and_no_top_k(fake):
    client(fake).chat([QUESTION], SamplingParams())
    assert "seed" not in fake.requests[0] and "top_k" not in fake.requests[0] and "stop" not in fake.requests[0]


def test_finish_reason_usage_and_stop_strings(fake):
    fake.script(Reply(200, completion_payload("  one\n\nUser: two ", finish="length", prompt=21, completion=9)))
    (c,) = client(fake).chat([QUESTION], SamplingParams(stop=("\n\nUser:",)))
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("one", "stop", 21, 9)
    fake.script(Reply(200, completion_payload("cut", finish="length")))
    assert client(fake).chat([QUESTION], SamplingParams())[0].finish_reason == "length"


def test_malformed_answer_is_a_clear_error(fake):
    fake.script(Reply(200, {"choices": []}))
    with pytest.raises(EndpointError, match=r"conversation 0: the response is not a chat completion"):
        client(fake).chat([QUESTION], SamplingParams())


# ---------------------------------------------------------------- failures


def test_429_is_retried_with_backoff_honouring_retry_after(fake, caplog):
    fake.script(
        Reply(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "1"}),
        Reply(429, {"error": {"message": "Rate limit reached"}}),
        Reply(200, completion_payload("fine")),
    )
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="openai"):
        out = client(fake, max_retries=3).chat([QUESTION], SamplingParams())
    assert out[0].text == "fine"
    assert len(fake.requests) == 3
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Retrying request")]
    assert len(retries) == 2 and "in 1.000000 seconds (retry 1 of 3)" in retries[0]
    assert time.perf_counter() - start >= 1.0


def test_persistent_500_stops_after_max_retries(fake):
    fake.script(Reply(500, {"error": {"message": "engine died"}}))
    with pytest.raises(EndpointError, match=r"the server is up \(it answers GET /models\) but still failing after "
                       r"3 attempts over 0\.0 s.*\(last: HTTP 500: engine died\)"):
        client(fake, max_retries=2).chat([QUESTION], SamplingParams())
    assert len(fake.requests) == 3


def test_401_fails_at_once_naming_the_key_variable(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    fake.script(Reply(401, {"error": {"message": "Incorrect API key provided"}}))
    gen = OpenAIChatGenerator("served-model", base_url=fake.url, max_retries=3)
    with pytest.raises(EndpointError, match=r"HTTP 401.*Incorrect API key.*Key used: \$OPENAI_API_KEY.*Set \$OPENAI_API_KEY"):
        gen.chat([QUESTION], SamplingParams())
    assert len(fake.requests) == 1
    assert fake.headers[0]["authorization"] == "Bearer sk-from-env"


def test_404_names_model_and_url_and_lists_served_models(fake):
    fake.script(Reply(404, {"error": {"message": "The model `llama-70b` does not exist."}}))
    gen = OpenAIChatGenerator("llama-70b", base_url=fake.url)
    with pytest.raises(EndpointError) as info:
        gen.chat([QUESTION], SamplingParams())
    message = str(info.value)
    assert "model 'llama-70b'" in message and f"{fake.url}/chat/completions" in message
    assert "does not exist" in message and "serves: ['served-model']" in message
    assert len(fake.requests) == 1


def test_404_for_a_wrong_path_says_so(fake):
    gen = OpenAIChatGenerator("served-model", base_url=fake.url.removesuffix("/v1"))
    with pytest.raises(EndpointError, match=r"not found.*must include the API prefix"):
        gen.chat([QUESTION], SamplingParams())


def test_context_length_400_raises_context_length_error(fake):
    message = (
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
        "(8000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion."
    )
    fake.script(Reply(400, {"object": "error", "message": message, "type": "BadRequestError", "code": 400}))
    with pytest.raises(ContextLengthError, match=r"conversation 0: HTTP 400.*exceeds the served model's context.*8192"):
        client(fake).chat([QUESTION], SamplingParams())
    assert len(fake.requests) == 1


def test_other_400_is_not_retried(fake):
    fake.script(Reply(422, {"detail": "Unexpected fields in the request: {'top_k'}"}))
    with pytest.raises(EndpointError, match=r"HTTP 422, the server rejected the request: Unexpected fields"):
        client(fake).chat([QUESTION], SamplingParams(top_k=4))
    assert len(fake.requests) == 1


def test_unreachable_endpoint_after_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there any more
    gen = OpenAIChatGenerator("m", base_url=url, max_retries=1, retry_window=0)
    with pytest.raises(EndpointError, match=rf"the server is down: cannot reach {url} \(ConnectError.*after 2 attempts"
                       r".*vllm serve.*raise retry_window"):
        gen.chat([QUESTION], SamplingParams())


# ---------------------------------------------------------------- the retry window and the health check


@pytest.fixture
def short_pause(monkeypatch):
    monkeypatch.setattr(openai_http, "RETRY_PAUSE", 0.1)


def test_window_outlasts_a_failing_server_and_logs_its_health(fake, short_pause, caplog):
    fake.script(*[Reply(503, {"error": {"message": "loading"}})] * 3, Reply(200, completion_payload("back")))
    with caplog.at_level(logging.WARNING, logger=openai_http.__name__):
        (out,) = client(fake, max_retries=0, retry_window=60).chat([QUESTION], SamplingParams())
    assert out.text == "back" and len(fake.requests) == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert "HTTP 503: loading (1 attempts); the server is up (it lists the model); trying again in 0.1 s" in warnings[0]


def test_a_retry_after_beyond_the_sdks_two_minutes_is_waited_inside_the_window(fake, monkeypatch):
    # The SDK does not retry when Retry-After exceeds 2 minutes; the window waits that long instead
    # (the wait is recorded here rather than slept).
    from types import SimpleNamespace

    slept: list[float] = []
    monkeypatch.setattr(openai_http, "time", SimpleNamespace(monotonic=time.monotonic, sleep=slept.append))
    fake.script(Reply(429, {"error": {"message": "quota"}}, {"Retry-After": "150"}), Reply(200, completion_payload("ok")))
    (out,) = client(fake, max_retries=3, retry_window=600).chat([QUESTION], SamplingParams())
    assert out.text == "ok" and len(fake.requests) == 2 and slept == [150.0]


def test_dead_server_is_told_apart_at_the_end_of_the_window(short_pause):
    url = f"http://127.0.0.1:{free_port()}/v1"
    gen = OpenAIChatGenerator("m", base_url=url, max_retries=0, retry_window=0.5)
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"the server is down: cannot reach .*Connect.*GET /models failed too.*"
                       r"attempts over 0\.\d s of retry window \(retry_window=0\.5\)"):
        gen.chat([QUESTION], SamplingParams())
    assert time.monotonic() - start >= 0.5


def test_slow_server_is_told_apart_at_the_end_of_the_window(fake, short_pause):
    fake.respond = lambda body: Reply(**{**vars(echo(body)), "delay": 2.0})
    gen = client(fake, max_retries=0, retry_window=0.3, timeout=0.2)
    with pytest.raises(EndpointError, match=r"the server is slow: it answers GET /models, "
                       r"but the request timed out after 0\.2 s, \d attempts.*Raise timeout"):
        gen.chat([QUESTION], SamplingParams())
    assert len(fake.requests) >= 2  # tried again inside the window


def test_a_server_without_a_models_endpoint_counts_as_up(fake):
    fake.models = None
    fake.script(Reply(502, {"error": {"message": "bad gateway"}}))
    with pytest.raises(EndpointError, match=r"the server is up \(it answers GET /models\) but still failing.*"
                       r"last: HTTP 502: bad gateway"):
        client(fake, max_retries=0).chat([QUESTION], SamplingParams())


def test_a_server_without_the_model_fails_at_once(fake):
    fake.models = ["another-model"]
    fake.script(Reply(503, {"error": {"message": "restarting"}}))
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"HTTP 503: restarting, and the server at .* does not serve 'served-model' "
                       r"\(GET /models lists \['another-model'\]\): a dead or wrong server"):
        client(fake, max_retries=0, retry_window=600).chat([QUESTION], SamplingParams())
    assert time.monotonic() - start < 30 and len(fake.requests) == 1


@pytest.mark.slow
def test_user_turns_complete_across_a_30_s_server_outage(local_server):
    """The user's server stops for 30 s (refusing connections) between two steps of a batched
    environment; the step issued during the outage waits and completes once it is back. The window
    comes through ``user_openai_kwargs``, as a training run passes it."""
    import gymnasium as gym

    import refuel_env  # noqa: F401 (registers the ids)

    fake = local_server.fake
    fake.script(Reply(200, completion_payload("The answer skipped a step.\nQuestion: Why does step 2 hold?")))
    envs = gym.make_vec(
        "UltraInteractDialogue-v0", num_envs=3, vectorization_mode="vector_entry_point",
        user_backend="openai", user_model="served-model", user_base_url=fake.url, reward_model=ConstantReward(),
        user_openai_kwargs={"max_retries": 1, "retry_window": 120},
    )
    envs.reset(seed=3, options={"horizon": 3})
    envs.step(["Here is my answer."] * 3)
    assert len(fake.requests) == 3
    local_server.stop()
    restart = threading.Timer(30.0, local_server.start)
    restart.start()
    start = time.monotonic()
    try:
        obs, _, terminated, truncated, info = envs.step(["A second answer."] * 3)
    finally:
        restart.join()
    assert time.monotonic() - start >= 30.0
    assert len(fake.requests) == 6 and all("A second answer." in b["messages"][-1]["content"] for b in fake.requests[3:])
    assert not (terminated.any() or truncated.any())
    assert [o[-1] for o in obs] == [{"role": "user", "content": "Why does step 2 hold?"}] * 3


@pytest.mark.parametrize(
    ("conversations", "seeds", "match"),
    [
        ([], None, r"openai backend \(served-model at .*\): empty batch"),
        ([QUESTION], [1.5], r"openai backend \(served-model .*seed 0 must be an int, got float"),
        ([QUESTION], [True], r"openai backend \(served-model .*seed 0 must be an int, got bool"),
        ([QUESTION], [1, 2], r"got 2 seeds for 1 conversations"),
        ([[{"role": "bot", "content": "x"}]], None, r"openai backend .*conversation 0: message 0"),
    ],
)
def test_bad_input_fails_before_any_request(fake, conversations, seeds, match):
    with pytest.raises(GenerationError, match=match):
        client(fake).chat(conversations, SamplingParams(), seeds=seeds)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": ""}, "model must be the served model's name"),
        ({"max_context": 0}, "max_context must be a positive int"),
        ({"max_concurrency": 0}, "max_concurrency must be a positive int"),
        ({"max_retries": -1}, "max_retries must be an int >= 0"),
        ({"retry_window": -1}, "retry_window must be a finite number of seconds >= 0"),
        ({"retry_window": float("inf")}, "retry_window must be a finite number of seconds >= 0"),
        ({"retry_window": "10m"}, "retry_window must be a finite number of seconds >= 0"),
        ({"base_url": "localhost:8000/v1"}, "must start with http:// or https://"),
        ({"tokenizer": "/nonexistent/tokenizer"}, "cannot load the tokenizer '/nonexistent/tokenizer'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        OpenAIChatGenerator(**{"model": "m", "base_url": "http://127.0.0.1:1/v1", **kwargs})


# ---------------------------------------------------------------- pure pieces


def test_endpoint_precedence(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_base_url(None) == "https://api.openai.com/v1"
    assert resolve_api_key(None)[0] is None
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert resolve_base_url(None) == "http://127.0.0.1:8000/v1"
    assert resolve_base_url("http://127.0.0.1:9/v1") == "http://127.0.0.1:9/v1"
    assert resolve_api_key(None) == ("sk-env", "$OPENAI_API_KEY")
    assert resolve_api_key("sk-arg") == ("sk-arg", "the api_key argument")


def test_to_completion_maps_finish_reasons():
    assert to_completion(completion_payload("a", finish="length"), ()).finish_reason == "length"
    assert to_completion(completion_payload("a", finish="content_filter"), ()).finish_reason == "stop"
    payload = completion_payload("a")
    payload["choices"][0]["message"]["content"] = None
    assert to_completion(payload, ()).text == ""


def test_estimate_overcounts_prose_against_a_real_tokenizer(smollm2_dir):
    gen = OpenAIChatGenerator("m", base_url="http://127.0.0.1:1/v1", tokenizer=smollm2_dir)
    prose = [
        {"role": "user", "content": "How do I keep a sourdough starter alive while I am away for two weeks?"},
        {"role": "assistant", "content": "Feed it, let it rise for an hour, then keep it in the fridge; it will "
         "slow down and survive two weeks. Feed it twice when you are back before baking with it."},
        {"role": "user", "content": "And if it smells of acetone when I come back?"},
    ]
    exact = gen.count_tokens(prose)
    assert exact < estimate_tokens(prose) < 2 * exact
    assert gen.count_tokens(prose, add_generation_prompt=False) < exact


# ---------------------------------------------------------------- selection from the environment config


def test_env_config_selects_the_openai_backend(fake):
    from refuel_env.components import make_config, user_generator

    gen = user_generator(make_config(user_backend="openai", user_model="served-model", user_base_url=fake.url))
    assert isinstance(gen, OpenAIChatGenerator) and gen.base_url == fake.url and gen.name == "served-model"
    assert gen.chat([QUESTION], SamplingParams())[0].text == "echo: What is the capital of France?"
    with pytest.raises(ValueError, match="user_backend='openai' needs user_model"):
        user_generator(make_config(user_backend="openai", user_base_url=fake.url))
    assert gen.tokenizer is None and gen.max_context == 8192  # estimated counts by default
    from refuel_env.embedded import smollm2_path

    exact = user_generator(make_config(user_backend="openai", user_model="served-model", user_base_url=fake.url,
                                       user_openai_kwargs={"tokenizer": str(smollm2_path()), "max_context": 2048}))
    assert exact.max_context == 2048 and exact.tokenizer is not None
    assert exact.count_tokens(QUESTION) == len(encode_chat(exact.tokenizer, QUESTION)) != gen.count_tokens(QUESTION)
    with pytest.raises(ValueError, match=r"user_backend must be one of \['transformers', 'openai', 'vllm'\], got str 'grpc'"):
        user_generator(make_config(user_backend="grpc"))


def test_environment_steps_with_an_http_user(fake):
    import gymnasium as gym

    import refuel_env  # noqa: F401 (registers the ids)

    fake.script(Reply(200, completion_payload("The answer skipped a step.\nQuestion: Why does step 2 hold?")))
    env = gym.make(
        "UltraInteractDialogue-v0", user_backend="openai", user_model="served-model", user_base_url=fake.url,
        reward_model=ConstantReward(), disable_env_checker=True,
    )
    env.reset(seed=3, options={"horizon": 2})
    obs, reward, terminated, truncated, info = env.step("Here is my answer.")
    assert obs[-1] == {"role": "user", "content": "Why does step 2 hold?"}
    assert info["user_parsed"] and not (terminated or truncated)
    (body,) = fake.requests
    assert body["model"] == "served-model" and body["max_tokens"] == 1024 and body["temperature"] == 0.8
    assert isinstance(body["seed"], int) and "Here is my answer." in body["messages"][-1]["content"]


# ---------------------------------------------------------------- a real `transformers serve`


@pytest.mark.slow
def test_real_server_batch_in_order_with_exact_usage(transformers_server, smollm2_dir):
    server = transformers_server
    with OpenAIChatGenerator(server.model, base_url=server.url, tokenizer=smollm2_dir) as gen:
        conversations = [
            QUESTION,
            [{"role": "user", "content": "What is 2+2?"}],
            [{"role": "user", "content": "Say hello in Spanish."}],
        ]
        out = gen.chat(conversations, SamplingParams(max_new_tokens=16, temperature=0.0))
        assert "Paris" in out[0].text and "4" in out[1].text and "hola" in out[2].text.lower()
        for c, conv in zip(out, conversations):
            assert c.prompt_tokens == gen.count_tokens(conv)  # the local chat template counts what the server saw
            assert 0 < c.completion_tokens <= 16
            assert c.finish_reason == ("length" if c.completion_tokens == 16 else "stop")
        assert out[0].finish_reason == "stop"

        (short,) = gen.chat([[{"role": "user", "content": "Explain photosynthesis in detail."}]], SamplingParams(max_new_tokens=5))
        assert (short.finish_reason, short.completion_tokens) == ("length", 5)

    with OpenAIChatGenerator("another-model", base_url=server.url, max_retries=0) as wrong:
        with pytest.raises(EndpointError, match=r"HTTP 400, the server rejected the request: Server is pinned"):
            wrong.chat([QUESTION], SamplingParams(max_new_tokens=2))


@pytest.mark.slow
def test_real_server_greedy_matches_the_in_process_backend(transformers_server, smollm2_dir):
    server = transformers_server
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    with OpenAIChatGenerator(server.model, base_url=server.url) as gen:
        (remote,) = gen.chat([QUESTION], params)
    (local,) = TransformersGenerator.from_pretrained(str(smollm2_dir), device="cpu").chat([QUESTION], params)
    assert (remote.text, remote.finish_reason, remote.prompt_tokens) == (local.text, "stop", local.prompt_tokens)
    assert remote.completion_tokens == local.completion_tokens + 1  # the server counts the end-of-turn token


@pytest.mark.slow
def test_real_server_seed(transformers_server):
    """``transformers serve`` samples only when the generation config says ``do_sample`` (SmolLM2's
    does not, so plain requests are greedy whatever the temperature); its ``generation_config``
    extension turns sampling on. It seeds the process-wide torch generator, so seeded requests
    repeat when they do not overlap: they are sent one at a time here."""
    server = transformers_server
    sampling = {"generation_config": json.dumps({"do_sample": True})}
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    prompt = [{"role": "user", "content": "Write a one-line poem about the sea."}]
    with OpenAIChatGenerator(server.model, base_url=server.url, extra_body=sampling) as gen:
        texts = [gen.chat([prompt], params, seeds=[seed])[0].text for seed in (5, 5, 6)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
