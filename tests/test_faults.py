"""Load and faults, on loopback: malformed bodies get a 4xx (never a 5xx), a fault inside one
request ends only that request (with an error in its API's shape, streamed or whole), a dead
engine fails its requests at once instead of hanging them, a full queue refuses at once (429,
529 on the Anthropic routes), the tokenizer is never used by two threads at once, and mixed
concurrent load with dropped streams completes. The load is `tools/soak.py`'s, run briefly.

The model is test_server.py's tiny one, scripted by its `Scripts` (plus the faults below).
"""

import asyncio
import importlib.util
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from anthropic.types import ErrorResponse, Message, RawMessageStreamEvent
from openai.types import Completion, ErrorObject
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from test_server import FOREVER, Scripts, metrics, serving, wait_until_idle

from mlx_glm4moe.chat import Reply
from mlx_glm4moe.loading import load
from mlx_glm4moe.server import create_app

_spec = importlib.util.spec_from_file_location(
    "soak", Path(__file__).parent.parent / "tools" / "soak.py"
)
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak
_spec.loader.exec_module(soak)

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}

# The SDKs' types of each API's answers, whole (False) and streamed (True). Not streamed
# completions: the SDK reads their chunks as `Completion`s without checking them, and that type
# refuses the `finish_reason: null` that OpenAI's own chunks carry until the last.
SDK_TYPES = {
    (PATHS[api], streamed): TypeAdapter(kind)
    for api, streamed, kind in [
        ("chat", False, ChatCompletion),
        ("chat", True, ChatCompletionChunk),
        ("completions", False, Completion),
        ("responses", False, Response),
        ("responses", True, ResponseStreamEvent),
        ("messages", False, Message),
        ("messages", True, RawMessageStreamEvent),
    ]
}
FAIL_MID = "fail after three tokens"  # the sampler raises on its fourth draw
EXPLODE = "<<explode>>"  # a stop string that makes the reply's parser raise (`explode`)
APIS = ["chat", "completions", "responses", "messages"]


class Faults(Scripts):
    """`Scripts`, plus a sampler that fails mid-generation for the `FAIL_MID` prompt (a chat's
    last message, or a completion's prompt)."""

    def __call__(self, job):
        prompt = job.messages[-1]["content"] if job.messages else job.spec.prompt
        if prompt == FAIL_MID:
            draws = iter(range(4))
            word = self.tokenizer.encode("a", add_special_tokens=False)[0]

            def sample(logprobs):
                if next(draws, 3) == 3:
                    raise RuntimeError("injected fault")
                return self._prefer(logprobs, word)

            return sample
        return super().__call__(job)


@pytest.fixture(scope="module")
def served(air_q4):
    model, tokenizer = load(air_q4)
    faults = Faults(tokenizer)
    app = create_app(model, tokenizer, model_id="tiny", max_tokens=16, sampler_factory=faults)
    with serving(app) as url:
        yield url, faults, app.state.engine, app


@pytest.fixture
def url(served):
    return served[0]


def body(api: str, text: str, **fields) -> tuple[str, dict]:
    """(path, body) of a request in `api` whose prompt is `text`."""
    user = [{"role": "user", "content": text}]
    prompt = {
        "chat": {"messages": user, "max_tokens": 8},
        "completions": {"prompt": text, "max_tokens": 8},
        "responses": {"input": text, "max_output_tokens": 8},
        "messages": {"messages": user, "max_tokens": 8},
    }[api]
    return PATHS[api], {"model": "tiny", **prompt, **fields}


