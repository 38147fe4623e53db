"""Requests the real coding agents send, replayed against the server on the bundled demo model.

tests/fixtures/agents_*.json are trimmed recordings of `tools/agents_check.py` (long texts cut,
2-3 of each client's tools kept, every field and block shape left as sent). Each body is posted
as recorded, with its completion length capped as the recording proxy caps it, and the answer is
checked against the client's own SDK types (the `openai` and `anthropic` packages).
"""

import json
from pathlib import Path

import httpx
import pytest
from anthropic.types import RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, ConfigDict, TypeAdapter
from test_server import serving

from mlx_glm4moe.loading import load
from mlx_glm4moe.server import create_app

FIXTURES = Path(__file__).parent / "fixtures"
CAP = 16  # completion tokens per replayed request: the demo model's answers are nonsense anyway
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def requests_of(name: str) -> list[dict]:
    return json.loads((FIXTURES / f"agents_{name}.json").read_text())["requests"]


@pytest.fixture(scope="module")
def url():
    model, tokenizer = load()
    app = create_app(model, tokenizer, model_id="demo")
    with serving(app) as url:
        yield url


def replay(url: str, request: dict, cap: int = CAP, **extra) -> httpx.Response:
    """POST the recorded body, its length fields capped (the Responses body names none: it gets
    `max_output_tokens`), plus `extra` fields."""
    body = request["body"] | extra
    named = [f for f in LENGTH_FIELDS if f in body] or [
        "max_output_tokens" if request["path"].endswith("/responses") else "max_tokens"
    ]
    body |= {f: min(body.get(f, cap), cap) for f in named}
    return httpx.post(
        url + request["path"],
        params=request["query"],
        json=body,
        headers={"x-api-key": "dummy", "authorization": "Bearer dummy"},
        timeout=300,
    )


def sse(reply: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) for each server-sent event, comment lines left out."""
    events = []
    for block in reply.text.split("\n\n"):
        lines = [line.partition(":") for line in block.splitlines() if line[:1] not in ("", ":")]
        fields = {name: value.removeprefix(" ") for name, _, value in lines}
        if "data" in fields:
            events.append((fields.get("event"), fields["data"]))
    return events


def test_opencode_requests_stream_valid_chunks(url):
    """opencode's title request and its main request (10 tools, `tool_choice: auto`,
    `max_tokens: 32000`, `stream_options.include_usage`)."""
    for request in requests_of("opencode"):
        reply = replay(url, request)
        assert reply.status_code == 200, reply.text
        events = sse(reply)
        assert events[-1] == (None, "[DONE]")
        chunks = [ChatCompletionChunk.model_validate_json(data) for _, data in events[:-1]]
        finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
        assert finishes in (["stop"], ["length"], ["tool_calls"])
        usage = chunks[-1].usage  # include_usage: a last chunk with usage and no choices
        assert chunks[-1].choices == [] and usage.completion_tokens <= CAP
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_agents_sdk_requests_answer(url):
    """The Agents SDK's two turns: a strict function tool and `response_format: json_schema`,
    then the tool's result (`role: tool` after an assistant turn with `content: null`)."""
    for request in requests_of("sdk"):
        reply = replay(url, request)
        assert reply.status_code == 200, reply.text
        completion = ChatCompletion.model_validate(reply.json())
        [choice] = completion.choices
        assert choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length", "tool_calls")


class Weather(BaseModel):
    """The `output_type` of the Agents SDK script that recorded agents_sdk.json."""

    model_config = ConfigDict(extra="forbid")
    city: str
    summary: str


def test_agents_sdk_final_answer_follows_its_schema(url):
    """The final turn's answer must be JSON the SDK accepts for `output_type`, or a call of its
    strict tool (before constrained decoding, `response_format` was ignored and the SDK raised
    `ModelBehaviorError: Invalid JSON`)."""
    request = requests_of("sdk")[-1]
    schema = request["body"]["response_format"]["json_schema"]["schema"]
    assert schema["required"] == list(Weather.model_fields)
    [tool] = request["body"]["tools"]
    for extra in ({}, {"tool_choice": "none"}):  # as sent (auto), and with the answer forced
        reply = replay(url, request, cap=256, temperature=0, **extra)
        assert reply.status_code == 200, reply.text
        [choice] = reply.json()["choices"]
        if choice["finish_reason"] == "tool_calls":
            assert not extra
            for call in choice["message"]["tool_calls"]:
                assert call["function"]["name"] == tool["function"]["name"]
                assert set(json.loads(call["function"]["arguments"])) == {"city"}
        else:
            assert choice["finish_reason"] == "stop"
            TypeAdapter(Weather).validate_json(choice["message"]["content"])


def test_claude_code_request_streams_a_message(url):
    """Claude Code's first request: a `role: system` message after the first user turn,
    `thinking: adaptive`, `output_config`, `context_management`, `metadata`, `cache_control`
    blocks, `max_tokens: 64000`, 24 tools (3 kept)."""
    [request] = requests_of("claude_code")
    reply = replay(url, request)
    assert reply.status_code == 200, reply.text
    adapter = TypeAdapter(RawMessageStreamEvent)  # every event but `ping`, which it leaves out
    events = [adapter.validate_json(data) for name, data in sse(reply) if name != "ping"]
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens > 0
    stop = next(e for e in events if e.type == "message_delta").delta.stop_reason
    assert stop in ("end_turn", "max_tokens", "tool_use")


def test_codex_request_streams_a_response(url):
    """Codex's request to `/v1/responses`: developer messages, `input_text` parts, function,
    namespace and `web_search` tools, `include: [reasoning.encrypted_content]`, `store: false`,
    no `max_output_tokens` of its own."""
    [request] = requests_of("codex")
    reply = replay(url, request)
    assert reply.status_code == 200, reply.text
    adapter = TypeAdapter(ResponseStreamEvent)
    events = [(name, adapter.validate_json(data)) for name, data in sse(reply)]
    assert all(name == event.type for name, event in events)
    types = [event.type for _, event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    # The cap may cut the answer short: then it ends `incomplete`, as the Responses API does.
    response = events[-1][1].response
    assert response.status in ("completed", "incomplete")
    assert types[-1] == f"response.{response.status}"
    assert response.output
    for item in response.output:
        if item.type == "reasoning":  # asked for: handed back opaquely for the next turn
            assert item.encrypted_content
