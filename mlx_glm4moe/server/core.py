"""The core every API module shares: a validated request becomes a `Job` (prompt tokens, limits,
sampling, tool choice), the batching engine generates it, and its tokens come back as parsed
chat events (`chat.Reply`, the same assembly as `chat.stream_chat`) or plain text. The API
modules only translate their wire formats to and from this.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.background import BackgroundTask

from ..batch import BatchEngine
from ..batch import Request as BatchRequest
from ..chat import PromptCache, Reply, render_prompt
from ..constrain import ConstraintError, Constraints
from ..generate import Sampler, encode
from ..models import Model
from ..thinking import budget_for

log = logging.getLogger(__name__)
T = TypeVar("T")

# The longest a stream stays silent: a client with an idle timeout (Claude Code's is 300 s)
# must not take a long prefill for a dead server.
KEEPALIVE_INTERVAL = 2.0


class Strict(BaseModel):
    """Request schemas: a wrong type is an error, not a coercion ("5" is not a number). Unknown
    fields are accepted, ignored and logged once each (see `parse_request`)."""

    model_config = ConfigDict(strict=True, extra="allow")


# -- errors -------------------------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict:
    """Anthropic's error shape for an HTTP status."""
    default = "invalid_request_error" if status < 500 else "api_error"
    kind = ANTHROPIC_ERROR_TYPES.get(status, default)
    return {"type": "error", "error": {"type": kind, "message": message}}


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
            body = anthropic_error_body(self.status, self.message)
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


def text_only(messages: Any, text_types: set[str]) -> None:
    """Refuse (400) a content block, in a message or in a block's own content (a tool result),
    whose type is not in `text_types` (an image, a document, ...), saying where it is: the
    schema's error for it would only say that the content is not a string."""

    def check(content: Any, where: str) -> None:
        for j, block in enumerate(content if isinstance(content, list) else ()):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in text_types:
                raise APIError(
                    400,
                    f"{where}[{j}]: '{kind}' blocks are not supported: this model reads text "
                    f"only (blocks of type {', '.join(sorted(text_types))}).",
                    f"{where}[{j}]",
                )
            if isinstance(block, dict):
                check(block.get("content"), f"{where}[{j}].content")

    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(m, dict):
            check(m.get("content"), f"messages[{i}].content")


def _extra_fields(model: BaseModel, path: str = "") -> list[str]:
    """The names (dotted, without list indexes) of the fields in `model` and the models in it
    that no schema declares."""
    names = [path + name for name in model.model_extra or ()]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, BaseModel):
                names += _extra_fields(item, f"{path}{name}.")
    return names


_logged: set[str] = set()
_MOST_LOGGED = 1000  # names a client makes up must not grow the set (or the log) without end


def log_once(key: str, message: str, *args: Any) -> None:
    """A warning the first time `key` comes up (what a client sends that is not acted on)."""
    if key not in _logged and len(_logged) < _MOST_LOGGED:
        _logged.add(key)
        log.warning(message, *args)