def sse(url: str, path: str, payload: dict, within: float = 60) -> list:
    """The (event name, data) pairs of a streamed request; fails after `within` seconds (a
    stream kept alive by pings would not time out on its own)."""
    deadline, text = time.monotonic() + within, b""
    with httpx.stream("POST", url + path, json={**payload, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            text += chunk
            assert time.monotonic() < deadline, "the stream did not end"
    text = text.decode()
    out = []
    for block in filter(None, text.split("\n\n")):
        lines = block.split("\n")
        name = next((x[7:] for x in lines if x.startswith("event: ")), None)
        data = next((x[6:] for x in lines if x.startswith("data: ")), None)
        if data is not None:
            out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def assert_api_error(api: str, events: list) -> str:
    """That a stream ended with its API's error event (checked against the SDK's types); its
    message."""
    if api in ("chat", "completions"):
        *_, (_, error), (_, done) = events
        assert done == "[DONE]"
        return ErrorObject.model_validate(error["error"]).message
    if api == "responses":
        adapter = TypeAdapter(ResponseStreamEvent)
        *_, error, failed = (adapter.validate_python(data) for _, data in events)
        assert error.type == "error" and failed.type == "response.failed"
        assert failed.response.status == "failed"
        return error.message
    name, data = events[-1]
    assert name == "error"
    return ErrorResponse.model_validate(data).error.message


def assert_complete(api: str, events: list) -> None:
    """That a stream is whole and each of its events is one the SDK knows."""
    if api in ("chat", "completions"):
        assert events[-1][1] == "[DONE]"
        if api == "chat":
            for _, data in events[:-1]:
                ChatCompletionChunk.model_validate(data)
        return
    if api == "responses":
        adapter = TypeAdapter(ResponseStreamEvent)
        kinds = [adapter.validate_python(data).type for _, data in events]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        return
    adapter = TypeAdapter(RawMessageStreamEvent)
    kinds = [adapter.validate_python(data).type for name, data in events if name != "ping"]
    assert kinds[-1] == "message_stop"


# -- malformed bodies ---------------------------------------------------------------------------


def test_there_are_enough_malformed_bodies():
    assert len(soak.BAD_BODIES) >= 40


@pytest.mark.parametrize(
    ("what", "path", "raw"), soak.BAD_BODIES, ids=[b[0] for b in soak.BAD_BODIES]
)
def test_malformed_body_is_a_4xx(url, what, path, raw):
    r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    if path.startswith("/v1/messages"):
        assert ErrorResponse.model_validate(r.json()).error.type == "invalid_request_error"
    else:
        assert ErrorObject.model_validate(r.json()["error"]).type == "invalid_request_error"


def test_broken_schemas_are_named(url):
    """The 400 for a schema JSON Schema refuses names the tool or the format."""
    tool = {"type": "object", "properties": {"q": {"type": "string"}}, "required": 5}
    path, payload = body(
        "chat",
        "hi",
        tools=[
            {"type": "function", "function": {"name": "find", "parameters": tool, "strict": True}}
        ],
    )
    error = httpx.post(url + path, json=payload).json()["error"]
    assert "'find'" in error["message"] and error["param"] == "tools[0].function.parameters"
    assert "not a valid JSON schema" in error["message"]
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object", "minProperties": -1}},
    }
    error = httpx.post(url + path, json={**payload, "tools": None, "response_format": fmt}).json()
    assert "response format" in error["error"]["message"]
    assert "not a valid JSON schema" in error["error"]["message"]
    assert error["error"]["param"] == "response_format.json_schema.schema"


# -- faults inside a request --------------------------------------------------------------------


def assert_only_it_fails(url: str, api: str, text: str) -> None:
    """A request whose prompt is `text` (which a fault awaits) ends with an error in its API's
    shape, streamed or whole; requests running beside it complete, and the next one too."""

    def good(i):
        path, payload = body(api, f"{uuid.uuid4()} beside a fault {i}")
        return sse(url, path, payload)

    with ThreadPoolExecutor(4) as pool:
        beside = [pool.submit(good, i) for i in range(3)]
        path, payload = body(api, text)
        streamed = sse(url, path, payload)
        whole = httpx.post(url + path, json=payload, timeout=60)
        for f in beside:
            assert_complete(api, f.result())
    assert "generation failed" in assert_api_error(api, streamed)
    assert whole.status_code == 500
    if api == "messages":
        assert ErrorResponse.model_validate(whole.json()).error.type == "api_error"
    else:
        assert ErrorObject.model_validate(whole.json()["error"]).type == "server_error"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    path, payload = body(api, f"{uuid.uuid4()} after the fault")
    assert_complete(api, sse(url, path, payload))


@pytest.mark.parametrize("api", APIS)
def test_a_fault_mid_generation_ends_only_its_request(url, api):
    """The sampler of one request raises after three tokens."""
    assert_only_it_fails(url, api, FAIL_MID)


@pytest.mark.parametrize("api", APIS)
def test_a_fault_while_a_request_starts_ends_only_that_request(served, api, monkeypatch):
    """The prompt cache raises while one request starts (a disk gone, a bug)."""
    url, _, engine, _ = served
    marker = "fault at admission"
    fetch = engine.batch.prompt_cache.fetch

    def failing_fetch(tokens):
        if marker in engine.tokenizer.decode(tokens):
            raise OSError("injected fault at admission")
        return fetch(tokens)

    monkeypatch.setattr(engine.batch.prompt_cache, "fetch", failing_fetch)
    assert_only_it_fails(url, api, marker)
    assert engine.batch.alive


def explode(monkeypatch):
    """Reply.feed raises for a request whose stop strings hold `EXPLODE`."""
    feed = Reply.feed

    def feed_or_raise(self, text):
        if EXPLODE in self.stop.stops:
            raise ValueError("injected parser fault")
        return feed(self, text)

    monkeypatch.setattr(Reply, "feed", feed_or_raise)


def test_a_failing_parser_ends_the_answer_and_cancels_its_generation(served, monkeypatch):
    """The reply's parser raises on the first token of a generation that would never end: the
    stream ends with an error event, the whole answer is a 500, and both generations stop."""
    url, scripts, _, _ = served
    explode(monkeypatch)
    for api, stop in (("chat", "stop"), ("messages", "stop_sequences")):
        path, payload = body(api, FOREVER, max_tokens=4000, **{stop: [EXPLODE]})
        scripts.forever_steps = 0
        assert "failed while answering" in assert_api_error(api, sse(url, path, payload))
        wait_until_idle(url)
        assert scripts.forever_steps < 4000
        scripts.forever_steps = 0
        r = httpx.post(url + path, json=payload, timeout=60)
        assert r.status_code == 500
        wait_until_idle(url)
        assert scripts.forever_steps < 4000


def test_a_stream_notices_its_client_leaving(served):
    """Under an ASGI server of spec 2.4, where Starlette no longer listens for the client's
    leaving and a send to a gone client need not fail, the stream watches for
    ``http.disconnect`` itself: the generation stops."""
    url, scripts, _, app = served
    payload = body("chat", FOREVER, max_tokens=4000, stream=True)[1]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATHS["chat"],
        "raw_path": PATHS["chat"].encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def run() -> None:
        gone, chunks, asked = asyncio.Event(), [], []

        async def receive():
            if not asked:
                asked.append(1)
                return {"type": "http.request", "body": json.dumps(payload).encode()}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):  # never fails, as a send to a gone client may not
            if message["type"] == "http.response.body":
                chunks.append(message)
                if len(chunks) == 4:
                    gone.set()

        await asyncio.wait_for(app(scope, receive, send), 30)

    scripts.forever_steps = 0
    asyncio.run(run())
    wait_until_idle(url)
    assert 0 < scripts.forever_steps < 4000


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_fails_its_requests_at_once(air_q4, monkeypatch):
    """The engine thread dies while a request runs: the request ends with an error (no hang),
    /health says 503, and later requests are refused at once."""
    model, tokenizer = load(air_q4)
    app = create_app(model, tokenizer, model_id="tiny", sampler_factory=Scripts(tokenizer))
    engine = app.state.engine
    monkeypatch.setattr("mlx_glm4moe.server.core.ENGINE_CHECK_INTERVAL", 0.2)

    receive = engine.batch._receive

    def crash_once_both_run(block):
        if engine.batch.metrics.requests_running >= 2:
            raise RuntimeError("injected engine crash")
        receive(block)

    with serving(app) as url:
        engine.batch._receive = crash_once_both_run  # from the engine loop's next turn
        path, payload = body("chat", FOREVER, max_tokens=4000)
        with ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(sse, url, path, payload, 20)
            start = time.monotonic()
            r = httpx.post(url + path, json=payload, timeout=20)
            assert r.status_code == 500 and "engine stopped" in r.json()["error"]["message"]
            assert "engine stopped" in assert_api_error("chat", streamed.result())
        assert time.monotonic() - start < 10
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = httpx.post(url + path, json=payload, timeout=30)
        assert r.status_code == 503


