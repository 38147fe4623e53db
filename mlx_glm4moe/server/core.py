"""The core every API module shares: a validated request becomes a `Job` (prompt tokens, limits,
sampling, tool choice), the batching engine generates it, and its tokens come back as parsed
chat events (`chat.Reply`, the same assembly as `chat.stream_chat`) or plain text. The API
modules only translate their wire formats to and from this.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

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
from ..generate import Sampler, encode
from ..model import Model


class Strict(BaseModel):
    """Request schemas: a wrong type is an error, not a coercion ("5" is not a number). Unknown
    fields are accepted and ignored, as OpenAI-compatible servers do."""

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


def parse_request(body: bytes, schema: type[BaseModel]) -> Any:
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
    # Keep this prompt's cache entry ahead of plain ones (Anthropic's cache_control).
    pin_cache: bool = False
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


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A request's stop strings as a list (OpenAI takes one string or a list); none empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, "Stop strings must not be empty.", "stop")
    return stops


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

    def room(self, n_prompt: int, requested: int | None, what: str, param: str) -> int:
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
        pin_cache: bool = False,
    ) -> Job:
        """Check a chat request against the model (tools, context length) and make its job.
        `tool_choice` is "auto", "none", "required" or a function name; `pin_cache` keeps the
        prompt's cache entry ahead of plain ones."""
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
            max_tokens=self.room(len(tokens), max_tokens, "messages", "messages"),
            stop=stop,
            sampling=sampling,
            loop=loop,
            seed=seed,
            top_logprobs=top_logprobs,
            messages=messages,
            tools=tools,
            enable_thinking=enable_thinking,
            tool_choice=None if tool_choice == "auto" else tool_choice,
            parallel=parallel,
            pin_cache=pin_cache,
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