def parse_request(
    body: bytes, schema: type[BaseModel], check: Callable[[dict], None] | None = None
) -> Any:
    """Validate a request body against `schema` (after `check`, given the JSON object); raises
    `APIError` (400) on invalid JSON or fields. Fields the schema does not know are hints this
    server does not act on (fields that would change the form of the answer are declared, and
    refused where they are read): they are accepted, and logged once per name."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if check is not None:
        check(data)
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"], data)
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}.", param) from None
    for name in _extra_fields(req):
        log_once(f"field {name}", "%s: field '%s' accepted and ignored", schema.__name__, name)
    return req


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
    # for auto), whether calls may come many, and the grammar that enforces the answer's
    # format, the tool choice and strict tools (`constrain.Constraints`; None: free).
    prompt: str | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    enable_thinking: bool = True
    tool_choice: str | None = None
    parallel: bool = True
    grammar: str | None = None
    # Keep this prompt's cache entry ahead of plain ones (Anthropic's cache_control).
    pin_cache: bool = False
    # The most reasoning tokens before </think> is forced (`thinking.budget_for`; None: no cap).
    thinking_budget: int | None = None
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


def forbid_token(sampler: Sampler, token_id: int) -> Sampler:
    """`sampler` that can never pick `token_id`."""

    def sample(logprobs: mx.array) -> mx.array:
        banned = mx.arange(logprobs.shape[-1]) == token_id
        return sampler(mx.where(banned, -mx.inf, logprobs))

    return sample


SamplerFactory = Callable[[Job], "Sampler | None"]


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A request's stop strings as a list (OpenAI takes one string or a list); none empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, "Stop strings must not be empty.", "stop")
    return stops


class Engine:
    """The model, its prompt cache and the batching engine behind the HTTP routes."""

    keepalive_interval = KEEPALIVE_INTERVAL  # seconds between pings of a silent stream

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
        thinking_budget: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.thinking_budget = thinking_budget  # for requests that set none
        self.context_length = model.args.max_position_embeddings
        self.max_tokens = max_tokens
        self.sampling = {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, **(sampling or {})}
        self.sampler_factory = sampler_factory
        self.tool_call_token = tokenizer.convert_tokens_to_ids("<tool_call>")
        self.constraints = Constraints(tokenizer, model.args.vocab_size)
        self.batch = BatchEngine(
            model, tokenizer, prompt_cache=prompt_cache, **(batch_kwargs or {})
        )

    def room(self, n_prompt: int, requested: int | None, what: str, param: str) -> int:
        """The completion length: `requested`, else the default, cut to what the context
        leaves after the prompt (the reply then ends for length). A prompt that leaves no room
        is an error."""
        room = self.context_length - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your {what} resulted in {n_prompt} tokens.",
                param,
                "context_length_exceeded",
            )
        return min(requested or self.max_tokens, room)

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
        response_format: dict | None = None,
        pin_cache: bool = False,
        thinking_budget: int | None = None,
    ) -> Job:
        """Check a chat request against the model (tools, context length, what it asks to
        enforce) and make its job. `tool_choice` is "auto", "none", "required" or a function
        name; `response_format` is chat completions' (see `Job`); `pin_cache` keeps the
        prompt's cache entry ahead of plain ones; `thinking_budget` caps the reasoning (None:
        the server's default)."""
        names = {t["function"]["name"] for t in tools or ()}
        if tool_choice not in (None, "auto", "none", "required") and tool_choice not in names:
            raise APIError(
                400,
                f"Invalid value for 'tool_choice': no function named '{tool_choice}' in 'tools'.",
                "tool_choice",
            )
        if tool_choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'.", "tool_choice")
        choice = None if tool_choice == "auto" else tool_choice
        try:
            grammar = self.constraints.check(response_format, tools, choice, parallel)
        except ConstraintError as e:
            raise APIError(400, e.message, e.param) from None
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
        max_tokens = self.room(len(tokens), max_tokens, "messages", "messages")
        budget = None
        if enable_thinking:
            budget = budget_for(thinking_budget, self.thinking_budget, max_tokens, bool(grammar))
        return Job(
            request=request,
            tokens=tokens,
            prompt=prompt,
            max_tokens=max_tokens,
            stop=stop,
            sampling=sampling,
            loop=loop,
            seed=seed,
            top_logprobs=top_logprobs,
            messages=messages,
            tools=tools,
            enable_thinking=enable_thinking,
            tool_choice=choice,
            parallel=parallel,
            grammar=grammar,
            pin_cache=pin_cache,
            thinking_budget=budget,
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
                pin_cache=job.pin_cache,
                thinking_budget=job.thinking_budget,
            )
        )

    def _sampler(self, job: Job) -> Sampler:
        """Runs on the engine thread when the job starts."""
        custom = self.sampler_factory(job) if self.sampler_factory else None
        s = {k: v if v is not None else self.sampling[k] for k, v in job.sampling.items()}
        sampler = custom or make_sampler(s["temp"], s["top_p"], s["min_p"], top_k=s["top_k"])
        if job.grammar is not None:
            return self.constraints.sampler(job.grammar, sampler, job.prompt, job.enable_thinking)
        if job.tool_choice == "none":
            return forbid_token(sampler, self.tool_call_token)
        return sampler

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def is_eos(self, token: int) -> bool:
        return token in self.tokenizer.eos_token_ids


# -- replies ------------------------------------------------------------------------------------


async def chat_events(job: Job, engine: Engine) -> AsyncIterator[dict]:
    """A chat job's reply events: ``reasoning`` / ``content`` deltas, whole ``tool_call``s,
    ``logprobs`` entries (when asked for), then ``done`` (see `chat.Reply`) or ``error``. A stop
    string ends the generation."""
    reply = Reply(job.tools, job.prompt, stop=job.stop, parallel=job.parallel)
    async for event in job.engine_events():
        kind = event["type"]
        if kind == "token":
            lp = event["logprobs"]
            if lp is not None and not reply.stopped and not engine.is_eos(event["token"]):
                yield {"type": "logprobs", "entry": _logprob_entry(engine, event["token"], lp)}
            for e in reply.feed(event["text"]):
                yield e
            if reply.stopped:
                job.cancel.set()
        elif kind == "done":
            for e in reply.close(event["finish_reason"], event["usage"]):
                yield e
        else:
            yield event


def _logprob_entry(engine: Engine, token: int, lp: dict) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = engine.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(token, lp["logprob"]), "top_logprobs": [entry(t, v) for t, v in lp["top"]]}


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def collect(request: Request, job: Job, events: AsyncIterator[dict]) -> tuple[dict, list]:
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


async def keepalive(
    events: AsyncIterator[T], ping: Callable[[], T], interval: float
) -> AsyncIterator[T]:
    """`events` (formatted server-sent events, or events the API module turns into some), with
    `ping()` sent whenever `interval` seconds pass without one: a long prefill, or a long wait
    for a decode slot, then does not look like a dead connection."""
    events = aiter(events)
    pending = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield ping()
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(events))
    finally:
        pending.cancel()


def sse(events: AsyncIterator[str], job: Job) -> StreamingResponse:
    """A server-sent event stream whose end, or the client's leaving, ends the generation."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for s in events:
                yield s
        finally:
            job.cancel.set()  # stops the generation when the client went away; no-op when done

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        # Also when the client left before the stream began (then `events` never ran).
        background=BackgroundTask(job.cancel.set),
    )
