"""The OpenAI-compatible server, run for real on a loopback port and driven by the `openai` client.

The tiny model has random weights, so tests that need particular output (reasoning, tool calls,
stop strings) script it through `create_app(sampler_factory=...)`: a request whose last user
message names a script gets that text's tokens, then the stop token.
"""

import contextlib
import inspect
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import mlx.core as mx
import openai
import pytest
import uvicorn
from mlx_lm import sample_utils

from mlx_glm4moe.loading import load
from mlx_glm4moe.server import create_app
from mlx_glm4moe.server.app import main as server_main

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SCRIPTS = {
    "think then answer": "\n<think>The user wants a greeting.</think>\nHello there, friend!",
    "call the weather tool": (
        "\n<think>I should check the weather.</think>\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    ),
    "say hello world": "\n<think></think>\nHello world. Goodbye world.",
    # Calls that fit a forced tool_choice's grammar token for token (test_constrain.py shows
    # the grammar forcing calls out of a model that would not write them).
    "call for rome": (
        "\n<think>Let me see.</think>\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>"
    ),
    "call for rome at once": (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>"
    ),
}
FOREVER = "count forever"  # a script that never ends (for disconnects)
BROKEN = "break the sampler"  # the sampler factory raises


class Scripts:
    """A `sampler_factory`: scripted requests prefer their script's next token among the tokens
    the server allows (so a forbidden token stays forbidden); other requests sample normally."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = min(tokenizer.eos_token_ids)
        self.forever_steps = 0

    def __call__(self, job):
        prompt = job.messages[-1]["content"] if job.messages else None
        if prompt == BROKEN:
            raise RuntimeError("scripted failure")
        if prompt == FOREVER:
            return self._forever
        if prompt not in SCRIPTS:
            return None
        ids = iter(self.tokenizer.encode(SCRIPTS[prompt], add_special_tokens=False))
        return lambda logprobs: self._prefer(logprobs, next(ids, self.eos))

    def _forever(self, logprobs):
        # An empty reasoning section first: until the parser meets a tag it holds text back.
        ids = self.tokenizer.encode("\n<think></think>\na", add_special_tokens=False)
        self.forever_steps += 1
        return self._prefer(logprobs, ids[min(self.forever_steps, len(ids)) - 1])

    @staticmethod
    def _prefer(logprobs, token):
        bonus = mx.where(mx.arange(logprobs.shape[-1]) == token, 1e9, 0.0)
        return mx.argmax(logprobs + bonus, axis=-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port: yields its base URL."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(air_q4):
    model, tokenizer = load(air_q4)
    scripts = Scripts(tokenizer)
    app = create_app(model, tokenizer, model_id="tiny", max_tokens=64, sampler_factory=scripts)
    with serving(app) as url:
        yield url, scripts, model.args.max_position_embeddings


@pytest.fixture
def url(server):
    return server[0]


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def user(text):
    return [{"role": "user", "content": text}]


def collect(stream):
    """Reassemble a streamed completion: (role, content, reasoning, tool-call chunks, finish,
    usage)."""
    role, content, reasoning, calls, finish, usage = None, "", "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            role = delta.role or role
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            calls += delta.tool_calls or []
            finish = choice.finish_reason or finish
    return role, content, reasoning, calls, finish, usage


# -- the API ------------------------------------------------------------------------------------


def test_models_and_health(url, client):
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200
    body = health.json()
    assert {k: body[k] for k in ("status", "engine", "queue")} == {
        "status": "ok",
        "engine": "alive",
        "queue": 0,
    }
    assert set(body["memory"]) == {"active", "cache", "peak"}
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_reasoning_and_content(client):
    r = client.chat.completions.create(model="tiny", messages=user("think then answer"))
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.reasoning_content == "The user wants a greeting."
    assert choice.message.content == "Hello there, friend!"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model="tiny", messages=user("think then answer"), stream=True
    )
    role, content, reasoning, calls, finish, usage = collect(stream)
    assert (role, content, reasoning, calls, finish, usage) == (
        "assistant",
        "Hello there, friend!",
        "The user wants a greeting.",
        [],
        "stop",
        None,
    )


def test_tool_call(client):
    r = client.chat.completions.create(
        model="tiny", messages=user("call the weather tool"), tools=[WEATHER_TOOL]
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content is None and msg.reasoning_content == "I should check the weather."
    [call] = msg.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}


def test_tool_call_streams_whole(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("call the weather tool"),
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        stream=True,
        stream_options={"include_usage": True},
    )
    role, content, reasoning, calls, finish, usage = collect(stream)
    assert (role, content, reasoning, finish) == (
        "assistant",
        "",
        "I should check the weather.",
        "tool_calls",
    )
    [call] = calls  # one chunk carries the whole call
    assert call.index == 0 and call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0


def script_length(server, prompt):
    """Tokens in a script (the stop token that follows it not counted)."""
    return len(server[1].tokenizer.encode(SCRIPTS[prompt], add_special_tokens=False))


def test_length_after_a_complete_tool_call(server, client):
    """The token budget runs out right after `</tool_call>`: the call is returned whole, and
    the finish reason is still "length" (the model did not end its turn)."""
    ask = dict(
        model="tiny",
        messages=user("call the weather tool"),
        tools=[WEATHER_TOOL],
        max_tokens=script_length(server, "call the weather tool"),
    )
    r = client.chat.completions.create(**ask)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", ask["max_tokens"])
    [call] = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    _, _, _, calls, finish, _ = collect(client.chat.completions.create(**ask, stream=True))
    assert finish == "length" and len(calls) == 1


def test_tool_choice_none_forbids_calls(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=user("call the weather tool"),
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    assert "get_weather" in r.choices[0].message.content  # the rest of the script, as text


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("prompt", "tool_choice", "thinking"),
    [
        ("call for rome", "required", True),
        ("call for rome at once", NAMED, False),
    ],
)
def test_tool_choice_forces_a_call(client, prompt, tool_choice, thinking):
    def ask(choice):
        return client.chat.completions.create(
            model="tiny",
            messages=user(prompt),
            tools=[WEATHER_TOOL],
            tool_choice=choice,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
        ).choices[0]

    forced = ask(tool_choice)
    assert forced.finish_reason == "tool_calls"
    [call] = forced.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Rome"},
    )
    # "none" masks the opening tag: the script's call is left as text.
    assert ask("none").message.tool_calls is None


def test_thinking_off(client):
    on = client.chat.completions.create(model="tiny", messages=user("think then answer"))
    off = client.chat.completions.create(
        model="tiny",
        messages=user("think then answer"),
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    # Thinking off: the prompt ends with "/nothink" and an empty <think></think>. A think block
    # the model writes anyway is still reasoning (issue 13, item 4), never left in content.
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
    assert off.choices[0].message.reasoning_content == "The user wants a greeting."
    assert off.choices[0].message.content == "Hello there, friend!"


def test_stop_strings(client):
    r = client.chat.completions.create(model="tiny", messages=user("say hello world"), stop="world")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello ", "stop")
    stream = client.chat.completions.create(
        model="tiny", messages=user("say hello world"), stop=["Good", "xyz"], stream=True
    )
    _, content, _, _, finish, _ = collect(stream)
    assert (content, finish) == ("Hello world. ", "stop")


def test_length_and_sampling_fields(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=user("anything at all"),
        max_completion_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=1,
    )
    again = client.chat.completions.create(
        model="tiny",
        messages=user("anything at all"),
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=1,
    )
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].message == again.choices[0].message  # seeded: the same draw


@pytest.fixture
def sampler_args(monkeypatch):
    """The temp, top_p, top_k and min_p of every mlx-lm `make_sampler` call the server makes
    (it still makes the sampler)."""
    real = sample_utils.make_sampler
    calls = []

    def spy(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append({k: bound.arguments[k] for k in ("temp", "top_p", "top_k", "min_p")})
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_glm4moe") and getattr(module, "make_sampler", None) is real:
            monkeypatch.setattr(module, "make_sampler", spy)
    return calls


def test_sampling_fields_reach_the_sampler(client, claude, sampler_args):
    """Each request's temperature, top_p, top_k and min_p are what its sampler is made with;
    a field left out takes the server's default (temp 0, top_p 1, top_k 0, min_p 0)."""
    fields = dict(temperature=0.7, top_p=0.9, extra_body={"top_k": 5, "min_p": 0.05})
    asked = {"temp": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05}
    client.chat.completions.create(model="tiny", messages=user("anything"), max_tokens=2, **fields)
    assert sampler_args.pop() == asked
    stream = client.chat.completions.create(
        model="tiny", messages=user("anything"), max_tokens=2, stream=True, **fields
    )
    collect(stream)
    assert sampler_args.pop() == asked
    client.completions.create(model="tiny", prompt="The quick", max_tokens=2, **fields)
    assert sampler_args.pop() == asked
    client.completions.create(model="tiny", prompt="The quick", max_tokens=2, temperature=0.3)
    assert sampler_args.pop() == {"temp": 0.3, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    # (The anthropic client no longer takes these as arguments; the API still does.)
    anthropic_fields = {"temperature": 0.7, "top_p": 0.9, "top_k": 5}
    claude.messages.create(
        model="tiny", max_tokens=2, messages=user("anything"), extra_body=anthropic_fields
    )
    assert sampler_args.pop() == {**asked, "min_p": 0.0}
    assert sampler_args == []


def test_chat_logprobs(client):
    kwargs = dict(model="tiny", messages=user("say hello world"), logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kwargs)
    entries = r.choices[0].logprobs.content
    # Every generated token but the stop token, reasoning and tags included.
    assert len(entries) == r.usage.completion_tokens - 1
    assert "".join(e.token for e in entries) == SCRIPTS["say hello world"]
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob >= max(e.logprob, e.top_logprobs[1].logprob)
        assert bytes(e.bytes).decode() == e.token
    streamed = [
        e
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for choice in chunk.choices
        if choice.logprobs
        for e in choice.logprobs.content
    ]
    assert streamed == entries
    plain = client.chat.completions.create(model="tiny", messages=user("say hello world"))
    assert plain.choices[0].logprobs is None


def test_completions(client):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=2)
    [choice] = r.choices
    assert r.object == "text_completion" and r.usage.completion_tokens <= 6
    assert choice.finish_reason in ("stop", "length") and choice.text
    lp = choice.logprobs
    # One entry per generated token but a stop token. (Joined, the entries need not spell the
    # text here: the tiny model's vocabulary is larger than its tokenizer's.)
    stopped = choice.finish_reason == "stop"
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens - stopped
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, logprobs=2, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    # A stop string inside the text cuts it there.
    stop = choice.text[1:3]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, stop=stop)
    assert cut.choices[0].text == choice.text[: choice.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, echo=True)
    assert echoed.choices[0].text == prompt + choice.text


