"""OpenAI's Responses API (``POST /v1/responses``), as Codex and the OpenAI SDKs send it:
request schema, translation of its input items and tools to the OpenAI-shaped chat that the
template renders, and of the core's reply events back to Response objects and the Responses
server-sent events.

The server is stateless: nothing is stored, so `previous_response_id` (and `conversation`) get a
400 and clients send the whole conversation in `input` each time, as Codex does (`store: false`).

Reasoning comes back as a `reasoning` item whose `content` holds the text. With ``include:
["reasoning.encrypted_content"]`` the item also carries `encrypted_content`, an opaque string the
client sends back unchanged in a later `input`: here it is the text in base64 with the same
digest the Anthropic path signs thinking blocks with, so the text comes back exactly and a string
this server did not write is refused.

Tools: `function` tools, and `namespace` tools (a group of functions, as Codex sends its
sub-agent and MCP tools) whose functions the model sees under Codex's flat name
``namespace__function``; a call to one comes back as a `function_call` item with `name` and
`namespace` apart, which is how Codex routes it. Hosted tools (`web_search`, `file_search`,
`custom`, ...) cannot run here: they are left out of the prompt and logged once per type.

`reasoning.effort` "none" or "minimal" turns thinking off; "low", "medium" and "high" cap the
reasoning (`thinking.EFFORT_BUDGETS`); none given leaves it on, uncapped.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from ..thinking import EFFORT_BUDGETS, THINKING_OFF
from .anthropic import signature
from .core import (
    API,
    APIError,
    Encoder,
    Engine,
    Job,
    OpenAISampling,
    Spec,
    Strict,
    log_once,
    prompt_progress,
    sampling,
)

ENCRYPTED_REASONING = "reasoning.encrypted_content"

# -- request schema -----------------------------------------------------------------------------


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


ITEMS: dict[str, type[Strict]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamespaceTool(Strict):
    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[dict[str, Any]]


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class Reasoning(Strict):
    effort: str | None = None
    summary: str | None = None


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(Strict):
    format: TextFormat | None = None


class ResponsesRequest(OpenAISampling):
    """The body of ``POST /v1/responses`` (the fields this server acts on)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    include: list[str] | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    return_progress: bool = False  # llama.cpp's name: prefill progress on the stream


# -- requests → our chat ------------------------------------------------------------------------


def flat_name(namespace: str, name: str) -> str:
    """The name the model sees for function `name` of `namespace`: Codex's flat form."""
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


def _validate(schema: type[BaseModel], data: Any, param: str) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        path = param + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in err["loc"])
        raise APIError(400, f"Invalid value for '{path}': {err['msg']}.", path) from None


def _text(content: str | list[dict[str, Any]], param: str) -> str:
    """The text of a message's content or a tool's output; any other part is refused."""
    if isinstance(content, str):
        return content
    text = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            text.append(part["refusal"])
        else:
            raise APIError(
                400,
                f"'{param}[{i}]' is a part of type '{kind}': this model reads text only "
                "(input_text and output_text parts).",
                f"{param}[{i}]",
            )
    return "".join(text)


def seal(reasoning: str) -> str:
    """The `encrypted_content` of a reasoning item (see the module docstring)."""
    return f"{base64.urlsafe_b64encode(reasoning.encode()).decode()}.{signature(reasoning)}"


