"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``): request schema,
translation of its messages, tools and thinking switch to the OpenAI-shaped chat that the
template renders, and of the core's reply events back to Anthropic's message and server-sent
events.

Reasoning comes back as `thinking` blocks. Their `signature` is an opaque string clients must
send back unchanged; a local model has nothing to sign, so it is a digest of the thinking text,
and a thinking block sent back in the history becomes the assistant turn's reasoning whatever its
signature says.

Claude Code opens its system prompt with a block ``x-anthropic-billing-header: cc_version=...;
...`` that changes with every request: billing metadata, not an instruction. It is left out of
the prompt, which would otherwise differ from the previous request's at its first token and
miss the prompt cache.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from .core import (
    API,
    AnthropicSampling,
    APIError,
    Encoder,
    Engine,
    Job,
    Spec,
    Strict,
    anthropic_error_body,
    parse_request,
    prompt_progress,
    sampling,
    stop_list,
    text_only,
)

# -- request schema -----------------------------------------------------------------------------


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


Block = TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock


class Message(Strict):
    role: Literal["user", "assistant", "system"]  # a system turn where it stands
    content: str | list[Block]


# The block types a request may hold; anything else (image, document, ...) is refused by name.
TEXT_BLOCKS = {"text", "thinking", "redacted_thinking", "tool_use", "tool_result"}


class Tool(Strict):
    type: Literal["custom"] = "custom"  # tools the API would run itself are not ours to run
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None  # held to input_schema while sampling


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(Strict):
    type: Literal["enabled", "adaptive", "disabled"]  # adaptive: the model decides, so on
    budget_tokens: int | None = Field(None, ge=1)


class JSONOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: JSONOutputFormat | None = None  # structured output, enforced while sampling


class CountTokensRequest(Strict):
    """The body of ``POST /v1/messages/count_tokens``. Fields that would change the form of the
    answer and cannot be honoured are declared to be refused (`refuse_unhonoured`)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    mcp_servers: list[Any] | None = None
    container: Any = None


class MessagesRequest(CountTokensRequest, AnthropicSampling):
    """The body of ``POST /v1/messages`` (the fields this server acts on)."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    return_progress: bool = False  # llama.cpp's name: prefill progress on the stream


def check_blocks(data: dict) -> None:
    """Refuse blocks the model cannot read, by name (`core.text_only`)."""
    text_only(data.get("messages"), TEXT_BLOCKS)


def refuse_unhonoured(req: CountTokensRequest) -> None:
    """400 for a field that would change the form of the answer, which this server cannot
    give: MCP servers, a code-execution container."""
    fields = {
        "mcp_servers": req.mcp_servers,
        "container": req.container,
    }
    for name, value in fields.items():
        if value is not None:
            raise APIError(400, f"'{name}' is not supported by this server.", name)


# -- requests → our chat ------------------------------------------------------------------------

BILLING_HEADER = "x-anthropic-billing-header:"


def _text(content: str | list[TextBlock] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(b.text for b in content)


def to_chat(req: CountTokensRequest) -> dict:
    """The request as our chat: ``{messages, tools, tool_choice, enable_thinking, parallel}``
    (OpenAI shapes; tool_choice is "auto", "none", "required" or a tool name)."""
    refuse_unhonoured(req)
    if all(m.role == "system" for m in req.messages):
        raise APIError(400, "'messages' holds no user or assistant message.", "messages")
    messages: list[dict] = []
    system = req.system
    if isinstance(system, list):  # see the module docstring
        system = [b for b in system if not b.text.startswith(BILLING_HEADER)]
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for m in req.messages:
        blocks = (
            [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        )
        if m.role == "assistant":
            messages.append(_assistant(blocks))
            continue
        if m.role == "system":
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            messages.append({"role": "system", "content": text})
            continue
        text: list[str] = []
        for b in blocks:
            if isinstance(b, ToolResultBlock):
                result = _text(b.content)
                if b.is_error:
                    result = f"Error: {result}"
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": result})
            elif isinstance(b, TextBlock):
                text.append(b.text)
        if text:
            messages.append({"role": "user", "content": "".join(text)})
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description or "",
                "parameters": t.input_schema,
                **({"strict": True} if t.strict else {}),
            },
        }
        for t in req.tools or ()
    ] or None
    choice = req.tool_choice
    kind = choice.type if choice else "auto"
    return {
        "messages": messages,
        "tools": tools,
        "tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(kind) or choice.name,
        "enable_thinking": req.thinking is None or req.thinking.type != "disabled",
        "parallel": not (choice and choice.disable_parallel_tool_use),
    }


