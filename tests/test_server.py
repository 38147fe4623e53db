"""The OpenAI-compatible server, run for real on a loopback port and driven by the `openai` client.

The tiny model has random weights, so tests that need particular output (reasoning, tool calls,
stop strings) script it through `create_app(sampler_factory=...)`: a request whose last user
message names a script gets that text's tokens, then the stop token.
"""

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import openai
import pytest
import uvicorn

from mlx_glm4moe.loading import load
from mlx_glm4moe.server import create_app

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
    # Scripts that leave the opening of the call (and the name) to a forced tool_choice.
    "name it yourself": (
        "\n<think>Let me see.</think>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>"
    ),
    "arguments only": "<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>",
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


@pytest.fixture(scope="module")
def server(air_q4):
    model, tokenizer = load(air_q4)
    scripts = Scripts(tokenizer)
    app = create_app(model, tokenizer, model_id="tiny", max_tokens=64, sampler_factory=scripts)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield url, scripts, model.args.max_position_embeddings
    uv.should_exit = True
    thread.join(timeout=30)


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
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
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
        ("name it yourself", "required", True),
        ("arguments only", NAMED, False),
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
    assert ask("auto").message.tool_calls is None  # the script alone opens no call


def test_thinking_off(client):
    on = client.chat.completions.create(model="tiny", messages=user("think then answer"))
    off = client.chat.completions.create(
        model="tiny",
        messages=user("think then answer"),
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    # Thinking off: the prompt ends with "/nothink" and an empty <think></think>, and the
    # model's think tags are not reasoning.
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
    assert off.choices[0].message.reasoning_content is None
    assert "Hello there, friend!" in off.choices[0].message.content


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


def test_prompt_longer_than_context(server, client):
    context = server[2]
    long = " ".join(f"word{i}" for i in range(context))  # at least one token per word
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user(long))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # fits, but not with the completion asked for
        client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=context)


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
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert 0 < scripts.forever_steps < 4000

    scripts.forever_steps = 0
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request given up by its client
        httpx.post(
            f"{url}/v1/chat/completions",
            json={**body, "stream": False},
            timeout=httpx.Timeout(30, read=0.5),
        )
    assert client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert scripts.forever_steps < 4000  # 0 if it was cancelled before it started


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
    finally:
        proc.terminate()
        proc.wait(timeout=30)
