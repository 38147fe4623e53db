"""The Responses API (``POST /v1/responses``), served for real and driven by the `openai`
client's `responses.create` and `responses.stream`; the model is scripted as in test_server."""

import json
import logging
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from test_agents import arrivals, slow_prefill  # noqa: F401 (fixture)
from test_server import BROKEN, SCRIPTS, WEATHER_TOOL, client, server, url  # noqa: F401 (fixtures)

from mlx_glm4moe.server import core
from mlx_glm4moe.server.responses import (
    ResponsesRequest,
    response_format,
    seal,
    to_messages,
    to_tools,
    unseal,
)

WEATHER = {"type": "function", **WEATHER_TOOL["function"]}
AGENTS = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "spawn_agent",
            "description": "Start a sub-agent.",
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {"message": {"type": "string"}},
                "required": ["message"],
            },
        }
    ],
}
# The scripted model (test_server.Scripts) answers these prompts with these texts.
SCRIPTS["call the agent tool"] = (
    "\n<think></think>\n<tool_call>multi_agent_v1__spawn_agent\n"
    "<arg_key>message</arg_key>\n<arg_value>go</arg_value>\n</tool_call>"
)
CODEX = json.loads((Path(__file__).parent / "fixtures" / "codex_responses.json").read_text())


def stream_events(base, body):
    """The server-sent events of a streamed request, each checked against the SDK's types."""
    with httpx.stream(
        "POST", f"{base}/v1/responses", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        blocks = r.read().decode().split("\n\n")
    adapter, events = TypeAdapter(ResponseStreamEvent), []
    for block in filter(None, blocks):
        name, data = block.split("\n")
        events.append(adapter.validate_json(data.removeprefix("data: ")))
        assert name == f"event: {events[-1].type}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def items(response):
    return [item.model_dump(exclude_none=True) for item in response.output]


def test_text_reasoning_and_instructions(client, url):  # noqa: F811
    r = client.responses.create(model="tiny", input="think then answer")
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status == "completed" and r.incomplete_details is None
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [c.text for c in reasoning.content] == ["The user wants a greeting."]
    assert reasoning.encrypted_content is None  # not asked for
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert r.output_text == "Hello there, friend!"
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert 0 < u.output_tokens_details.reasoning_tokens < u.output_tokens

    raw = httpx.post(f"{url}/v1/responses", json={"model": "x", "input": "think then answer"})
    assert Response.model_validate(raw.json()).output_text == r.output_text  # every field valid

    kind = client.responses.create(model="tiny", input="think then answer", instructions="Be kind.")
    assert kind.output_text == r.output_text
    assert kind.usage.input_tokens > r.usage.input_tokens  # the system message


def test_stream_events_and_final_response(client):  # noqa: F811
    with client.responses.stream(model="tiny", input="think then answer") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events if not e.type.endswith(".delta")]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert (thought, text) == ("The user wants a greeting.", "Hello there, friend!")
    assert final.status == "completed" and final.output_text == text
    whole = client.responses.create(model="tiny", input="think then answer")

    def shape(r):
        return [{k: v for k, v in item.items() if k != "id"} for item in items(r)]

    assert shape(final) == shape(whole)


def test_function_call_round_trip(client, url):  # noqa: F811
    ask = [{"role": "user", "content": "call the weather tool"}]
    r = client.responses.create(model="tiny", input=ask, tools=[WEATHER])
    reasoning, call = r.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.namespace is None
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris", "days": 3})

    with client.responses.stream(model="tiny", input=ask, tools=[WEATHER]) as stream:
        args = [e for e in stream if e.type.startswith("response.function_call_arguments")]
        final = stream.get_final_response()
    assert [e.type for e in args] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ]
    assert json.loads(args[1].arguments) == json.loads(final.output[1].arguments)
    kinds = [e.type for e in stream_events(url, {"input": ask, "tools": [WEATHER]})]
    assert (
        kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 2
    )

    history = (
        ask
        + items(r)
        + [{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}]
    )
    again = client.responses.create(
        model="tiny", input=history, tools=[WEATHER], max_output_tokens=4
    )
    assert again.usage.input_tokens > r.usage.input_tokens
    req = ResponsesRequest.model_validate({"input": history})
    assert to_messages(req)[1:] == [
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should check the weather.",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny"},
    ]


