"""An OpenAI- and Anthropic-compatible server for GLM-4.5 models, on FastAPI + uvicorn.

Generation runs on the continuous-batching engine (`batch.py`): concurrent requests decode
together, one forward pass per step, and new ones join between steps. The asyncio side
validates, queues, parses each request's tokens (reasoning, content, tool calls, stop strings)
and streams. A client that goes away sets its request's cancel event, which ends its generation
at the next step. A prompt cache shared by the requests reuses the longest cached prefix of each
new prompt.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` (OpenAI),
``/v1/messages``, ``/v1/messages/count_tokens`` (Anthropic), ``/health``, ``/metrics``
(Prometheus). Run it with ``python -m mlx_glm4moe.server --model PATH`` (or ``glm4moe-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic_api as anthropic
from .batch import BatchEngine
from .batch import Request as BatchRequest
from .chat import PromptCache, encode_messages, render_prompt
from .generate import Sampler, encode
from .model import Model
from .parsers import StreamParser

log = logging.getLogger("mlx_glm4moe.server")

# -- request schema -----------------------------------------------------------------------------
# Strict: a wrong type is an error, not a coercion ("5" is not a number). Unknown fields are
# accepted and ignored, as OpenAI-compatible servers do.


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
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
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    """The body of ``POST /v1/completions``: a raw prompt (text or token ids), no template."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


# -- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's body, ``{"error": {message, type, param, code}}``, or on
    the Anthropic routes with Anthropic's, ``{"type": "error", "error": {type, message}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, anthropic_shape: bool = False) -> JSONResponse:
        if anthropic_shape:
            body = anthropic.error_body(self.status, self.message)
        else:
            body = self.body()
        return JSONResponse(body, status_code=self.status)


def _param(loc: tuple, data: Any) -> str | None:
    """The request path of a validation error, e.g. ``messages[0].content``: `loc` followed
    through the submitted JSON (pydantic adds union-member names that are not in it)."""
    path = ""
    for key in loc:
        if isinstance(key, int) and isinstance(data, list) and key < len(data):
            path += f"[{key}]"
        elif isinstance(key, str) and isinstance(data, dict) and key in data:
            path += f".{key}" if path else key
        else:
            break
        data = data[key]
    return path or None


def parse_request(body: bytes, schema: type[BaseModel] = ChatRequest) -> Any:
    """Validate a request body against `schema`; raises `APIError` (400) on invalid JSON or
    fields."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"], data)
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}.", param) from None


# -- generation ---------------------------------------------------------------------------------


@dataclass
class Job:
    """One validated request: its prompt, limits and sampling, and the events of its
    generation (from the engine thread)."""

    request: BaseModel
    tokens: list[int]
    max_tokens: int
    stop: list[str]
    sampling: dict[str, Any]  # temp, top_p, top_k, min_p (None: the server's default)
    loop: asyncio.AbstractEventLoop
    seed: int | None = None
    top_logprobs: int | None = None
    # Chat only: the rendered prompt (where the parser starts), OpenAI-shaped messages and
    # tools, the thinking switch, the tool choice ("none", "required", a function name, or None
    # for auto) and whether calls may come many.
    prompt: str | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    enable_thinking: bool = True
    tool_choice: str | None = None
    parallel: bool = True
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    async def engine_events(self) -> AsyncIterator[dict]:
        """The engine's token events, then its done or error event."""
        while True:
            event = await self.events.get()
            yield event
            if event["type"] != "token":
                return


class StopText:
    """Cuts a text stream before the first of the `stops` strings, holding back any tail that
    could still grow into one. `matched` is the stop string found, if any."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that is safe to emit, whether a stop string was found)."""
        text = self.held + text
        hits = sorted((i, s) for s in self.stops if (i := text.find(s)) >= 0)
        if hits:
            self.held, self.matched = "", hits[0][1]
            return text[: hits[0][0]], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def forbid_token(sampler: Sampler, token_id: int) -> Sampler:
    """`sampler` that can never pick `token_id`."""

    def sample(logprobs: mx.array) -> mx.array:
        banned = mx.arange(logprobs.shape[-1]) == token_id
        return sampler(mx.where(banned, -mx.inf, logprobs))

    return sample


