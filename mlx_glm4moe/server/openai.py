"""OpenAI's Chat Completions (``/v1/chat/completions``) and Completions (``/v1/completions``):
request schema, translation to the core's jobs, and responses, whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from ..chat import StopText
from ..generate import encode
from ..thinking import EFFORT_BUDGETS, THINKING_OFF
from .core import (
    APIError,
    Engine,
    Job,
    Strict,
    chat_events,
    collect,
    keepalive,
    parse_request,
    sse,
    stop_list,
    text_only,
)

# -- request schema -----------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # true: calls are held to `parameters` while sampling


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ResponseFormat(Strict):
    """``text``, ``json_object``, or ``json_schema`` with ``{name, schema, strict}`` (held to the
    schema while sampling, strict or not)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class _Generation(Strict):
    """The fields both OpenAI generation endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1


class ChatRequest(_Generation):
    """The body of ``POST /v1/chat/completions`` (the fields this server acts on)."""

    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class CompletionRequest(_Generation):
    """The body of ``POST /v1/completions``: a raw prompt (text or token ids), no template."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


# -- requests → jobs ----------------------------------------------------------------------------


def _sampling(req: _Generation) -> dict[str, Any]:
    return {"temp": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p}


def _one_choice(req: _Generation) -> None:
    if req.n != 1:
        raise APIError(400, "Only n=1 is supported.", "n")