def _assistant(blocks: list) -> dict:
    reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    calls = [
        {
            "id": b.id,
            "type": "function",
            "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)},
        }
        for b in blocks
        if isinstance(b, ToolUseBlock)
    ]
    message: dict = {
        "role": "assistant",
        "content": "".join(b.text for b in blocks if isinstance(b, TextBlock)),
    }
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


# -- our reply → Anthropic ----------------------------------------------------------------------

STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def signature(thinking: str) -> str:
    """The `signature` of a thinking block (see the module docstring)."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def _tool_use(call: dict) -> dict:
    fn = call["function"]
    return {
        "type": "tool_use",
        "id": call["id"],
        "name": fn["name"],
        "input": json.loads(fn["arguments"]),
    }


def stop_reason(done: dict) -> str:
    return (
        "stop_sequence"
        if done.get("stop_sequence")
        else STOP_REASONS.get(done["finish_reason"], "end_turn")
    )


def _usage(usage: dict, breakpoints: bool) -> dict:
    """Anthropic's usage: the prompt splits into the tokens read from the prompt cache, those
    written to it, and the others (`input_tokens`). Writing counts only when the client asked
    for it with `cache_control` breakpoints (`breakpoints`), as Anthropic counts it; otherwise
    the uncached rest of the prompt is input."""
    cached = usage.get("cached_tokens", 0)
    created = usage.get("cache_creation_tokens", 0) if breakpoints else 0
    return {
        "input_tokens": usage["prompt_tokens"] - cached - created,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": created,
        "output_tokens": usage["completion_tokens"],
    }


def message(head: dict, done: dict, breakpoints: bool = False) -> dict:
    """The whole reply as an Anthropic message (`head`: id and model; `breakpoints`: see
    `_usage`)."""
    msg = done["message"]
    content: list[dict] = []
    if msg["reasoning_content"]:
        thinking = msg["reasoning_content"]
        content.append({"type": "thinking", "thinking": thinking, "signature": signature(thinking)})
    if msg["content"]:
        content.append({"type": "text", "text": msg["content"]})
    content += [_tool_use(c) for c in msg["tool_calls"] or ()]
    return {
        **head,
        "type": "message",
        "role": "assistant",
        "content": content,
        "stop_reason": stop_reason(done),
        "stop_sequence": done.get("stop_sequence"),
        "usage": _usage(done["usage"], breakpoints),
    }


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data}, ensure_ascii=False)}\n\n"


def _empty(block: str) -> dict:
    """A block as `content_block_start` opens it (the signature comes as the last delta)."""
    if block == "thinking":
        return {"type": "thinking", "thinking": "", "signature": ""}
    return {"type": "text", "text": ""}


def _empty_delta(block: str) -> dict:
    return {
        "thinking": {"type": "thinking_delta", "thinking": ""},
        "text": {"type": "text_delta", "text": ""},
        "tool_use": {"type": "input_json_delta", "partial_json": ""},
    }[block]


class MessageEncoder(Encoder):
    """An Anthropic message, or its server-sent events, from our chat events (reasoning,
    content and tool_call deltas, then done).

    A ping sends an empty delta of the open content block, opening one first if none is (the
    reasoning's when thinking is on, since it comes first, else the text's): Claude Code's idle
    watchdog restarts on every event but `ping`, and gives up on a stream after 300 s without
    one, so pings alone do not carry a long prefill.

    Prefill progress is an event of its own, ``prompt_progress`` (llama.cpp's object): the
    SDKs hand event types they do not know to the caller, and their message accumulators skip
    them."""

    def __init__(
        self,
        head: dict,
        prompt_tokens: int,
        thinking_on: bool = True,
        breakpoints: bool = False,
    ) -> None:
        self.head, self.prompt_tokens = head, prompt_tokens
        self.thinking_on, self.breakpoints = thinking_on, breakpoints
        self.index, self.open_kind, self.thinking = -1, None, ""
        self.finished = False
        self.done: dict | None = None

    def open(self) -> list[str]:
        start = {
            **self.head,
            "type": "message",
            "role": "assistant",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        return [_sse("message_start", {"message": start}), _sse("ping", {})]

    def _start(self, block: str, content_block: dict) -> str:
        self.index, self.open_kind, self.thinking = self.index + 1, block, ""
        return _sse("content_block_start", {"index": self.index, "content_block": content_block})

    def _close(self) -> list[str]:
        out = []
        if self.open_kind == "thinking":
            delta = {"type": "signature_delta", "signature": signature(self.thinking)}
            out.append(_sse("content_block_delta", {"index": self.index, "delta": delta}))
        if self.open_kind is not None:
            out.append(_sse("content_block_stop", {"index": self.index}))
        self.open_kind = None
        return out

    def progress(self, event: dict) -> list[str]:
        return [_sse("prompt_progress", {"prompt_progress": prompt_progress(event)})]

    def ping(self) -> list[str]:
        if self.finished:
            return []
        out = []
        if self.open_kind is None:
            block = "thinking" if self.thinking_on else "text"
            out.append(self._start(block, _empty(block)))
        delta = _empty_delta(self.open_kind)
        return out + [_sse("content_block_delta", {"index": self.index, "delta": delta})]

    def feed(self, event: dict) -> list[str]:
        kind = event["type"]
        out: list[str] = []
        if kind in ("reasoning", "content"):
            block = "thinking" if kind == "reasoning" else "text"
            if self.open_kind != block:
                out += self._close()
                out.append(self._start(block, _empty(block)))
            if block == "thinking":
                self.thinking += event["delta"]
                delta = {"type": "thinking_delta", "thinking": event["delta"]}
            else:
                delta = {"type": "text_delta", "text": event["delta"]}
            out.append(_sse("content_block_delta", {"index": self.index, "delta": delta}))
        elif kind == "tool_call":
            out += self._close()
            out.append(self._start("tool_use", {**_tool_use(event["tool_call"]), "input": {}}))
            partial = event["tool_call"]["function"]["arguments"]
            delta = {"type": "input_json_delta", "partial_json": partial}
            out.append(_sse("content_block_delta", {"index": self.index, "delta": delta}))
        elif kind == "done":
            self.done = event
            out += self._close()
            self.finished = True
            delta = {"stop_reason": stop_reason(event), "stop_sequence": event.get("stop_sequence")}
            usage = _usage(event["usage"], self.breakpoints)
            out.append(_sse("message_delta", {"delta": delta, "usage": usage}))
            out.append(_sse("message_stop", {}))
        return out

    def fail(self, message: str) -> list[str]:
        self.finished = True
        return [_sse("error", {"error": anthropic_error_body(500, message)["error"]})]

    def result(self) -> dict:
        return message(self.head, self.done, self.breakpoints)


# -- routes -------------------------------------------------------------------------------------


def spec(req: MessagesRequest, engine: Engine) -> Spec:
    chat = to_chat(req)
    if req.tool_choice and req.tool_choice.type == "tool" and not req.tool_choice.name:
        raise APIError(400, "tool_choice.name: a tool name is required.", "tool_choice")
    return Spec(
        messages=chat["messages"],
        tools=chat["tools"],
        tool_choice=chat["tool_choice"],
        enable_thinking=chat["enable_thinking"],
        response_format=response_format(req.output_config),
        parallel=chat["parallel"],
        max_tokens=req.max_tokens,
        stop=stop_list(req.stop_sequences),
        sampling=sampling(req),
        pin_cache=has_cache_control(req),
        thinking_budget=req.thinking.budget_tokens if req.thinking else None,
        progress=req.return_progress,
    )


def encoder(req: MessagesRequest, job: Job, engine: Engine) -> MessageEncoder:
    head = {"id": f"msg_{uuid.uuid4().hex}", "model": req.model}
    return MessageEncoder(head, len(job.tokens), job.spec.enable_thinking, job.spec.pin_cache)


def response_format(config: OutputConfig | None) -> dict | None:
    """`output_config.format` as chat completions' `response_format` (the constraint's input)."""
    if config is None or config.format is None:
        return None
    schema = {"name": "output", "schema": config.format.schema_, "strict": True}
    return {"type": "json_schema", "json_schema": schema}


def has_cache_control(req: CountTokensRequest) -> bool:
    """Whether the request marks any `cache_control` breakpoint (top level, a system block, a
    tool or a content block): the client will send that prefix again."""
    blocks: list[Any] = [req, *(req.tools or ())]
    if isinstance(req.system, list):
        blocks += req.system
    for m in req.messages:
        if isinstance(m.content, list):
            blocks += m.content
    return any((b.model_extra or {}).get("cache_control") for b in blocks)


MESSAGES = API(MessagesRequest, spec, encoder, check_blocks)


def routes(engine: Engine) -> APIRouter:
    """``POST /messages`` and ``POST /messages/count_tokens`` (mounted under ``/v1``)."""
    router = APIRouter()

    @router.post("/messages")
    async def messages(request: Request):
        return await engine.serve(request, MESSAGES)

    @router.post("/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        req = parse_request(await request.body(), CountTokensRequest, check_blocks)
        chat = to_chat(req)
        chat_spec = Spec(
            messages=chat["messages"], tools=chat["tools"], enable_thinking=chat["enable_thinking"]
        )
        prompt = await run_in_threadpool(engine.render, chat_spec)
        return {"input_tokens": len(await run_in_threadpool(engine.encode, prompt))}

    return router