def test_parallel_tool_calls_false_keeps_one_call(client):
    one = SCRIPTS["call the weather tool"]
    two = one + "\n" + one[one.index("<tool_call>") :]
    assert two.count("<tool_call>") == 2
    SCRIPTS["call twice"] = two
    try:

        def calls(parallel):
            r = client.chat.completions.create(
                model="tiny",
                messages=user("call twice"),
                tools=[WEATHER_TOOL],
                parallel_tool_calls=parallel,
                max_tokens=400,
            )
            return r.choices[0].message.tool_calls

        assert len(calls(True)) == 2 and len(calls(False)) == 1
    finally:
        del SCRIPTS["call twice"]


def test_conversation_reuses_prompt_cache(client):
    first = [{"role": "system", "content": "You are terse."}] + user("call the weather tool")
    r1 = client.chat.completions.create(model="tiny", messages=first, tools=[WEATHER_TOOL])
    call = r1.choices[0].message.tool_calls[0]
    history = first + [
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": r1.choices[0].message.reasoning_content,
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    r2 = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER_TOOL])
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens <= cached < r2.usage.prompt_tokens


# -- bad input ----------------------------------------------------------------------------------

GOOD = {"model": "tiny", "messages": user("hello")}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({**GOOD, "temperature": "hot"}, "temperature"),
        ({**GOOD, "stream": "yes"}, "stream"),
        ({**GOOD, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({**GOOD, "messages": []}, "messages"),
        ({"model": "tiny"}, None),
        ({**GOOD, "max_tokens": -5}, "max_tokens"),
        ({**GOOD, "max_completion_tokens": 0}, "max_completion_tokens"),
        (
            {
                **GOOD,
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        ({**GOOD, "tool_choice": "required"}, "tool_choice"),
        ({**GOOD, "stop": ""}, "stop"),
        (
            {**GOOD, "chat_template_kwargs": {"enable_thinking": "no"}},
            "chat_template_kwargs.enable_thinking",
        ),
    ],
)
def test_bad_request(url, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
    ],
)
def test_bad_completion_request(url, body, param):
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_prompt_longer_than_context(server, client):
    context = server[2]
    long = " ".join(f"word{i}" for i in range(context))  # at least one token per word
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user(long))
    assert e.value.code == "context_length_exceeded"