def test_a_full_queue_refuses_at_once(air_q4):
    """With one decode slot and room for one waiting request, a third is refused: 429 through
    the OpenAI SDK (rate limited), 529 through Anthropic's (overloaded)."""
    model, tokenizer = load(air_q4)
    app = create_app(
        model,
        tokenizer,
        model_id="tiny",
        sampler_factory=Scripts(tokenizer),
        decode_concurrency=1,
        max_queue=1,
    )
    with serving(app) as url:
        path, payload = body("chat", FOREVER, max_tokens=4000, stream=True)
        # (The line iterators are kept: one dropped closes its connection, a disconnect.)
        with httpx.stream("POST", url + path, json=payload, timeout=60) as running:
            first = running.iter_lines()
            next(first)
            with httpx.stream("POST", url + path, json=payload, timeout=60) as waiting:
                second = waiting.iter_lines()
                next(second)
                deadline = time.monotonic() + 10
                while metrics(url)["glm4moe_requests_waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert httpx.get(f"{url}/health").json()["queue"] == 1
                with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
                    with pytest.raises(openai.RateLimitError) as e:
                        c.chat.completions.create(
                            model="tiny", messages=[{"role": "user", "content": "hi"}]
                        )
                assert e.value.code == "rate_limit_exceeded"
                assert e.value.response.headers["retry-after"] == "1"
                with anthropic.Anthropic(base_url=url, api_key="x", max_retries=0) as c:
                    with pytest.raises(anthropic.OverloadedError) as e:
                        c.messages.create(
                            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
                        )
                assert e.value.body["error"]["type"] == "overloaded_error"
        wait_until_idle(url)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200


# -- the tokenizer ------------------------------------------------------------------------------


class Borrowed:
    """Stands in for the Hugging Face tokenizer and fails as its Rust core does when two calls
    overlap (``RuntimeError: Already borrowed``), each call holding the tokenizer a while."""

    def __init__(self, inner):
        self.inner, self.busy, self.overlaps = inner, False, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.busy:
                self.overlaps += 1
                raise RuntimeError("Already borrowed")
            self.busy = True
            try:
                time.sleep(0.002)
                return attr(*args, **kwargs)
            finally:
                self.busy = False

        return call


def test_the_tokenizer_is_never_used_by_two_threads_at_once(served, monkeypatch):
    """Prompts are encoded in worker threads while the event loop decodes tokens (log
    probabilities) and counts reasoning tokens: on one lock, no two calls overlap.

    With the real tokenizer the overlap does not fail here: tokenizers 0.23.3 and transformers
    5.25, hammered for 6 s by 3 threads encoding 600 KB texts beside 3 threads decoding and
    encoding short ones (and again beside calls that switch truncation on and off), raised
    nothing: their calls take the Rust object's shared borrow, and none of the server's calls
    changes its settings. A tokenizer that fails on overlap (`Borrowed`) stands in for the
    versions and calls that do: without the lock, these requests get 500s."""
    url, scripts, engine, _ = served
    borrowed = Borrowed(engine.tokenizer._tokenizer)
    monkeypatch.setattr(engine.tokenizer, "_tokenizer", borrowed)
    # The scripted sampler (the test's, on the engine thread) reads the tokenizer itself.
    monkeypatch.setattr(scripts, "tokenizer", borrowed.inner)
    long = "a long prompt to encode " * 30

    def ask(i):
        kind = ["chat", "completions", "responses", "count"][i % 4]
        if kind == "count":
            payload = {"model": "tiny", "messages": [{"role": "user", "content": long}]}
            return httpx.post(f"{url}/v1/messages/count_tokens", json=payload, timeout=60)
        path, payload = body(kind, f"{i} {long}")
        if kind == "chat":
            payload |= {"logprobs": True, "top_logprobs": 3}
        elif kind == "completions":
            payload |= {"logprobs": 3}
        else:
            payload = body("responses", "think then answer")[1]
        return httpx.post(url + path, json=payload, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(16)))
    assert [r.status_code for r in answers] == [200] * 16, [
        r.text for r in answers if r.status_code != 200
    ]
    assert borrowed.overlaps == 0