def unseal(sealed: str, param: str) -> str:
    """The reasoning text of an `encrypted_content` made by `seal`; 400 for any other."""
    data, _, digest = sealed.rpartition(".")
    try:
        text = base64.urlsafe_b64decode(data.encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        text = None
    if text is None or digest != signature(text):
        raise APIError(
            400,
            f"'{param}' was not made by this server (or was changed): send back the "
            "reasoning items it returned, or leave them out.",
            param,
        )
    return text


def _reasoning_text(item: ReasoningItem, param: str) -> str:
    if item.encrypted_content:
        return unseal(item.encrypted_content, f"{param}.encrypted_content")
    parts = item.content or item.summary
    return "".join(p.get("text", "") for p in parts if isinstance(p.get("text"), str))


def to_messages(req: ResponsesRequest) -> list[dict]:
    """`instructions` and `input` as OpenAI-shaped chat messages. Reasoning items and function
    calls join the assistant turn they stand in; a tool's output becomes a tool message."""
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    turn: dict | None = None  # the assistant turn being assembled

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for i, data in enumerate(req.input):
        param = f"input[{i}]"
        kind = data.get("type", "message")
        if kind == "item_reference":
            raise APIError(400, f"'{param}': this server keeps no items to refer to.", param)
        if kind not in ITEMS:
            raise APIError(400, f"'{param}': items of type '{kind}' are not supported.", param)
        item = _validate(ITEMS[kind], data, param)
        if isinstance(item, ReasoningItem):
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                turn = None  # reasoning opens the next assistant message
            assistant()["reasoning_content"] = _reasoning_text(item, param)
        elif isinstance(item, FunctionCallItem):
            name = flat_name(item.namespace, item.name) if item.namespace else item.name
            call = {"name": name, "arguments": item.arguments}
            assistant().setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": call}
            )
        elif isinstance(item, FunctionCallOutputItem):
            turn = None
            output = _text(item.output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        elif item.role == "assistant":
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                turn = None
            assistant()["content"] = _text(item.content, f"{param}.content")
        else:
            turn = None
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content, f"{param}.content")})
    return messages


def to_tools(tools: list[dict[str, Any]] | None) -> tuple[list[dict] | None, dict[str, tuple]]:
    """The request's functions as OpenAI chat tools, and for each name the model sees, the
    `(namespace, name)` its calls come back under (namespace None for plain functions)."""
    chat_tools: list[dict] = []
    names: dict[str, tuple[str | None, str]] = {}

    def add(fn: FunctionTool, namespace: str | None) -> None:
        name = flat_name(namespace, fn.name) if namespace else fn.name
        names[name] = (namespace, fn.name)
        spec = {"name": name, "description": fn.description or ""}
        spec |= fn.model_dump(include={"parameters", "strict"}, exclude_none=True)
        chat_tools.append({"type": "function", "function": spec})

    for i, tool in enumerate(tools or ()):
        kind = tool.get("type")
        if kind == "function":
            add(_validate(FunctionTool, tool, f"tools[{i}]"), None)
        elif kind == "namespace":
            ns = _validate(NamespaceTool, tool, f"tools[{i}]")
            for j, inner in enumerate(ns.tools):
                if inner.get("type") == "function":
                    add(_validate(FunctionTool, inner, f"tools[{i}].tools[{j}]"), ns.name)
                else:
                    _skip_hosted(inner.get("type"))
        else:
            _skip_hosted(kind)
    return chat_tools or None, names


def _skip_hosted(kind: Any) -> None:
    log_once(
        f"tool type {kind}",
        "Responses API: tools of type %r cannot run here; left out of the prompt",
        kind,
    )


def _tool_choice(req: ResponsesRequest) -> str | None:
    choice = req.tool_choice
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function":
        raise APIError(
            400,
            f"tool_choice of type '{choice.get('type')}' is not supported: this server runs "
            "function tools only.",
            "tool_choice",
        )
    return _validate(NamedFunction, choice, "tool_choice").name


