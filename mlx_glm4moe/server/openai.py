"""OpenAI's Chat Completions (``/v1/chat/completions``) and Completions (``/v1/completions``):
request schemas, their translation to the core's `Spec`, and their encoders (whole responses
and server-sent events).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from ..thinking import EFFORT_BUDGETS, THINKING_OFF
from .core import (
    API,
    APIError,
    Encoder,
    Engine,
    Job,
    OpenAISampling,
    Spec,
    Strict,
    prompt_progress,
    sampling,
    server_error,
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


class _Generation(OpenAISampling):
    """The fields both OpenAI generation endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    return_progress: bool = False  # llama.cpp's: prefill progress on the stream


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


# -- requests → specs ----------------------------------------------------------------------------


def _one_choice(req: _Generation) -> None:
    if req.n != 1:
        raise APIError(400, "Only n=1 is supported.", "n")


def _check_parts(data: dict) -> None:
    text_only(data.get("messages"), {"text"})


def chat_spec(req: ChatRequest, engine: Engine) -> Spec:
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
    fmt = req.response_format
    return Spec(
        messages=messages,
        tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        tool_choice=choice.function.name if isinstance(choice, NamedToolChoice) else choice,
        enable_thinking=thinking and req.reasoning_effort not in THINKING_OFF,
        thinking_budget=EFFORT_BUDGETS.get(req.reasoning_effort),
        template_kwargs=kwargs,
        response_format=fmt.model_dump(exclude_none=True) if fmt else None,
        parallel=req.parallel_tool_calls,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=stop_list(req.stop),
        sampling=sampling(req),
        seed=req.seed,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        progress=req.return_progress,
    )


def completion_spec(req: CompletionRequest, engine: Engine) -> Spec:
    _one_choice(req)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported.", "echo")
    return Spec(
        prompt=req.prompt,
        max_tokens=req.max_tokens,
        stop=stop_list(req.stop),
        sampling=sampling(req),
        seed=req.seed,
        top_logprobs=req.logprobs,
        progress=req.return_progress,
    )


# -- our reply → OpenAI -------------------------------------------------------------------------


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
    """An SSE comment line, which clients skip: sent while nothing else is."""
    return ": keepalive\n\n"


DONE = "data: [DONE]\n\n"


def _head(prefix: str, kind: str, model_id: str) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


class _OpenAIEncoder(Encoder):
    """What both endpoints' streams share: comment pings, llama.cpp's progress chunks (no
    choices, a `prompt_progress` object), the error event OpenAI's SDKs read
    (``data: {"error": {...}}``), then ``[DONE]``."""

    head: dict

    def progress(self, event: dict) -> list[str]:
        return [data({**self.head, "choices": [], "prompt_progress": prompt_progress(event)})]

    def ping(self) -> list[str]:
        return [comment()]

    def fail(self, message: str) -> list[str]:
        return [data(server_error(message).body()), DONE]

    def _close(self, last: str, event: dict) -> list[str]:
        """The stream's end after its `last` chunk: usage when asked for, then ``[DONE]``."""
        self.done = event
        out = [last]
        options = self.req.stream_options
        if options is not None and options.include_usage:
            out.append(data({**self.head, "choices": [], "usage": usage(event["usage"])}))
        return out + [DONE]


class ChatEncoder(_OpenAIEncoder):
    """A ``chat.completion``, or its ``chat.completion.chunk`` events: one chunk per reply event
    (a tool call arrives whole in one chunk); log-probabilities ride on the next chunk."""

    def __init__(self, req: ChatRequest, model_id: str) -> None:
        self.req = req
        self.head = _head("chatcmpl", "chat.completion.chunk", model_id)
        self.pending: list[dict] = []  # log-probabilities for the next chunk
        self.logprobs: list[dict] = []
        self.done: dict | None = None

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        lp = {"content": self.pending} if self.pending else None
        self.pending = []
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return data({**self.head, "choices": [choice]})

    def open(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: dict) -> list[str]:
        kind = event["type"]
        if kind == "logprobs":
            self.pending.append(event["entry"])
            self.logprobs.append(event["entry"])
        elif kind == "reasoning":
            return [self._chunk({"reasoning_content": event["delta"]})]
        elif kind == "content":
            return [self._chunk({"content": event["delta"]})]
        elif kind == "tool_call":
            return [self._chunk({"tool_calls": [event["tool_call"]]})]
        elif kind == "done":
            return self._close(self._chunk({}, event["finish_reason"]), event)
        return []

    def result(self) -> dict:
        """The whole reply as a ``chat.completion``."""
        done = self.done
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
            "logprobs": {"content": self.logprobs} if self.req.logprobs else None,
            "finish_reason": done["finish_reason"],
        }
        body = {**self.head, "object": "chat.completion", "choices": [choice]}
        return {**body, "usage": usage(done["usage"])}


def _completion_logprobs(entries: list, offset: int) -> dict:
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


class CompletionEncoder(_OpenAIEncoder):
    """A ``text_completion``, or its events: the echoed prompt, a chunk per text delta (with
    the log-probabilities of the tokens behind it), the finish reason, usage if asked."""

    def __init__(self, req: CompletionRequest, model_id: str, echo: str) -> None:
        self.req, self.echo = req, echo
        self.head = _head("cmpl", "text_completion", model_id)
        self.wants_logprobs = req.logprobs is not None
        self.pending: list = []  # log-probabilities of the next chunk's tokens
        self.logprobs: list = []
        self.text: list[str] = []
        self.offset = len(echo)
        self.done: dict | None = None

    def _logprobs(self, entries: list) -> list | None:
        return entries if self.wants_logprobs else None

    def open(self) -> list[str]:
        out = [comment()]  # the first bytes, before the prefill ends
        if self.echo:
            out.append(data({**self.head, "choices": [_text_choice(self.echo, None, None, 0)]}))
        return out

    def feed(self, event: dict) -> list[str]:
        kind = event["type"]
        if kind == "logprobs":
            self.pending.append(event["entry"])
            self.logprobs.append(event["entry"])
        elif kind == "text":
            choice = _text_choice(event["delta"], None, self._logprobs(self.pending), self.offset)
            self.text.append(event["delta"])
            self.offset += len(event["delta"])
            self.pending = []
            return [data({**self.head, "choices": [choice]})]
        elif kind == "done":
            lp = self._logprobs(self.pending)
            choice = _text_choice("", event["finish_reason"], lp, self.offset)
            return self._close(data({**self.head, "choices": [choice]}), event)
        return []

    def result(self) -> dict:
        text = self.echo + "".join(self.text)
        lp = self._logprobs(self.logprobs)
        choice = _text_choice(text, self.done["finish_reason"], lp, len(self.echo))
        return {**self.head, "choices": [choice], "usage": usage(self.done["usage"])}


# -- routes -------------------------------------------------------------------------------------


def routes(engine: Engine, model_id: str) -> APIRouter:
    """``POST /chat/completions`` and ``POST /completions`` (mounted under ``/v1``)."""
    router = APIRouter()

    def completion_encoder(req: CompletionRequest, job: Job, engine: Engine) -> Encoder:
        echo = ""
        if req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else engine.decode(req.prompt)
        return CompletionEncoder(req, model_id, echo)

    chat = API(
        ChatRequest,
        chat_spec,
        lambda req, job, engine: ChatEncoder(req, model_id),
        _check_parts,
    )
    completion = API(CompletionRequest, completion_spec, completion_encoder)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await engine.serve(request, chat)

    @router.post("/completions")
    async def completions(request: Request):
        return await engine.serve(request, completion)

    return router