def test_failure_inside_generation_is_a_500(client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="tiny", messages=user(BROKEN))
    assert e.value.body["type"] == "server_error"
    stream = client.chat.completions.create(model="tiny", messages=user(BROKEN), stream=True)
    with pytest.raises(openai.APIError, match="generation failed"):
        collect(stream)
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)


def test_unknown_route(url):
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


# -- disconnects and load -----------------------------------------------------------------------


def test_disconnect_mid_stream_cancels(server, client):
    url, scripts, _ = server
    scripts.forever_steps = 0
    body = {**GOOD, "messages": user(FOREVER), "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]  # a few chunks, then hang up
    assert all(line.startswith("data: ") or not line for line in got)
    wait_until_idle(url)
    assert 0 < scripts.forever_steps < 4000  # cancelled, not run to its length
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)

    scripts.forever_steps = 0
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request given up by its client
        httpx.post(
            f"{url}/v1/chat/completions",
            json={**body, "stream": False},
            timeout=httpx.Timeout(30, read=0.5),
        )
    wait_until_idle(url)
    assert scripts.forever_steps < 4000  # 0 if it was cancelled before it started
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)


def wait_until_idle(url, within=30.0):
    """Poll the engine until it runs and holds no request; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        m = metrics(url)
        if m["glm4moe_requests_running"] == m["glm4moe_requests_waiting"] == 0:
            return
        assert time.monotonic() < deadline, (
            "the request still runs: the disconnect did not cancel it"
        )
        time.sleep(0.05)


def test_concurrent_streaming_clients(url):
    """8 clients × 10 streamed requests at once: each answer arrives whole and equals the one a
    single client gets. Client c asks the 10 prompts starting at the c-th, so at any moment
    the clients are waiting for different answers."""
    n_clients, n_requests = 8, 10
    prompts = [f"Load test {i}: tell me a story" for i in range(n_requests)]

    def ask(client, prompt):
        t = time.perf_counter()
        stream = client.chat.completions.create(
            model="tiny",
            messages=user(prompt),
            stream=True,
            max_tokens=12,
            temperature=0,
            seed=7,
            # Thinking off: the parser streams content from the first token (with thinking on
            # it holds text back until the model writes a tag, which random weights rarely do).
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        role, content, reasoning, calls, finish, _ = collect(stream)
        assert role == "assistant" and finish in ("stop", "length")
        return (content, reasoning, [c.function for c in calls]), time.perf_counter() - t

    def session(c):
        order = prompts[c:] + prompts[:c]
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
            return [(p, *ask(client, p)) for p in order]

    single = session(0)
    alone = {p: answer for p, answer, _ in single}
    assert len(set(map(repr, alone.values()))) > 1  # the prompts get different answers
    with ThreadPoolExecutor(n_clients) as pool:
        results = [r for s in pool.map(session, range(n_clients)) for r in s]
    assert len(results) == n_clients * n_requests
    assert all(answer == alone[p] for p, answer, _ in results)
    print(
        f"\nload: {len(results)} requests, {n_clients} concurrent, 0 failures, median latency "
        f"{statistics.median(t for _, _, t in results):.3f} s (one client alone: "
        f"{statistics.median(t for _, _, t in single):.3f} s)"
    )


def metrics(url):
    text = httpx.get(f"{url}/metrics").text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_concurrent_requests_decode_together(url):
    """8 clients × 64 tokens: at least 4 tokens generated per decode step (the metrics say)."""
    names = {
        f"glm4moe_{n}"
        for n in (
            "requests_total",
            "requests_running",
            "requests_waiting",
            "prompt_tokens_total",
            "generation_tokens_total",
            "decode_steps_total",
            "batch_size",
        )
    }
    before = metrics(url)
    assert names <= set(before) and before["glm4moe_requests_running"] == 0

    def ask(_):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as c:
            return c.chat.completions.create(model="tiny", messages=user(FOREVER), max_tokens=64)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(a.usage.completion_tokens == 64 for a in answers)
    after = metrics(url)
    steps = after["glm4moe_decode_steps_total"] - before["glm4moe_decode_steps_total"]
    tokens = after["glm4moe_generation_tokens_total"] - before["glm4moe_generation_tokens_total"]
    assert tokens == 8 * 64 and tokens / steps >= 4
    assert after["glm4moe_requests_total"] - before["glm4moe_requests_total"] == 8
    assert after["glm4moe_requests_running"] == after["glm4moe_requests_waiting"] == 0
    assert after["glm4moe_prompt_tokens_total"] > before["glm4moe_prompt_tokens_total"]


# -- the Anthropic Messages API -----------------------------------------------------------------

ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}


@pytest.fixture
def claude(url):
    with anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def blocks(message):
    return [b.model_dump(exclude_none=True) for b in message.content]


def test_anthropic_text_and_thinking(claude):
    r = claude.messages.create(
        model="tiny",
        max_tokens=64,
        system="You are kind.",
        messages=[{"role": "user", "content": "think then answer"}],
        metadata={"user_id": "u1"},
    )
    assert r.type == "message" and r.role == "assistant" and r.model == "tiny"
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    [thinking, text] = r.content
    assert thinking.type == "thinking" and thinking.thinking == "The user wants a greeting."
    assert thinking.signature
    assert (text.type, text.text) == ("text", "Hello there, friend!")
    u = r.usage  # the prompt: read from the cache, written to it, or neither
    assert u.output_tokens > 0
    assert u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens > 0

    with claude.messages.stream(
        model="tiny",
        max_tokens=64,
        system="You are kind.",
        messages=[{"role": "user", "content": "think then answer"}],
    ) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_message()
    assert blocks(final) == blocks(r) and final.stop_reason == "end_turn"
    assert kinds >= {"message_start", "content_block_stop", "message_delta", "message_stop"}

    def ask(thinking):
        return claude.messages.create(
            model="tiny",
            max_tokens=64,
            messages=[{"role": "user", "content": "think then answer"}],
            thinking=thinking,
        )

    on, off = ask({"type": "enabled", "budget_tokens": 1024}), ask({"type": "disabled"})

    # GLM's switch: "/nothink" and an empty think block close the prompt. (A think block the
    # model writes anyway is still returned as thinking.)
    def prompt_tokens(r):
        u = r.usage
        return u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens

    assert prompt_tokens(off) > prompt_tokens(on)
    assert [b.type for b in on.content] == ["thinking", "text"]


def test_anthropic_stream_events(url):
    body = {
        "model": "tiny",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "call the weather tool"}],
        "tools": [ANTHROPIC_WEATHER],
    }
    with httpx.stream("POST", f"{url}/v1/messages", json=body, timeout=60) as r:
        events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"]
    assert events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_start") == events.count("content_block_stop") == 2


def test_anthropic_tool_round_trip(claude):
    ask = [{"role": "user", "content": "call the weather tool"}]
    r = claude.messages.create(model="tiny", max_tokens=64, messages=ask, tools=[ANTHROPIC_WEATHER])
    assert r.stop_reason == "tool_use"
    [thinking, call] = r.content
    assert thinking.type == "thinking"
    assert (call.type, call.name, call.input) == (
        "tool_use",
        "get_weather",
        {"city": "Paris", "days": 3},
    )
    with claude.messages.stream(
        model="tiny", max_tokens=64, messages=ask, tools=[ANTHROPIC_WEATHER]
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [
        ("thinking", None),
        ("tool_use", {"city": "Paris", "days": 3}),
    ]
    history = ask + [
        {"role": "assistant", "content": blocks(r)},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": '{"temp_c": 21}'},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    again = claude.messages.create(
        model="tiny", max_tokens=8, messages=history, tools=[ANTHROPIC_WEATHER]
    )
    u = r.usage
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert again.usage.cache_read_input_tokens >= prompt
    failed = history[:-1] + [
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": [{"type": "text", "text": "city not found"}],
                    "is_error": True,
                }
            ],
        }
    ]
    assert claude.messages.create(
        model="tiny", max_tokens=4, messages=failed, tools=[ANTHROPIC_WEATHER]
    ).usage.output_tokens


def test_anthropic_tool_choice_and_stop_sequences(claude):
    def ask(prompt, **kwargs):
        return claude.messages.create(
            **{"model": "tiny", "max_tokens": 64, **kwargs},
            messages=[{"role": "user", "content": prompt}],
        )

    forced = ask("call for rome", tools=[ANTHROPIC_WEATHER], tool_choice={"type": "any"})
    assert forced.stop_reason == "tool_use" and forced.content[-1].input == {"city": "Rome"}
    named = ask(
        "call for rome at once",
        tools=[ANTHROPIC_WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        thinking={"type": "disabled"},
    )
    assert named.content[-1].name == "get_weather"
    none = ask("call the weather tool", tools=[ANTHROPIC_WEATHER], tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and "tool_use" not in {b.type for b in none.content}
    stopped = ask("say hello world", stop_sequences=["world"])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "world")
    assert stopped.content[-1].text == "Hello "
    short = ask("count forever", max_tokens=3)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_anthropic_streamed_stop_sequence(claude):
    """The streamed `message_delta` names the stop sequence that ended the message."""
    with claude.messages.stream(
        model="tiny",
        max_tokens=64,
        messages=[{"role": "user", "content": "say hello world"}],
        stop_sequences=["xyz", "world"],
    ) as stream:
        [delta] = [event.delta for event in stream if event.type == "message_delta"]
        final = stream.get_final_message()
    assert (delta.stop_reason, delta.stop_sequence) == ("stop_sequence", "world")
    assert (final.stop_sequence, final.content[-1].text) == ("world", "Hello ")


def test_anthropic_max_tokens_after_a_complete_tool_call(server, claude):
    """The budget runs out right after `</tool_call>`: the call is there, and the stop reason
    is "max_tokens", not "tool_use"."""
    ask = dict(
        model="tiny",
        max_tokens=script_length(server, "call the weather tool"),
        messages=[{"role": "user", "content": "call the weather tool"}],
        tools=[ANTHROPIC_WEATHER],
    )
    r = claude.messages.create(**ask)
    assert (r.stop_reason, r.usage.output_tokens) == ("max_tokens", ask["max_tokens"])
    assert r.content[-1].input == {"city": "Paris", "days": 3}
    with claude.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "max_tokens"
    assert streamed.content[-1].input == {"city": "Paris", "days": 3}


def test_anthropic_count_tokens(claude):
    messages = [{"role": "user", "content": "think then answer"}]
    count = claude.messages.count_tokens(model="tiny", messages=messages, system="Be brief.")
    r = claude.messages.create(model="tiny", max_tokens=2, messages=messages, system="Be brief.")
    u = r.usage
    assert count.input_tokens == (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    )
    # Tools are part of the prompt, and of the count.
    tools = claude.messages.count_tokens(
        model="tiny", messages=messages, system="Be brief.", tools=[ANTHROPIC_WEATHER]
    )
    assert tools.input_tokens > count.input_tokens
    r = claude.messages.create(
        model="tiny", max_tokens=2, messages=messages, system="Be brief.", tools=[ANTHROPIC_WEATHER]
    )
    u = r.usage
    assert tools.input_tokens == (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    )


MESSAGES = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1]",
        {k: v for k, v in MESSAGES.items() if k != "max_tokens"},
        {**MESSAGES, "max_tokens": 0},
        {**MESSAGES, "messages": []},
        {**MESSAGES, "messages": [{"role": "system", "content": "hi"}]},
        {**MESSAGES, "messages": [{"role": "user", "content": 5}]},
        {**MESSAGES, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        {**MESSAGES, "temperature": "hot"},
        {**MESSAGES, "tools": [{"name": "x"}]},
        {**MESSAGES, "tool_choice": {"type": "tool"}, "tools": [ANTHROPIC_WEATHER]},
        {**MESSAGES, "tool_choice": {"type": "tool", "name": "nope"}, "tools": [ANTHROPIC_WEATHER]},
        {**MESSAGES, "tool_choice": {"type": "any"}},
        {**MESSAGES, "thinking": {"type": "sometimes"}},
        {**MESSAGES, "stop_sequences": [""]},
    ],
)
def test_anthropic_bad_request(url, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/messages", content=content)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]


def test_anthropic_client_errors(claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model="tiny", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(
            model="tiny", max_tokens=8, messages=[{"role": "user", "content": BROKEN}]
        )


# -- the command line ---------------------------------------------------------------------------


def test_command_line_with_api_key(air_q4):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_glm4moe.server",
            "--model",
            str(air_q4),
            "--port",
            str(port),
            "--api-key",
            "sesame",
            "--max-tokens",
            "4",
            "--log-level",
            "warning",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as e:
                c.models.list()
            assert e.value.code == "invalid_api_key"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": user("hi")})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0) as c:
            r = c.chat.completions.create(model="x", messages=user("hi"))
            assert r.usage.completion_tokens <= 4 and r.model == air_q4.name
        hi = {"model": "x", "max_tokens": 2, "messages": user("hi")}
        with anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0) as c:
            with pytest.raises(anthropic.AuthenticationError) as e:
                c.messages.create(**hi)
            assert e.value.body["error"]["type"] == "authentication_error"
        r = httpx.post(f"{url}/v1/messages", json=hi)  # no key at all
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with anthropic.Anthropic(base_url=url, api_key="sesame", max_retries=0) as c:
            assert c.messages.create(**hi).usage.output_tokens <= 2
        r = httpx.post(f"{url}/v1/messages", json=hi, headers={"authorization": "Bearer sesame"})
        assert r.status_code == 200 and r.json()["type"] == "message"
        assert httpx.get(f"{url}/metrics").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- prompt cache usage -------------------------------------------------------------------------


def test_prompt_cache_usage_in_both_apis(url, client, claude):
    """A second request sharing the first's prompt reports the cached tokens, each API its way;
    Anthropic counts the tokens written to the cache as cache creation."""
    system = "You answer about the weather. " * 8
    first = claude.messages.create(
        model="tiny",
        max_tokens=2,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "usage check, first"}],
    )
    u = first.usage
    assert u.cache_creation_input_tokens > 0
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert prompt == u.cache_read_input_tokens + u.cache_creation_input_tokens  # all stored
    second = claude.messages.create(
        model="tiny",
        max_tokens=2,
        system=system,
        messages=[{"role": "user", "content": "usage check, second"}],
    )
    assert second.usage.cache_read_input_tokens > 0

    messages = [{"role": "system", "content": system}, *user("usage check, openai")]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    chunks = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1


def test_anthropic_usage_without_cache_control(claude):
    """Without a cache_control breakpoint nothing counts as cache creation (the client asked to
    cache nothing): input_tokens is the prompt less what was read from the cache, and an
    identical request sent again reads more of it and creates nothing, streamed or not."""
    ask = {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": f"{uuid.uuid4()} usage without breakpoints"}],
    }
    first = claude.messages.create(**ask).usage
    again = claude.messages.create(**ask).usage
    with claude.messages.stream(**ask) as stream:
        streamed = stream.get_final_message().usage
    for u in (first, again, streamed):
        assert u.cache_creation_input_tokens == 0
        prompt = u.input_tokens + u.cache_read_input_tokens
        assert prompt == first.input_tokens + first.cache_read_input_tokens
    assert first.input_tokens > again.input_tokens
    assert again.cache_read_input_tokens > first.cache_read_input_tokens


def test_anthropic_repeated_request_creates_no_cache(claude):
    """With a cache_control breakpoint the first request creates its cache entry; the same
    request again reads it and creates nothing."""
    system = [
        {
            "type": "text",
            "text": f"{uuid.uuid4()} You are kind. " * 4,
            "cache_control": {"type": "ephemeral"},
        }
    ]
    ask = {"model": "tiny", "max_tokens": 2, "system": system, "messages": user("hello")}
    first = claude.messages.create(**ask).usage
    again = claude.messages.create(**ask).usage
    assert first.cache_creation_input_tokens > 0
    assert again.cache_creation_input_tokens == 0
    assert again.cache_read_input_tokens >= first.cache_creation_input_tokens - 1


def test_cache_control_marks_the_request_pinned():
    from mlx_glm4moe.server.anthropic import MessagesRequest, has_cache_control

    plain = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    mark = {"cache_control": {"type": "ephemeral"}}
    text = [{"type": "text", "text": "hi", **mark}]
    assert not has_cache_control(MessagesRequest.model_validate(plain))
    for marked in (
        {**plain, **mark},
        {**plain, "system": text},
        {**plain, "messages": [{"role": "user", "content": text}]},
        {**plain, "tools": [{"name": "t", "input_schema": {"type": "object"}, **mark}]},
    ):
        assert has_cache_control(MessagesRequest.model_validate(marked))


def test_prompt_cache_dir_survives_a_restart(air_q4, tmp_path):
    """The prompt cache goes to --prompt-cache-dir at shutdown; a new server finds it."""
    model, tokenizer = load(air_q4)
    body = {"messages": user("remember this prompt across restarts"), "max_tokens": 2}
    cached = []
    for _ in range(2):
        with serving(create_app(model, tokenizer, prompt_cache_dir=tmp_path)) as url:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert len(list(tmp_path.glob("*/*.safetensors"))) == 1
    prompt = r.json()["usage"]["prompt_tokens"]
    assert cached == [0, prompt - 1]


@pytest.mark.parametrize(
    "flags",
    [["--prompt-cache-gb", "-1"], ["--prompt-cache-disk-gb", "-1"], ["--prompt-cache-size", "0"]],
)
def test_command_line_refuses_bad_cache_flags(flags, capsys):
    with pytest.raises(SystemExit) as e:
        server_main(["--model", "never-read", *flags])
    assert e.value.code == 2 and "--prompt-cache-disk-gb >= 0" in capsys.readouterr().err


def main_kwargs(monkeypatch, argv: list[str]) -> dict:
    """What `glm4moe-server` with `argv` hands `create_app` (which stands in, and stops there)."""
    made = {}

    def create_app(**kwargs):
        made.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("mlx_glm4moe.server.app.create_app", create_app)
    with pytest.raises(SystemExit):
        server_main([*argv, "--port", "0"])
    return made


def test_command_line_max_queue(monkeypatch, capfd):
    with pytest.raises(SystemExit) as e:
        server_main(["--model", "never-read", "--max-queue", "0"])
    assert e.value.code == 2 and "--max-queue must be at least 1" in capfd.readouterr().err
    assert main_kwargs(monkeypatch, ["--max-queue", "3"])["max_queue"] == 3