class ForceAfter:
    """A sampler that draws from `sampler`, except that right after the token `trigger` (from
    the first token when None) it emits the tokens `forced`."""

    def __init__(self, sampler: Sampler, forced: list[int], trigger: int | None) -> None:
        self.sampler, self.forced, self.trigger = sampler, forced, trigger
        self.pending = list(forced) if trigger is None else None
        self.last: mx.array | None = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        # Reading the last token waits for it, which pauses the pipelined decode, but only
        # until the forced tokens are out.
        if self.pending is None and self.last is not None and self.last.item() == self.trigger:
            self.pending = list(self.forced)
        if self.pending:
            return mx.array(self.pending.pop(0), dtype=mx.uint32)
        y = self.sampler(logprobs)
        if self.pending is None:
            self.last = y
        return y


SamplerFactory = Callable[[Job], "Sampler | None"]


class Engine:
    """The model, its prompt cache and the batching engine behind the HTTP routes."""

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        *,
        max_tokens: int = 512,
        sampling: dict[str, Any] | None = None,
        prompt_cache: PromptCache | None = None,
        sampler_factory: SamplerFactory | None = None,
        batch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context_length = model.args.max_position_embeddings
        self.max_tokens = max_tokens
        self.sampling = {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, **(sampling or {})}
        self.sampler_factory = sampler_factory
        self.tool_call_token = tokenizer.convert_tokens_to_ids("<tool_call>")
        self.think_end_token = tokenizer.convert_tokens_to_ids("</think>")
        self.batch = BatchEngine(
            model, tokenizer, prompt_cache=prompt_cache, **(batch_kwargs or {})
        )

    def _room(self, n_prompt: int, requested: int | None, what: str, param: str) -> int:
        """The completion length: `requested`, else the default, within the context."""
        room = self.context_length - n_prompt
        if room < 1 or (requested is not None and requested > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your {what} resulted in {n_prompt} tokens"
                + (f" and {requested} were requested for the completion." if requested else "."),
                param,
                "context_length_exceeded",
            )
        return requested or min(self.max_tokens, room)

    def prepare_chat(
        self,
        request: BaseModel,
        loop: asyncio.AbstractEventLoop,
        *,
        messages: list[dict],
        tools: list[dict] | None,
        tool_choice: str | None,
        enable_thinking: bool,
        max_tokens: int | None,
        stop: list[str],
        sampling: dict[str, Any],
        seed: int | None = None,
        template_kwargs: dict[str, Any] | None = None,
        top_logprobs: int | None = None,
        parallel: bool = True,
    ) -> Job:
        """Check a chat request against the model (tools, context length) and make its job.
        `tool_choice` is "auto", "none", "required" or a function name."""
        names = {t["function"]["name"] for t in tools or ()}
        if tool_choice not in (None, "auto", "none", "required") and tool_choice not in names:
            raise APIError(
                400,
                f"Invalid value for 'tool_choice': no function named '{tool_choice}' in 'tools'.",
                "tool_choice",
            )
        if tool_choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'.", "tool_choice")
        try:
            prompt = render_prompt(
                self.tokenizer,
                messages,
                tools,
                enable_thinking,
                chat_template_kwargs=template_kwargs,
            )
        except ValueError as e:  # the chat template rejects these messages
            raise APIError(400, str(e), "messages") from None
        tokens = encode(self.tokenizer, prompt)
        return Job(
            request=request,
            tokens=tokens,
            prompt=prompt,
            max_tokens=self._room(len(tokens), max_tokens, "messages", "messages"),
            stop=_stops(stop),
            sampling=sampling,
            loop=loop,
            seed=seed,
            top_logprobs=top_logprobs,
            messages=messages,
            tools=tools,
            enable_thinking=enable_thinking,
            tool_choice=None if tool_choice == "auto" else tool_choice,
            parallel=parallel,
        )

    def prepare_openai_chat(self, req: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job:
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported.", "n")
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
        return self.prepare_chat(
            req,
            loop,
            messages=messages,
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            tool_choice=choice.function.name if isinstance(choice, NamedToolChoice) else choice,
            enable_thinking=thinking,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            stop=_stop_list(req.stop),
            sampling=_sampling(req),
            seed=req.seed,
            template_kwargs=kwargs,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            parallel=req.parallel_tool_calls,
        )

    def prepare_completion(self, req: CompletionRequest, loop: asyncio.AbstractEventLoop) -> Job:
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported.", "n")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported.", "echo")
        tokens = encode(self.tokenizer, req.prompt)
        if not tokens:
            raise APIError(400, "The prompt is empty.", "prompt")
        if any(not 0 <= t < self.model.args.vocab_size for t in tokens):
            raise APIError(400, "The prompt holds token ids outside the vocabulary.", "prompt")
        return Job(
            request=req,
            tokens=tokens,
            max_tokens=self._room(len(tokens), req.max_tokens, "prompt", "prompt"),
            stop=_stops(_stop_list(req.stop)),
            sampling=_sampling(req),
            loop=loop,
            seed=req.seed,
            top_logprobs=req.logprobs,
        )

    def submit(self, job: Job) -> None:
        self.batch.submit(
            BatchRequest(
                job.tokens,
                job.max_tokens,
                job.emit,
                make_sampler=lambda: self._sampler(job),
                seed=job.seed,
                top_logprobs=job.top_logprobs,
                cancel=job.cancel,
            )
        )

    def _sampler(self, job: Job) -> Sampler:
        """Runs on the engine thread when the job starts."""
        custom = self.sampler_factory(job) if self.sampler_factory else None
        s = {k: v if v is not None else self.sampling[k] for k, v in job.sampling.items()}
        sampler = custom or make_sampler(s["temp"], s["top_p"], s["min_p"], top_k=s["top_k"])
        choice = job.tool_choice
        if choice == "none":
            return forbid_token(sampler, self.tool_call_token)
        if choice is None:
            return sampler
        # "required" or a named function: the call is opened for the model once its reasoning
        # is over (it writes the arguments itself).
        forced = [self.tool_call_token]
        if choice != "required":
            forced += self.tokenizer.encode(choice + "\n", add_special_tokens=False)
        trigger = self.think_end_token if job.enable_thinking else None
        return ForceAfter(sampler, forced, trigger)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