# -- load ---------------------------------------------------------------------------------------


def test_mixed_load_with_drops_and_bad_inputs(url):
    """`tools/soak.py` briefly: 160 requests, 16 at a time, on all four APIs, a quarter of them
    malformed, every third stream hung up at its first token. Every kept request completes,
    every malformed one gets a 4xx, nothing hangs; afterwards no generation is left running
    and the server answers."""
    checked = []

    def check(path, streamed, data):  # each answer and event against the SDK's types
        if data.get("type") != "ping" and (path, streamed) in SDK_TYPES:
            SDK_TYPES[path, streamed].validate_python(data)
            checked.append((path, streamed))

    figures = soak.run(url, concurrency=16, requests=160, max_tokens=8, timeout=60, check=check)
    print("\nsoak:", figures.summary(16))
    assert figures.failures == [] and figures.hangs == figures.server_errors == 0
    assert figures.requests == 160 and figures.bad_inputs == figures.refused == 40
    assert figures.completed + figures.disconnects == 120 and figures.disconnects > 0
    assert set(checked) == set(SDK_TYPES)
    wait_until_idle(url)
    health = httpx.get(f"{url}/health").json()
    assert {k: health[k] for k in ("status", "engine", "queue")} == {
        "status": "ok",
        "engine": "alive",
        "queue": 0,
    }
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "still here", "max_tokens": 2})
    assert r.status_code == 200
