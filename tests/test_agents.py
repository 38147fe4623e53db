"""Coding agents as they ship: the request shapes Claude Code sends (replayed from a recording),
fields we do not act on, max_tokens past the context, and streams that never go quiet.

The server, its clients and its scripted replies are test_server.py's (`Scripts`).
"""

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import test_server
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter
from test_server import FOREVER, SCRIPTS, collect, user

from mlx_glm4moe.chat import render_prompt
from mlx_glm4moe.generate import encode
from mlx_glm4moe.models import Model
from mlx_glm4moe.server import anthropic as messages_api
from mlx_glm4moe.server import core

RECORDED = json.loads((Path(__file__).parent / "fixtures/claude_code_messages.json").read_text())
CLAUDE_CODE = RECORDED["requests"]

# test_server.py's server (scripted by `SCRIPTS`) and clients
server, url, client, claude = (
    test_server.server,
    test_server.url,
    test_server.client,
    test_server.claude,
)


def events(body: dict, url: str, path: str = "/v1/messages") -> list[tuple[str, dict]]:
    """The (event, data) pairs of a streamed Anthropic reply."""
    beta = {"anthropic-beta": RECORDED["anthropic-beta"]}
    with httpx.stream("POST", url + path, json=body, headers=beta, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    return list(zip(names, datas, strict=True))


def count(url: str, body: dict) -> int:
    r = httpx.post(f"{url}/v1/messages/count_tokens", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["input_tokens"]


def last_message(body: dict) -> str:
    """What `Scripts` keys a request's reply on: its last message, as the template sees it."""
    chat = messages_api.to_chat(messages_api.MessagesRequest.model_validate(body))
    return chat["messages"][-1]["content"]


# -- Claude Code's requests ---------------------------------------------------------------------


def test_recording_has_claude_codes_shapes():
    first = CLAUDE_CODE[0]
    assert first["system"][0]["text"].startswith("x-anthropic-billing-header:")
    assert any("cache_control" in b for b in first["system"])
    assert [m["role"] for m in first["messages"]] == ["user", "system"]
    assert first["thinking"] == {"type": "adaptive"} and first["stream"] is True
    assert {"output_config", "context_management", "metadata"} <= set(first)
    kinds = {
        b["type"] for m in CLAUDE_CODE[1]["messages"] if m["role"] != "system" for b in m["content"]
    }
    assert {"text", "thinking", "tool_use", "tool_result"} <= kinds


@pytest.mark.parametrize("recorded", range(len(CLAUDE_CODE)))
def test_claude_code_replay(url, claude, monkeypatch, recorded):
    body = CLAUDE_CODE[recorded]
    monkeypatch.setitem(SCRIPTS, last_message(body), "\n<think>A greeting.</think>\nHi!")
    # As sent: the same path, header and body, max_tokens (64000) past the 4096 context.
    got = events(body, url, "/v1/messages?beta=true")
    names = [name for name, _ in got]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert got[-2][1]["delta"]["stop_reason"] == "end_turn"
    # The SDK's own stream assembly takes it as a valid message.
    fields = {k: v for k, v in body.items() if k not in ("stream", "context_management")}
    with claude.messages.stream(
        **fields, extra_body={"context_management": body["context_management"]}
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "Hi!" and final.stop_reason == "end_turn"
    # count_tokens takes the same body and counts the prompt that was generated from.
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert count(url, body) == prompt


def test_billing_header_left_out(url):
    body = CLAUDE_CODE[0]
    header, *rest = body["system"]

    def system(blocks):
        return count(url, {**body, "system": blocks})

    other = {**header, "text": header["text"] + " cch=0a1b2;"}
    assert system([header, *rest]) == system([other, *rest]) == system(rest)
    # Any other text block is prompt.
    assert system([{"type": "text", "text": "Be brief."}, *rest]) > system(rest)


def test_system_messages_where_they_stand(server, url):
    tokenizer = server[1].tokenizer
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "system": [{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "system", "content": "mid-conversation note"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "second question"}]},
            {"role": "system", "content": [{"type": "text", "text": "last note"}]},
        ],
    }
    chat = messages_api.to_chat(messages_api.MessagesRequest.model_validate(body))
    prompt = render_prompt(tokenizer, chat["messages"])
    order = [
        "<|system|>\nBe kind.",
        "<|user|>\nfirst question",
        "<|system|>\nmid-conversation note",
        "<|assistant|>",
        "<|user|>\nsecond question",
        "<|system|>\nlast note",
    ]
    places = [prompt.find(text) for text in order]
    assert -1 not in places and places == sorted(places)
    assert httpx.post(f"{url}/v1/messages", json=body, timeout=60).status_code == 200
    only_system = {**body, "messages": body["messages"][1:2]}
    assert httpx.post(f"{url}/v1/messages", json=only_system).status_code == 400