def _stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _stops(stop: list[str]) -> list[str]:
    if any(not s for s in stop):
        raise APIError(400, "Stop strings must not be empty.", "stop")
    return stop


def _sampling(req: Any) -> dict[str, Any]:
    return {
        "temp": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": getattr(req, "min_p", None),
    }


class ChatReply:
    """Turns a chat job's token events into reply events: ``reasoning`` / ``content`` deltas,
    whole ``tool_call``s, ``logprobs`` entries (when asked for), then ``done`` with the
    message, finish reason, matched stop sequence and usage, or ``error``. Stop strings cut the
    content (and end the generation); without `parallel`, only the first tool call is kept."""

    def __init__(self, job: Job, engine: Engine) -> None:
        self.job, self.engine = job, engine
        self.parser = StreamParser(job.tools, prompt=job.prompt, id_salt=uuid.uuid4().hex)
        self.stop = StopText(job.stop)
        self.stopped = False
        self.content: list[str] = []
        self.calls: list[dict] = []

    async def events(self) -> AsyncIterator[dict]:
        async for event in self.job.engine_events():
            kind = event["type"]
            if kind == "token":
                if event["logprobs"] is not None and not self.stopped:
                    if event["token"] not in self.engine.tokenizer.eos_token_ids:
                        yield {"type": "logprobs", "entry": self._logprob(event)}
                for e in self._parsed(self.parser.feed(event["text"])):
                    yield e
            elif kind == "done":
                for e in self._parsed(self.parser.close()):
                    yield e
                if not self.stopped and self.stop.held:
                    text = self.stop.flush()
                    self.content.append(text)
                    yield {"type": "content", "delta": text}
                yield self._done(event)
            else:
                yield event

    def _parsed(self, events: list[dict]) -> list[dict]:
        out = []
        for e in events:
            if self.stopped:
                break
            if e["type"] == "content" and self.job.stop:
                text, self.stopped = self.stop.feed(e["delta"])
                if self.stopped:
                    self.job.cancel.set()
                e = {"type": "content", "delta": text}
            if e["type"] == "content":
                if not e["delta"]:
                    continue
                self.content.append(e["delta"])
            elif e["type"] == "tool_call":
                if self.calls and not self.job.parallel:
                    continue
                self.calls.append(e["tool_call"])
            out.append(e)
        return out

    def _logprob(self, event: dict) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self.engine.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        lp = event["logprobs"]
        return {
            **entry(event["token"], lp["logprob"]),
            "top_logprobs": [entry(t, v) for t, v in lp["top"]],
        }

    def _done(self, event: dict) -> dict:
        result = self.parser.result()
        finish = "stop" if self.stopped else event["finish_reason"]
        if finish == "stop" and self.calls:
            finish = "tool_calls"
        text = "".join(self.content)
        return {
            "type": "done",
            "message": {
                "role": "assistant",
                "content": text or None,
                "reasoning_content": result["reasoning_content"],
                "tool_calls": self.calls,
            },
            "finish_reason": finish,
            "stop_sequence": self.stop.matched,
            "usage": event["usage"],
        }