def prepare_chat(engine: Engine, req: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job:
    _one_choice(req)
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise APIError(
            400,
            "chat_template_kwargs.enable_thinking must be a boolean.",
            "chat_template_kwargs.enable_thinking",
        )
    messages = []
    for m in req.messages:
        msg = m.model_dump(exclude_none=True)
        if msg["role"] == "developer":  # OpenAI's newer name for the system role
            msg["role"] = "system"
        messages.append(msg)
    choice = req.tool_choice
    return engine.prepare_chat(
        req,
        loop,
        messages=messages,
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        tool_choice=choice.function.name if isinstance(choice, NamedToolChoice) else choice,
        enable_thinking=thinking and req.reasoning_effort not in THINKING_OFF,
        thinking_budget=EFFORT_BUDGETS.get(req.reasoning_effort),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=stop_list(req.stop),
        sampling=_sampling(req),
        seed=req.seed,
        template_kwargs=kwargs,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        parallel=req.parallel_tool_calls,
        response_format=req.response_format.model_dump(exclude_none=True)
        if req.response_format
        else None,
    )


def prepare_completion(
    engine: Engine, req: CompletionRequest, loop: asyncio.AbstractEventLoop
) -> Job:
    _one_choice(req)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported.", "echo")
    tokens = encode(engine.tokenizer, req.prompt)
    if not tokens:
        raise APIError(400, "The prompt is empty.", "prompt")
    if any(not 0 <= t < engine.model.args.vocab_size for t in tokens):
        raise APIError(400, "The prompt holds token ids outside the vocabulary.", "prompt")
    return Job(
        request=req,
        tokens=tokens,
        max_tokens=engine.room(len(tokens), req.max_tokens, "prompt", "prompt"),
        stop=stop_list(req.stop),
        sampling=_sampling(req),
        loop=loop,
        seed=req.seed,
        top_logprobs=req.logprobs,
    )


# -- responses ----------------------------------------------------------------------------------


def usage(usage: dict) -> dict:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


def data(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def comment() -> str:
    """An SSE comment line, which clients skip: sent while nothing else is (`core.keepalive`)."""
    return ": keepalive\n\n"


def _check_parts(data: dict) -> None:
    text_only(data.get("messages"), {"text"})


def _server_error(event: dict) -> str:
    return data(APIError(500, event["message"], type="server_error").body())


async def chat_stream(job: Job, head: dict, events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per reply event; a tool call arrives whole in one chunk.
    Log-probabilities ride on the next chunk."""
    logprobs: list[dict] = []

    def chunk(delta: dict, finish: str | None = None) -> str:
        lp = {"content": logprobs[:]} if logprobs else None
        logprobs.clear()
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return data({**head, "choices": [choice]})

    options = job.request.stream_options
    yield chunk({"role": "assistant", "content": ""})
    async for event in events:
        kind = event["type"]
        if kind == "logprobs":
            logprobs.append(event["entry"])
        elif kind == "reasoning":
            yield chunk({"reasoning_content": event["delta"]})
        elif kind == "content":
            yield chunk({"content": event["delta"]})
        elif kind == "tool_call":
            yield chunk({"tool_calls": [event["tool_call"]]})
        elif kind == "done":
            yield chunk({}, event["finish_reason"])
            if options is not None and options.include_usage:
                yield data({**head, "choices": [], "usage": usage(event["usage"])})
        elif kind == "error":
            yield _server_error(event)
    yield "data: [DONE]\n\n"


def chat_completion(head: dict, done: dict, logprobs: list | None) -> dict:
    """The whole reply as a ``chat.completion``."""
    msg = done["message"]
    message = {
        "role": "assistant",
        "content": msg["content"] or None,
        "reasoning_content": msg["reasoning_content"],
        "tool_calls": msg["tool_calls"] or None,
    }
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": done["finish_reason"],
    }
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(done["usage"])}


async def text_events(job: Job, engine: Engine) -> AsyncIterator[dict]:
    """A completion job's token events as plain text: ``text`` deltas (stop strings cut),
    ``logprobs`` entries, then ``done`` or ``error``."""
    stop = StopText(job.stop)
    stopped = False
    async for event in job.engine_events():
        if event["type"] == "token":
            if stopped:
                continue
            text, stopped = stop.feed(event["text"])
            if stopped:
                job.cancel.set()
            lp = event["logprobs"]
            if lp is not None and not stopped and not engine.is_eos(event["token"]):
                token = engine.token_text(event["token"])
                top = {engine.token_text(t): v for t, v in lp["top"]}
                yield {"type": "logprobs", "entry": (token, lp["logprob"], top)}
            if text:
                yield {"type": "text", "delta": text}
        elif event["type"] == "done":
            if not stopped and stop.held:
                yield {"type": "text", "delta": stop.flush()}
            yield {**event, "finish_reason": "stop" if stopped else event["finish_reason"]}
        else:
            yield event


def _completion_logprobs(entries: list, offset: int) -> dict | None:
    """OpenAI's legacy completions `logprobs`: tokens, their log-probabilities, the top
    alternatives and each token's offset in the text."""
    tokens, values, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        tokens.append(token)
        values.append(logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _text_choice(text: str, finish: str | None, logprobs: list | None, offset: int) -> dict:
    lp = _completion_logprobs(logprobs, offset) if logprobs is not None else None
    return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}


async def completion_stream(
    job: Job, head: dict, echo: str, events: AsyncIterator[dict]
) -> AsyncIterator[str]:
    """Server-sent events of a completion: the echoed prompt, then a chunk per text delta
    (with the log-probabilities of the tokens behind it), the finish reason, usage if asked."""
    req = job.request
    pending: list | None = [] if req.logprobs is not None else None
    offset = len(echo)
    yield comment()  # the first bytes, before the prefill ends
    if echo:
        yield data({**head, "choices": [_text_choice(echo, None, None, 0)]})
    async for event in events:
        kind = event["type"]
        if kind == "logprobs" and pending is not None:
            pending.append(event["entry"])
        elif kind == "text":
            choice = _text_choice(event["delta"], None, pending, offset)
            yield data({**head, "choices": [choice]})
            offset += len(event["delta"])
            pending = [] if pending is not None else None
        elif kind == "done":
            choice = _text_choice("", event["finish_reason"], pending, offset)
            yield data({**head, "choices": [choice]})
            if req.stream_options is not None and req.stream_options.include_usage:
                yield data({**head, "choices": [], "usage": usage(event["usage"])})
        elif kind == "error":
            yield _server_error(event)
    yield "data: [DONE]\n\n"


# -- routes -------------------------------------------------------------------------------------


def routes(engine: Engine, model_id: str) -> APIRouter:
    """``POST /chat/completions`` and ``POST /completions`` (mounted under ``/v1``)."""
    router = APIRouter()

    def head(prefix: str, kind: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": model_id,
        }

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await request.body(), ChatRequest, _check_parts)
        job = await run_in_threadpool(prepare_chat, engine, req, asyncio.get_running_loop())
        engine.submit(job)
        chunk_head = head("chatcmpl", "chat.completion.chunk")
        events = chat_events(job, engine)
        if req.stream:
            events = chat_stream(job, chunk_head, events)
            return sse(keepalive(events, comment, engine.keepalive_interval), job)
        done, logprobs = await collect(request, job, events)
        return chat_completion(chunk_head, done, logprobs if req.logprobs else None)

    @router.post("/completions")
    async def completions(request: Request):
        req = parse_request(await request.body(), CompletionRequest)
        job = await run_in_threadpool(prepare_completion, engine, req, asyncio.get_running_loop())
        engine.submit(job)
        text_head = head("cmpl", "text_completion")
        echo = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        if req.echo and not echo:
            echo = engine.tokenizer.decode(req.prompt)
        events = text_events(job, engine)
        if req.stream:
            events = completion_stream(job, text_head, echo, events)
            return sse(keepalive(events, comment, engine.keepalive_interval), job)
        text: list[str] = []

        async def texts() -> AsyncIterator[dict]:
            async for event in events:
                if event["type"] == "text":
                    text.append(event["delta"])
                else:
                    yield event

        done, logprobs = await collect(request, job, texts())
        lp = logprobs if req.logprobs is not None else None
        body = _text_choice(echo + "".join(text), done["finish_reason"], lp, len(echo))
        return {**text_head, "choices": [body], "usage": usage(done["usage"])}

    return router