def test_thinking_adaptive_is_on(url, claude):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "think then answer"}]}

    def tokens(kind):
        return count(url, {**base, "thinking": {"type": kind}})

    assert tokens("adaptive") == tokens("enabled") < tokens("disabled")
    r = claude.messages.create(**base, max_tokens=64, thinking={"type": "adaptive"})
    assert [b.type for b in r.content] == ["thinking", "text"]


# -- fields we do not act on --------------------------------------------------------------------


def test_hints_accepted_and_logged_once(url, monkeypatch, caplog):
    monkeypatch.setattr(core, "_logged", set())
    block = {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}
    body = {
        "model": "tiny",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": [block]}],
        "system": [block],
        "metadata": {"user_id": "u1"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "service_tier": "auto",
    }
    with caplog.at_level(logging.WARNING, logger=core.log.name):
        for _ in range(2):
            r = httpx.post(f"{url}/v1/messages", json=body, timeout=60)
            assert r.status_code == 200, r.text
    logged = sorted(r.getMessage().split("'")[1] for r in caplog.records)
    assert logged == [
        "context_management",
        "messages.content.cache_control",
        "output_config.effort",
        "service_tier",
        "system.cache_control",
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mcp_servers", [{"type": "url", "url": "http://127.0.0.1:1/mcp", "name": "x"}]),
        ("container", "container_1"),
        ("tools", [{"type": "web_search_20250305", "name": "web_search"}]),
    ],
)
def test_fields_that_change_the_answer_are_refused(url, field, value):
    body = {"model": "tiny", "max_tokens": 2, "messages": user("hi"), field: value}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400
        assert field in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "where", "kind"),
    [
        (
            [
                {"type": "text", "text": "what is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png"}},
            ],
            "messages[0].content[1]",
            "image",
        ),
        (
            [{"type": "document", "source": {"type": "text", "data": "x"}}],
            "messages[0].content[0]",
            "document",
        ),
        (
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "image", "source": {}}],
                }
            ],
            "messages[0].content[0].content[0]",
            "image",
        ),
    ],
)
def test_non_text_blocks_are_refused_by_name(url, content, where, kind):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(url + path, json=body)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
        assert where in message and f"'{kind}'" in message and "text only" in message


def test_openai_image_part_is_refused_by_name(client):
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}]
        )
    assert e.value.param == "messages[0].content[1]"
    assert "'image_url'" in e.value.message and "text only" in e.value.message


# -- max_tokens past the context ----------------------------------------------------------------