def response_format(text: TextConfig | None) -> dict | None:
    """`text.format` as chat completions' `response_format` (None for plain text)."""
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is None or fmt.json_schema is None:
        raise APIError(400, "text.format json_schema needs 'name' and 'schema'.", "text.format")
    schema = {"name": fmt.name, "schema": fmt.json_schema, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": schema}


def spec(req: ResponsesRequest, engine: Engine) -> Spec:
    for field, what in (
        ("previous_response_id", "it keeps no responses"),
        ("conversation", "it keeps no conversations"),
    ):
        if getattr(req, field) is not None:
            raise APIError(
                400,
                f"'{field}' is not supported: this server is stateless ({what}). Send the whole "
                "conversation in 'input' with store: false.",
                field,
            )
    if req.background:
        raise APIError(400, "'background' responses are not supported.", "background")
    tools, _ = to_tools(req.tools)
    effort = req.reasoning.effort if req.reasoning else None
    return Spec(
        messages=to_messages(req),
        tools=tools,
        tool_choice=_tool_choice(req),
        enable_thinking=effort not in THINKING_OFF,
        response_format=response_format(req.text),
        parallel=req.parallel_tool_calls,
        thinking_budget=EFFORT_BUDGETS.get(effort),
        # Without a limit the answer may fill what the context leaves (`Engine.room`).
        max_tokens=req.max_output_tokens or engine.context_length,
        sampling=sampling(req),
        seed=req.seed,
        progress=req.return_progress,
    )


# -- our reply → Responses ----------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Output(Encoder):
    """Builds a response's output items from the core's chat events: `events` turns each event
    into the Responses stream events it makes (`sse` numbers and formats them), and keeps the
    items and the final status for `response`. The streamed and the whole response share it.

    While nothing comes (a long prefill) it pings with a numbered `response.in_progress`:
    Codex's idle timer counts events, not SSE comment lines. A failure ends the stream with
    an `error` event and `response.failed`. Prefill progress is a numbered event of its own,
    ``response.prompt_progress`` (llama.cpp's object), which the SDK's stream passes on to the
    caller and its response accumulator skips."""

    def __init__(
        self,
        req: ResponsesRequest,
        model: str,
        names: dict[str, tuple],
        count_tokens: Callable[[str], int],
    ) -> None:
        self.req, self.model, self.names, self.count_tokens = req, model, names, count_tokens
        self.id, self.created = _id("resp"), int(time.time())
        self.sealed = ENCRYPTED_REASONING in (req.include or ())
        self.items: list[dict] = []
        self.current: dict | None = None  # the reasoning or message item being written
        self.status, self.usage, self.error = "in_progress", None, None
        self.reasoning = ""
        self.numbers = itertools.count()  # the streamed events' sequence_number

    def response(self) -> dict:
        """The Response object as it stands."""
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        effort = req.reasoning.effort if req.reasoning else None
        fmt = req.text.format if req.text and req.text.format else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "error": self.error,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": list(self.items),
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": effort, "summary": None},
            "store": False,
            "temperature": req.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "metadata": req.metadata or {},
        }

    def sse(self, event: dict) -> str:
        """`event` as a server-sent event, numbered after the ones before."""
        body = json.dumps({**event, "sequence_number": next(self.numbers)}, ensure_ascii=False)
        return f"event: {event['type']}\ndata: {body}\n\n"

    def open(self) -> list[str]:
        return [
            self.sse({"type": "response.created", "response": self.response()}),
            self.sse({"type": "response.in_progress", "response": self.response()}),
        ]

    def feed(self, event: dict) -> list[str]:
        return [self.sse(e) for e in self.events(event)]

    def progress(self, event: dict) -> list[str]:
        progress = {"type": "response.prompt_progress", "prompt_progress": prompt_progress(event)}
        return [self.sse(progress)]

    def ping(self) -> list[str]:
        return [self.sse({"type": "response.in_progress", "response": self.response()})]

    def fail(self, message: str) -> list[str]:
        self.status = "failed"
        self.error = {"code": "server_error", "message": message}
        failed = {"type": "response.failed", "response": self.response()}
        error = {"type": "error", "code": "server_error", "message": message, "param": None}
        return [self.sse(error), self.sse(failed)]

    def result(self) -> dict:
        return self.response()

    def events(self, event: dict) -> list[dict]:
        """The Responses stream events that one of our chat events makes."""
        kind = event["type"]
        if kind == "reasoning":
            return self._delta("reasoning", event["delta"])
        if kind == "content":
            return self._delta("message", event["delta"])
        if kind == "tool_call":
            return self._close() + self._call(event["tool_call"])
        if kind == "done":
            self.status = "incomplete" if event["finish_reason"] == "length" else "completed"
            out = self._close(self.status)  # an item cut short is incomplete too
            self.usage = self._usage(event["usage"])
            kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
            return out + [{"type": kind, "response": self.response()}]
        return []  # logprobs: not asked for here

    def _where(self) -> dict:
        return {"item_id": self.current["id"], "output_index": len(self.items)}

    def _delta(self, kind: str, delta: str) -> list[dict]:
        out = []
        if self.current is None or self.current["type"] != kind:
            out = self._close()
            if kind == "reasoning":
                self.current = {"type": "reasoning", "id": _id("rs"), "text": ""}
                item = {"type": "reasoning", "id": self.current["id"], "summary": []}
                out.append(self._added({**item, "content": [], "status": "in_progress"}))
            else:
                self.current = {"type": "message", "id": _id("msg"), "text": ""}
                item = {**self._message_item(), "content": [], "status": "in_progress"}
                part = {"type": "output_text", "text": "", "annotations": []}
                where = {**self._where(), "content_index": 0}
                out += [
                    self._added(item),
                    {"type": "response.content_part.added", **where, "part": part},
                ]
        self.current["text"] += delta
        where = {**self._where(), "content_index": 0}
        if kind == "reasoning":
            return out + [{"type": "response.reasoning_text.delta", **where, "delta": delta}]
        return out + [
            {"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []}
        ]

    def _added(self, item: dict) -> dict:
        return {"type": "response.output_item.added", "output_index": len(self.items), "item": item}

    def _done(self, item: dict) -> dict:
        self.items.append(item)
        return {
            "type": "response.output_item.done",
            "output_index": len(self.items) - 1,
            "item": item,
        }

    def _reasoning_item(self, text: str) -> dict:
        item = {"type": "reasoning", "id": self.current["id"], "summary": []}
        item["content"] = [{"type": "reasoning_text", "text": text}]
        if self.sealed:
            item["encrypted_content"] = seal(text)
        return item

    def _message_item(self) -> dict:
        part = {
            "type": "output_text",
            "text": self.current["text"],
            "annotations": [],
            "logprobs": [],
        }
        return {"type": "message", "id": self.current["id"], "role": "assistant", "content": [part]}

    def _close(self, status: str = "completed") -> list[dict]:
        """The events that finish the open reasoning or message item."""
        if self.current is None:
            return []
        where, text = {**self._where(), "content_index": 0}, self.current["text"]
        if self.current["type"] == "reasoning":
            self.reasoning += text
            item = {**self._reasoning_item(text), "status": status}
            out = [{"type": "response.reasoning_text.done", **where, "text": text}]
        else:
            item = {**self._message_item(), "status": status}
            part = item["content"][0]
            out = [
                {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
                {"type": "response.content_part.done", **where, "part": part},
            ]
        self.current = None
        return out + [self._done(item)]

    def _call(self, call: dict) -> list[dict]:
        fn = call["function"]
        namespace, name = self.names.get(fn["name"], (None, fn["name"]))
        item = {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": name}
        if namespace is not None:
            item["namespace"] = namespace
        where = {"item_id": item["id"], "output_index": len(self.items)}
        args = fn["arguments"]
        return [
            self._added({**item, "arguments": "", "status": "in_progress"}),
            {"type": "response.function_call_arguments.delta", **where, "delta": args},
            {"type": "response.function_call_arguments.done", **where, "arguments": args},
            self._done({**item, "arguments": args, "status": "completed"}),
        ]

    def _usage(self, usage: dict) -> dict:
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        reasoning = min(self.count_tokens(self.reasoning), completion) if self.reasoning else 0
        return {
            "input_tokens": prompt,
            "input_tokens_details": {
                "cached_tokens": usage.get("cached_tokens", 0),
                "cache_write_tokens": usage.get("cache_creation_tokens", 0),
            },
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
        }


# -- routes -------------------------------------------------------------------------------------


def routes(engine: Engine, model_id: str) -> APIRouter:
    """``POST /responses`` (mounted under ``/v1``)."""
    router = APIRouter()

    def encoder(req: ResponsesRequest, job: Job, engine: Engine) -> Output:
        _, names = to_tools(req.tools)
        return Output(req, model_id, names, engine.count_tokens)

    api = API(ResponsesRequest, spec, encoder)

    @router.post("/responses")
    async def responses(request: Request):
        return await engine.serve(request, api)

    return router