def test_namespace_tools(client):  # noqa: F811
    r = client.responses.create(model="tiny", input="call the agent tool", tools=[AGENTS, WEATHER])
    [call] = r.output
    # Codex routes a call by `namespace` and `name` apart.
    assert (call.namespace, call.name) == ("multi_agent_v1", "spawn_agent")
    assert json.loads(call.arguments) == {"message": "go"}
    back = ResponsesRequest.model_validate({"input": [call.model_dump(exclude_none=True)]})
    [turn] = to_messages(back)
    assert turn["tool_calls"][0]["function"]["name"] == "multi_agent_v1__spawn_agent"


def test_hosted_tools_left_out_and_logged_once(client, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setattr(core, "_logged", set())  # none logged yet
    hosted = [{"type": "image_generation"}, {"type": "custom", "name": "apply_patch"}]
    with caplog.at_level(logging.WARNING, logger=core.log.name):
        for _ in range(2):
            tools, names = to_tools([*hosted, WEATHER])
    assert [t["function"]["name"] for t in tools] == ["get_weather"]
    assert sorted(r.getMessage().split("'")[1] for r in caplog.records) == [
        "custom",
        "image_generation",
    ]
    r = client.responses.create(
        model="tiny", input="call the weather tool", tools=[{"type": "web_search"}, WEATHER]
    )
    assert r.output[-1].name == "get_weather"


@pytest.mark.parametrize(
    ("prompt", "tool_choice", "effort"),
    [
        ("call for rome", "required", "medium"),
        ("call for rome at once", {"type": "function", "name": "get_weather"}, "none"),
    ],
)
def test_tool_choice_forces_a_call(client, prompt, tool_choice, effort):  # noqa: F811
    def ask(choice):
        return client.responses.create(
            model="tiny",
            input=prompt,
            tools=[WEATHER],
            tool_choice=choice,
            reasoning={"effort": effort},
            max_output_tokens=40,
        )

    call = ask(tool_choice).output[-1]
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call",
        "get_weather",
        {"city": "Rome"},
    )
    assert all(item.type != "function_call" for item in ask("none").output)  # masked


def test_reasoning_effort_switches_thinking(client):  # noqa: F811
    def ask(effort):
        return client.responses.create(
            model="tiny", input="think then answer", reasoning={"effort": effort}
        )

    on, high, off = ask("low"), ask("high"), ask("minimal")
    assert on.usage.input_tokens == high.usage.input_tokens
    assert off.usage.input_tokens > on.usage.input_tokens  # "/nothink" and an empty think block


def test_encrypted_reasoning_round_trip(client, url):  # noqa: F811
    r = client.responses.create(
        model="tiny", input="think then answer", include=["reasoning.encrypted_content"]
    )
    reasoning = r.output[0]
    assert unseal(reasoning.encrypted_content, "x") == "The user wants a greeting."
    opaque = {"type": "reasoning", "summary": [], "encrypted_content": reasoning.encrypted_content}
    answer = r.output[1].model_dump(exclude_none=True)
    history = [{"role": "user", "content": "hi"}, opaque, answer]
    history.append({"role": "user", "content": "think then answer"})
    req = ResponsesRequest.model_validate({"input": history})
    assert to_messages(req)[1]["reasoning_content"] == "The user wants a greeting."
    assert client.responses.create(model="tiny", input=history).status == "completed"

    history[1] = {**opaque, "encrypted_content": seal("something else")[:-1] + "0"}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input=history)
    assert e.value.body["param"] == "input[1].encrypted_content"


def test_max_output_tokens_is_incomplete(client):  # noqa: F811
    r = client.responses.create(model="tiny", input="say hello world", max_output_tokens=6)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6
    [message] = r.output  # cut inside the answer
    assert message.status == "incomplete" and "Hello world. Goodbye".startswith(r.output_text)
    with client.responses.stream(
        model="tiny", input="say hello world", max_output_tokens=3
    ) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"