# -- OpenAI responses ---------------------------------------------------------------------------


def _usage(usage: dict) -> dict:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


def _data(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _openai_stream(job: Job, head: dict, events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per reply event; a tool call arrives whole in one chunk.
    Log-probabilities ride on the next chunk."""
    logprobs: list[dict] = []

    def chunk(delta: dict, finish: str | None = None) -> str:
        lp = {"content": logprobs[:]} if logprobs else None
        logprobs.clear()
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _data({**head, "choices": [choice]})

    options = job.request.stream_options
    try:
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
                    yield _data({**head, "choices": [], "usage": _usage(event["usage"])})
            elif kind == "error":
                yield _data(APIError(500, event["message"], type="server_error").body())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # stops the generation when the client went away; no-op when done


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def _collect(request: Request, job: Job, events: AsyncIterator[dict]) -> tuple[dict, list]:
    """The done event and the logprobs entries of a reply not streamed; a client that leaves
    cancels it. Raises APIError (500) when the generation failed."""
    watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
    logprobs: list = []
    try:
        async for event in events:
            if event["type"] == "logprobs":
                logprobs.append(event["entry"])
            elif event["type"] == "done":
                return event, logprobs
            elif event["type"] == "error":
                raise APIError(500, event["message"], type="server_error")
    finally:
        watcher.cancel()
    raise APIError(500, "The generation ended without an answer.", type="server_error")


class TextReply:
    """A completion job's token events as plain text: ``text`` deltas (stop strings cut),
    ``logprobs`` entries, then ``done`` or ``error``."""

    def __init__(self, job: Job, engine: Engine) -> None:
        self.job, self.engine = job, engine
        self.stop = StopText(job.stop)
        self.stopped = False

    async def events(self) -> AsyncIterator[dict]:
        async for event in self.job.engine_events():
            if event["type"] == "token":
                if self.stopped:
                    continue
                text, self.stopped = self.stop.feed(event["text"])
                if self.stopped:
                    self.job.cancel.set()
                lp = event["logprobs"]
                eos = event["token"] in self.engine.tokenizer.eos_token_ids
                if lp is not None and not self.stopped and not eos:
                    token = self.engine.token_text(event["token"])
                    top = {self.engine.token_text(t): v for t, v in lp["top"]}
                    yield {"type": "logprobs", "entry": (token, lp["logprob"], top)}
                if text:
                    yield {"type": "text", "delta": text}
            elif event["type"] == "done":
                if not self.stopped and self.stop.held:
                    yield {"type": "text", "delta": self.stop.flush()}
                yield {**event, "finish_reason": "stop" if self.stopped else event["finish_reason"]}
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


async def _completion_stream(
    job: Job, head: dict, echo: str, events: AsyncIterator[dict]
) -> AsyncIterator[str]:
    """Server-sent events of a completion: the echoed prompt, then a chunk per text delta
    (with the log-probabilities of the tokens behind it), the finish reason, usage if asked."""
    req = job.request
    pending: list | None = [] if req.logprobs is not None else None
    offset = len(echo)
    try:
        if echo:
            yield _data({**head, "choices": [_text_choice(echo, None, None, 0)]})
        async for event in events:
            kind = event["type"]
            if kind == "logprobs" and pending is not None:
                pending.append(event["entry"])
            elif kind == "text":
                choice = _text_choice(event["delta"], None, pending, offset)
                yield _data({**head, "choices": [choice]})
                offset += len(event["delta"])
                pending = [] if pending is not None else None
            elif kind == "done":
                choice = _text_choice("", event["finish_reason"], pending, offset)
                yield _data({**head, "choices": [choice]})
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _data({**head, "choices": [], "usage": _usage(event["usage"])})
            elif kind == "error":
                yield _data(APIError(500, event["message"], type="server_error").body())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()


# -- metrics ------------------------------------------------------------------------------------

METRICS = {
    "requests_total": ("counter", "Requests received."),
    "requests_running": ("gauge", "Requests being prefilled or decoded."),
    "requests_waiting": ("gauge", "Requests waiting for a decode slot."),
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled (cached prefixes not counted)."),
    "generation_tokens_total": ("counter", "Tokens generated."),
    "decode_steps_total": ("counter", "Forward passes of the decode loop (one per batched step)."),
    "batch_size": ("gauge", "Sequences in the latest decode step."),
}


def metrics_text(metrics: Any) -> str:
    """The engine's metrics in Prometheus' text format."""
    lines = []
    for name, (kind, help) in METRICS.items():
        lines += [
            f"# HELP glm4moe_{name} {help}",
            f"# TYPE glm4moe_{name} {kind}",
            f"glm4moe_{name} {getattr(metrics, name)}",
        ]
    return "\n".join(lines) + "\n"


# -- the app ------------------------------------------------------------------------------------


def create_app(
    model: Model,
    tokenizer: TokenizerWrapper,
    *,
    model_id: str = "glm4moe",
    api_key: str | None = None,
    max_tokens: int = 512,
    sampling: dict[str, Any] | None = None,
    prompt_cache_bytes: int = 4 << 30,
    prompt_cache_size: int = 8,
    sampler_factory: SamplerFactory | None = None,
    decode_concurrency: int = 8,
    prompt_concurrency: int = 1,
    prefill_step_size: int = 512,
    mtp: bool = False,
    num_draft: int = 1,
) -> FastAPI:
    """The server as an ASGI app (serve it with uvicorn).

    Args:
        model, tokenizer: from `load`; call this in the thread that loaded them.
        model_id: the name `/v1/models` lists and responses carry.
        api_key: when set, `/v1/*` requires ``Authorization: Bearer <api_key>`` or
            ``x-api-key: <api_key>``.
        max_tokens: the completion length when a chat request gives none (capped by the
            context).
        sampling: default temp, top_p, top_k, min_p for requests that give none.
        prompt_cache_bytes, prompt_cache_size: the prompt cache's caps (bytes, entries);
            0 bytes turns it off.
        sampler_factory: builds a job's sampler (None = the usual one from its fields): a seam
            for scripted output in tests and for custom sampling. Called on the engine thread.
        decode_concurrency, prompt_concurrency, prefill_step_size: the batching engine's
            limits (`batch.BatchEngine`).
        mtp, num_draft: MTP speculative decoding, one request at a time.
    """
    engine = Engine(
        model,
        tokenizer,
        max_tokens=max_tokens,
        sampling=sampling,
        prompt_cache=PromptCache(model, prompt_cache_bytes, prompt_cache_size, mtp=mtp)
        if prompt_cache_bytes > 0
        else None,
        sampler_factory=sampler_factory,
        batch_kwargs={
            "decode_concurrency": decode_concurrency,
            "prompt_concurrency": prompt_concurrency,
            "prefill_step_size": prefill_step_size,
            "mtp": mtp,
            "num_draft": num_draft,
        },
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.batch.close)

    app = FastAPI(
        title="mlx-glm4moe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.engine = engine
    created = int(time.time())

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key.", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def anthropic_route(request: Request) -> bool:
        return request.url.path.startswith("/v1/messages")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(anthropic_route(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response(anthropic_route(request))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, for uvicorn to log; the process stays up.
        error = APIError(500, "Internal server error.", type="server_error")
        return error.response(anthropic_route(request))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = metrics_text(engine.batch.metrics)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models() -> dict:
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-glm4moe"}
        return {"object": "list", "data": [entry]}

    def start(job: Job) -> None:
        engine.submit(job)

    def sse(events: AsyncIterator[str], job: Job) -> StreamingResponse:
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            # Also when the client left before the stream began (then `events` never ran).
            background=BackgroundTask(job.cancel.set),
        )

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await request.body(), ChatRequest)
        loop = asyncio.get_running_loop()
        job = await run_in_threadpool(engine.prepare_openai_chat, req, loop)
        start(job)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
        }
        events = ChatReply(job, engine).events()
        if req.stream:
            return sse(_openai_stream(job, head, events), job)
        done, logprobs = await _collect(request, job, events)
        msg = done["message"]
        message = {
            "role": "assistant",
            "content": msg["content"] if msg["content"] or not msg["tool_calls"] else None,
            "reasoning_content": msg["reasoning_content"],
            "tool_calls": msg["tool_calls"] or None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": {"content": logprobs} if req.logprobs else None,
            "finish_reason": done["finish_reason"],
        }
        usage = _usage(done["usage"])
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}

    @v1.post("/completions")
    async def completions(request: Request):
        req = parse_request(await request.body(), CompletionRequest)
        job = await run_in_threadpool(engine.prepare_completion, req, asyncio.get_running_loop())
        start(job)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
        }
        echo = req.prompt if req.echo and isinstance(req.prompt, str) else ""
        if req.echo and not echo:
            echo = tokenizer.decode(req.prompt)
        events = TextReply(job, engine).events()

        if req.stream:
            return sse(_completion_stream(job, head, echo, events), job)
        text: list[str] = []

        async def texts() -> AsyncIterator[dict]:
            async for event in events:
                if event["type"] == "text":
                    text.append(event["delta"])
                else:
                    yield event

        done, logprobs = await _collect(request, job, texts())
        lp = logprobs if req.logprobs is not None else None
        body = _text_choice(echo + "".join(text), done["finish_reason"], lp, len(echo))
        return {**head, "choices": [body], "usage": _usage(done["usage"])}

    # -- Anthropic ------------------------------------------------------------------------------

    def prepare_messages(req: anthropic.MessagesRequest, loop: asyncio.AbstractEventLoop) -> Job:
        chat = anthropic.to_chat(req)
        if req.tool_choice and req.tool_choice.type == "tool" and not req.tool_choice.name:
            raise APIError(400, "tool_choice.name: a tool name is required.", "tool_choice")
        return engine.prepare_chat(
            req,
            loop,
            messages=chat["messages"],
            tools=chat["tools"],
            tool_choice=chat["tool_choice"],
            enable_thinking=chat["enable_thinking"],
            max_tokens=req.max_tokens,
            stop=req.stop_sequences or [],
            sampling={
                "temp": req.temperature,
                "top_p": req.top_p,
                "top_k": req.top_k,
                "min_p": None,
            },
            parallel=chat["parallel"],
        )

    @v1.post("/messages")
    async def messages(request: Request):
        req = parse_request(await request.body(), anthropic.MessagesRequest)
        job = await run_in_threadpool(prepare_messages, req, asyncio.get_running_loop())
        start(job)
        head = {"id": f"msg_{uuid.uuid4().hex}", "model": req.model}
        events = ChatReply(job, engine).events()
        if req.stream:

            async def stream() -> AsyncIterator[str]:
                try:
                    async for s in anthropic.stream(head, len(job.tokens), events):
                        yield s
                finally:
                    job.cancel.set()

            return sse(stream(), job)
        done, _ = await _collect(request, job, events)
        return anthropic.message(head, done)

    @v1.post("/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        req = parse_request(await request.body(), anthropic.CountTokensRequest)
        chat = anthropic.to_chat(req)

        def count() -> int:
            try:
                return len(
                    encode_messages(
                        tokenizer, chat["messages"], chat["tools"], chat["enable_thinking"]
                    )
                )
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None

        return {"input_tokens": await run_in_threadpool(count)}

    app.include_router(v1)
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .loading import load

    p = argparse.ArgumentParser(
        description="OpenAI- and Anthropic-compatible server for GLM-4.5 models."
    )
    p.add_argument("--model", help="Model folder or Hugging Face repo (default: bundled demo).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback).")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("GLM4MOE_API_KEY"),
        help="Require this key on /v1/* as a bearer token or x-api-key "
        "(default: $GLM4MOE_API_KEY, else none).",
    )
    p.add_argument(
        "--max-tokens",
        "--max-tokens-default",
        type=int,
        default=512,
        help="Completion length for requests that give no max_tokens.",
    )
    p.add_argument("--temp", type=float, default=0.0, help="Default sampling temperature.")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument(
        "--prompt-cache-gb", type=float, default=4.0, help="Prompt cache size cap; 0 = off."
    )
    p.add_argument("--prompt-cache-size", type=int, default=8, help="Most prompts the cache keeps.")
    p.add_argument(
        "--decode-concurrency",
        type=int,
        help="Most requests decoded together in one batch (default 8; 1 with --mtp).",
    )
    p.add_argument(
        "--prompt-concurrency", type=int, default=1, help="Most prompts prefilled together."
    )
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=512,
        help="Prompt tokens prefilled per step, between decode steps.",
    )
    p.add_argument(
        "--mtp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="MTP speculative decoding, one request at a time (default: off, batched decoding).",
    )
    p.add_argument("--num-draft", type=int, default=1, help="Tokens drafted per MTP step.")
    p.add_argument(
        "--expert-slots", type=int, help="Stream routed experts from disk, N per layer in memory."
    )
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    if a.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    if a.temp < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or not 0 <= a.min_p <= 1:
        p.error("need --temp >= 0, 0 < --top-p <= 1, --top-k >= 0, 0 <= --min-p <= 1")
    if a.num_draft < 1:
        p.error("--num-draft must be at least 1")
    if a.prompt_cache_gb < 0 or a.prompt_cache_size < 1:
        p.error("need --prompt-cache-gb >= 0 and --prompt-cache-size >= 1")
    if a.mtp and (a.decode_concurrency or 1) > 1:
        p.error("--mtp decodes one request at a time: it cannot go with --decode-concurrency > 1")
    decode_concurrency = a.decode_concurrency or (1 if a.mtp else 8)
    if min(decode_concurrency, a.prompt_concurrency, a.prefill_step_size) < 1:
        p.error("--decode-concurrency, --prompt-concurrency, --prefill-step-size must be >= 1")

    if a.api_key is None and a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {a.host} without --api-key", file=sys.stderr)
    try:
        model, tokenizer = load(a.model, expert_slots=a.expert_slots)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if a.mtp and model.mtp is None:
        raise SystemExit("error: --mtp: this checkpoint has no MTP layer")
    app = create_app(
        model,
        tokenizer,
        model_id=Path(a.model).name if a.model else "glm4moe-demo",
        api_key=a.api_key,
        max_tokens=a.max_tokens,
        sampling={"temp": a.temp, "top_p": a.top_p, "top_k": a.top_k, "min_p": a.min_p},
        prompt_cache_bytes=int(a.prompt_cache_gb * (1 << 30)),
        prompt_cache_size=a.prompt_cache_size,
        decode_concurrency=decode_concurrency,
        prompt_concurrency=a.prompt_concurrency,
        prefill_step_size=a.prefill_step_size,
        mtp=a.mtp,
        num_draft=a.num_draft,
    )
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)


if __name__ == "__main__":
    main()