def test_max_tokens_clamped_to_the_context(server, url, client, claude, monkeypatch):
    tokenizer = server[1].tokenizer
    context = 256  # a short context, for a short prefill
    limit = property(lambda self: context)
    monkeypatch.setattr(core.Engine, "context_length", limit, raising=False)

    def history(words):  # a long turn before the scripted one that never ends
        return [
            {"role": "user", "content": " ".join(["hello"] * words)},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": FOREVER},
        ]

    empty = count(url, {"model": "tiny", "messages": history(0)})
    per_word = (count(url, {"model": "tiny", "messages": history(20)}) - empty) / 20
    history = history(int((context - 8 - empty) / per_word))
    room = context - count(url, {"model": "tiny", "messages": history})
    assert 1 <= room <= 16
    r = claude.messages.create(model="tiny", max_tokens=64000, messages=history)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == room
    with claude.messages.stream(model="tiny", max_tokens=64000, messages=history) as stream:
        assert stream.get_final_message().stop_reason == "max_tokens"
    r = client.chat.completions.create(model="tiny", messages=history, max_tokens=context)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == room
    ids = encode(tokenizer, render_prompt(tokenizer, history))  # the same prompt, cached
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=context)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == room
    # A Responses request that names no limit may fill the context, past the server's default.
    short = [{"role": "user", "content": FOREVER}]
    room = context - count(url, {"model": "tiny", "messages": short})
    assert room > 64  # the test server's default max_tokens
    r = client.responses.create(model="tiny", input=short)
    assert r.status == "incomplete" and r.usage.output_tokens == room
    # A prompt that alone fills the context is still refused.
    full = [{"role": "user", "content": " ".join(["hello"] * context)}]
    r = httpx.post(f"{url}/v1/messages", json={"model": "x", "max_tokens": 1, "messages": full})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_a_prompt_as_long_as_the_context_is_refused(url, monkeypatch):
    """A prompt one token short of the context leaves room for one token; a prompt of exactly
    the context length leaves none and is refused."""
    context = 48
    monkeypatch.setattr(
        core.Engine, "context_length", property(lambda self: context), raising=False
    )
    word = 100  # any token id
    r = httpx.post(
        f"{url}/v1/completions", json={"prompt": [word] * (context - 1), "max_tokens": 9}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [word] * context, "max_tokens": 9})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# -- streams that never go quiet ----------------------------------------------------------------


def test_keepalive_pings_while_nothing_comes():
    async def slow() -> object:
        yield "a"
        await asyncio.sleep(0.35)
        yield "b"

    async def run() -> list[str]:
        return [s async for s in core.keepalive(slow(), lambda: ".", 0.1)]

    out = asyncio.run(run())
    assert out[0] == "a" and out[-1] == "b" and 2 <= out.count(".") <= 4


DONE = {
    "type": "done",
    "message": {"content": "Hi", "reasoning_content": None, "tool_calls": []},
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "cached_tokens": 0},
}


def assert_message_stream(pairs: list[tuple[str, dict]], thinking: bool) -> list[dict]:
    """That (event name, data) pairs make one whole Anthropic message stream: every event
    one the SDK knows (named as its type), the content blocks opened, continued and closed in
    order, the first of them the keep-alive's kind (thinking when thinking is on, else text);
    the events, pings left out."""
    adapter = TypeAdapter(RawMessageStreamEvent)
    events = []
    for name, data in pairs:
        assert name == data["type"]
        if name != "ping":
            adapter.validate_python(data)
            events.append(data)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    opened, index = None, -1
    for e in events[1:-2]:
        if e["type"] == "content_block_start":
            assert opened is None and e["index"] == index + 1
            opened = index = e["index"]
        else:
            assert e["index"] == opened
            if e["type"] == "content_block_stop":
                opened = None
    assert opened is None and index >= 0
    first = events[1]["content_block"]["type"]
    assert first == ("thinking" if thinking else "text")
    return events


@pytest.mark.parametrize("thinking", [True, False])
def test_keepalive_opens_the_block_the_answer_continues(thinking):
    """While nothing comes, the encoder sends empty deltas of a block it opens: the thinking
    block when thinking is on (the reasoning comes first), the text block when it is off; the
    answer then continues that block."""
    encoder = messages_api.MessageEncoder({"id": "msg_1", "model": "m"}, 7, thinking)
    first = {"type": "reasoning" if thinking else "content", "delta": "Hi"}
    sent = encoder.open() + encoder.ping() + encoder.ping() + encoder.feed(first)
    sent += encoder.feed(DONE)
    pairs = []
    for s in sent:
        name, data = s.strip().split("\n")
        pairs.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    events = assert_message_stream(pairs, thinking)
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    key = "thinking" if thinking else "text"
    assert [d.get(key) for d in deltas[:3]] == ["", "", "Hi"]
    assert [e["type"] for e in events].count("content_block_start") == 1