def test_failure_inside_generation(client, url):  # noqa: F811
    with pytest.raises(openai.InternalServerError) as e:
        client.responses.create(model="tiny", input=BROKEN)
    assert e.value.body["type"] == "server_error"
    error, failed = stream_events(url, {"input": BROKEN})[-2:]
    assert (error.type, error.code) == ("error", "server_error") and "failed" in error.message
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.message == error.message


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"conversation": "conv_1"}, "conversation", "stateless"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "what is this?"},
                            {"type": "input_image", "image_url": "data:image/png;base64,AA=="},
                        ],
                    }
                ]
            },
            "input[0].content[1]",
            "input_image",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "keeps no items"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice", "function tools only"),
        ({"tools": [{"type": "function"}]}, "tools[0].name", "Field required"),
    ],
)
def test_bad_request(url, body, param, words):  # noqa: F811
    r = httpx.post(f"{url}/v1/responses", json={"model": "tiny", "input": "hi", **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"]


def test_text_format():
    def convert(fmt):
        return response_format(
            ResponsesRequest.model_validate({"input": "", "text": {"format": fmt}}).text
        )

    assert convert({"type": "text"}) is None
    assert convert({"type": "json_object"}) == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert convert({"type": "json_schema", "name": "A", "schema": schema, "strict": True}) == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema, "strict": True},
    }


def test_codex_request_replayed(url):  # noqa: F811
    # What `codex exec` 0.171 sent on its second turn (after a stub answered its first with
    # reasoning and an exec_command call): developer messages, the reasoning it was handed back,
    # the call and its output, function, namespace and web_search tools, streaming.
    events = stream_events(url, {**CODEX, "max_output_tokens": 8})
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    final = events[-1].response
    assert events[-1].type == f"response.{final.status}"
    assert final.status in ("completed", "incomplete") and final.output
    assert final.usage.input_tokens > 500
    for item in final.output:
        assert item.type != "reasoning" or item.encrypted_content  # Codex asks for it
    messages = to_messages(ResponsesRequest.model_validate(CODEX))
    assert [m["role"] for m in messages] == [
        "system",
        "system",
        "user",
        "user",
        "assistant",
        "tool",
    ]
    assert messages[4]["reasoning_content"] == "I will run echo."
    tools, names = to_tools(CODEX["tools"])
    assert names["multi_agent_v1__spawn_agent"] == ("multi_agent_v1", "spawn_agent")
    assert "exec_command" in names and len(tools) == len(names)


def test_no_silence_during_a_slow_prefill(url, slow_prefill):  # noqa: F811
    # Codex's idle timer counts events, not SSE comments: the heartbeat is response.in_progress.
    body = {"model": "tiny", "input": f"{uuid.uuid4()} think then answer", "max_output_tokens": 8}
    first, gap, text = arrivals(url, "/v1/responses", {**body, "stream": True})
    assert first < 1.0 and gap < 1.0 and text.count("event: response.in_progress") >= 4
    events = stream_events(url, body)
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_text_format_is_enforced(client):  # noqa: F811
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Rome", "Paris"]}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}
    r = client.responses.create(
        model="tiny", input="the weather, as JSON", text={"format": fmt}, max_output_tokens=64
    )
    answer = json.loads(r.output_text)
    assert answer["city"] in ("Rome", "Paris") and isinstance(answer["sunny"], bool)
    r = client.responses.create(
        model="tiny",
        input="anything, as JSON",
        text={"format": {"type": "json_object"}},
        reasoning={"effort": "none"},
        max_output_tokens=64,
    )
    assert isinstance(json.loads(r.output_text), dict)


def test_usage_reports_the_prompt_cache(client):  # noqa: F811
    ask = f"{uuid.uuid4()} think then answer"
    first = client.responses.create(model="tiny", input=ask).usage
    again = client.responses.create(model="tiny", input=ask).usage
    details = first.input_tokens_details
    # Written: the prompt past what came from the cache (a shared opening, at most).
    assert details.cache_write_tokens == first.input_tokens - details.cached_tokens > 0
    assert again.input_tokens_details.cached_tokens == again.input_tokens - 1