SLOW_PREFILL = 1.5  # seconds the model takes over every prompt chunk
INTERVAL = 0.2


@pytest.fixture
def slow_prefill(monkeypatch):
    """Every forward pass over more than one token (a prompt chunk) takes `SLOW_PREFILL` s."""
    call = Model.__call__

    def slow(self, inputs, *args, **kwargs):
        if inputs.shape[-1] > 1:
            time.sleep(SLOW_PREFILL)
        return call(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Model, "__call__", slow)
    monkeypatch.setattr(core.Engine, "keepalive_interval", INTERVAL)


def arrivals(url: str, path: str, body: dict) -> tuple[float, list[float], str]:
    """(seconds to the first bytes, the largest gap between chunks, the whole text)."""
    start = time.monotonic()
    times, text = [], b""
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            times.append(time.monotonic())
            text += chunk
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return times[0] - start, max(gaps), text.decode()


def test_no_silence_during_a_slow_prefill(url, client, claude, slow_prefill):
    def fresh():  # a prompt the cache has not seen, so it is prefilled
        return [{"role": "user", "content": f"{uuid.uuid4()} think then answer"}]

    body = {"model": "tiny", "max_tokens": 8, "stream": True}
    first, gap, text = arrivals(url, "/v1/messages", {**body, "messages": fresh()})
    assert first < 1.0 and gap < 1.0 and text.startswith("event: message_start")
    # Not pings, which Claude Code's idle watchdog does not count: empty deltas of the block
    # that the reasoning then continues.
    sent = [json.loads(e.split("data: ", 1)[1]) for e in text.strip().split("\n\n")]
    assert_message_stream([(e["type"], e) for e in sent], thinking=True)
    empty = {"type": "thinking_delta", "thinking": ""}
    assert sent[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }
    waits = [e for e in sent if e.get("delta") == empty]
    assert len(waits) >= 4
    assert [e["type"] for e in sent[-3:]] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for thinking in (True, False):
        switch = {"type": "enabled" if thinking else "disabled", "budget_tokens": 1024}
        pairs = events({**body, "messages": fresh(), "thinking": switch}, url)
        assert_message_stream(pairs, thinking)
    first, gap, text = arrivals(url, "/v1/chat/completions", {**body, "messages": fresh()})
    assert first < 1.0 and gap < 1.0 and text.count(": keepalive") >= 4
    first, gap, text = arrivals(url, "/v1/completions", {**body, "prompt": str(uuid.uuid4())})
    assert first < 1.0 and gap < 1.0 and text.startswith(": keepalive")
    # The clients skip the comment lines.
    stream = client.chat.completions.create(model="tiny", messages=fresh(), stream=True)
    role, _, _, _, finish, _ = collect(stream)
    assert role == "assistant" and finish in ("stop", "length")


def test_anthropic_structured_output_and_strict_tools(url):
    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"enum": [2, 4]}},
        "required": ["kind", "legs"],
        "additionalProperties": False,
    }
    body = {
        "model": "tiny",
        "max_tokens": 128,
        "messages": user(f"{uuid.uuid4()} a pet, as JSON"),
        "thinking": {"type": "disabled"},
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    r = httpx.post(url + "/v1/messages", json=body, timeout=120)
    assert r.status_code == 200, r.text
    pet = json.loads("".join(b["text"] for b in r.json()["content"] if b["type"] == "text"))
    assert pet["kind"] in ("cat", "dog") and pet["legs"] in (2, 4)
    # A strict tool under `any`: the call's input holds to its schema.
    tool = {"name": "adopt", "input_schema": schema, "strict": True}
    body = {**body, "output_config": None, "tools": [tool], "tool_choice": {"type": "any"}}
    r = httpx.post(url + "/v1/messages", json=body, timeout=120)
    [call] = [b for b in r.json()["content"] if b["type"] == "tool_use"]
    assert call["name"] == "adopt" and call["input"]["kind"] in ("cat", "dog")
    assert call["input"]["legs"] in (2, 4)
