"""The one request pipeline every API module shares.

An API module supplies three things (`API`): its request schema, a translation of a validated
request into one `Spec` (what to generate and how), and an `Encoder` that turns the events of
the generation into its wire format. The core does the rest, the same way for every API:
parse the body (4xx for anything malformed, never a 500), tokenize (on one lock), submit to
the batching engine (429/529 when its queue is full), then stream server-sent events (with
keep-alives, an error event in the API's shape when anything fails, and the client's leaving
watched all along) or collect the whole answer; whatever way a request ends, its generation is
cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import llguidance
import mlx.core as mx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ..batch import BatchEngine, QueueFull
from ..batch import Request as BatchRequest
from ..chat import PromptCache, Reply, StopText, render_prompt
from ..constrain import ConstraintError, Constraints
from ..generate import Sampler, encode
from ..models import Model
from ..thinking import budget_for

log = logging.getLogger(__name__)
T = TypeVar("T")

# The longest a stream stays silent: a client with an idle timeout (Claude Code's is 300 s)
# must not take a long prefill for a dead server.
KEEPALIVE_INTERVAL = 2.0
# How often a request waiting for its events checks that the engine still runs.
ENGINE_CHECK_INTERVAL = 1.0
# Deeper JSON is refused before anything walks it: parsers, validators and the chat template
# recurse, and would hit Python's recursion limit (a 500) on a body nested thousands deep.
MAX_DEPTH = 128


class Strict(BaseModel):
    """Request schemas: a wrong type is an error, not a coercion ("5" is not a number). Unknown
    fields are accepted, ignored and logged once each (see `parse_request`)."""

    model_config = ConfigDict(strict=True, extra="allow")


# Each API's sampling fields with the bounds its spec gives them.
class OpenAISampling(Strict):
    """OpenAI's (chat completions, completions, responses): temperature 0 to 2; top_k and
    min_p are extensions other OpenAI-compatible servers take too."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None


class AnthropicSampling(Strict):
    """Anthropic's: temperature 0 to 1, top_p, top_k."""

    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)


def sampling(req: OpenAISampling | AnthropicSampling) -> dict[str, Any]:
    """A request's sampling fields as the engine's (None: the server's default)."""
    return {
        "temp": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": getattr(req, "min_p", None),
    }


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
    the Anthropic routes with Anthropic's, ``{"type": "error", "error": {type, message}}``.
    `anthropic_status` is the status there when it differs (529 for an overloaded server)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        anthropic_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )
        self.anthropic_status = anthropic_status or status
        self.headers = headers

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
            status = self.anthropic_status
            body = anthropic_error_body(status, self.message)
        else:
            status, body = self.status, self.body()
        return JSONResponse(body, status_code=status, headers=self.headers)


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error")


# The answer when the engine's waiting queue is full: OpenAI's rate-limit body (its SDKs retry
# after Retry-After), Anthropic's 529 overloaded_error.
def queue_full() -> APIError:
    return APIError(
        429,
        "The server is busy: too many requests are waiting. Try again shortly.",
        code="rate_limit_exceeded",
        type="rate_limit_exceeded",
        anthropic_status=529,
        headers={"Retry-After": "1"},
    )


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


def check_json(data: Any) -> None:
    """Refuse (400) JSON nested deeper than `MAX_DEPTH`, and text holding lone surrogates
    (``"\\udcff"`` escapes, which are no Unicode text: the tokenizer cannot take them). Walks
    without recursion."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"The request is nested more than {MAX_DEPTH} levels deep.")
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                where = f"'{path}'" if path else "the request"
                raise APIError(
                    400, f"{where} holds a lone surrogate: not valid Unicode text.", path or None
                ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path, depth + 1))
                stack.append((item, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def parse_request(
    body: bytes, schema: type[BaseModel], check: Callable[[dict], None] | None = None
) -> Any:
    """Validate a request body against `schema` (after `check_json`, and `check` given the JSON
    object); raises `APIError` (400) on invalid JSON or fields. Fields the schema does not know
    are hints this server does not act on (fields that would change the form of the answer are
    declared, and refused where they are read): they are accepted, and logged once per name."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise APIError(400, "The request body is not valid JSON (or is nested too deep).") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    check_json(data)
    if check is not None:
        check(data)
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"], data)
        if err["type"] == "missing":  # the field is not in the body: name it all the same
            param = ".".join(filter(None, [param, str(err["loc"][-1])]))
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}.", param) from None
    for name in _extra_fields(req):
        log_once(f"field {name}", "%s: field '%s' accepted and ignored", schema.__name__, name)
    return req


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A request's stop strings as a list (OpenAI takes one string or a list); none empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise APIError(400, "Stop strings must not be empty.", "stop")
    return stops


# -- what an API module supplies ------------------------------------------------------------------


@dataclass
class Spec:
    """One request as the engine takes it, whatever API it came through.

    A chat has `messages` (OpenAI-shaped, as the template renders them), else `prompt` is a
    raw prompt (text or token ids, no template). `tool_choice` is "auto" (or None), "none",
    "required" or a function name; `response_format` is chat completions' (the answer's JSON
    schema, enforced); `parallel` lets tool calls come many. `max_tokens` None is the server's
    default; both are cut to what the context leaves. `sampling` holds temp, top_p, top_k and
    min_p (None: the server's default); `top_logprobs` (0 or more) asks for log-probabilities.
    `pin_cache` keeps the prompt's cache entry ahead of plain ones (Anthropic's cache_control).
    `thinking_budget` caps the reasoning's tokens (None: the server's default). `progress`
    asks a stream for the prefill's progress (the APIs' `return_progress`).
    """

    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    tools: list[dict] | None = None
    tool_choice: str | None = None
    enable_thinking: bool = True
    template_kwargs: dict[str, Any] | None = None
    response_format: dict | None = None
    parallel: bool = True
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    top_logprobs: int | None = None
    pin_cache: bool = False
    thinking_budget: int | None = None
    progress: bool = False


class Encoder:
    """Turns one job's events into its API's answer. The stream is `open()`, then `feed(e)`
    for each event (`chat_events`' or `text_events`'), `progress(e)` for each ``prefill`` event
    (when the spec asked), `ping()` whenever nothing came for a while, and `fail(message)` in
    place of the rest when the generation or the encoding failed: each returns the server-sent
    events to send. A whole answer is `result()` once the ``done`` event was fed."""

    def open(self) -> list[str]:
        return []

    def feed(self, event: dict) -> list[str]:
        raise NotImplementedError

    def progress(self, event: dict) -> list[str]:
        raise NotImplementedError

    def ping(self) -> list[str]:
        raise NotImplementedError

    def fail(self, message: str) -> list[str]:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class API:
    """An API module's part of the pipeline: `schema` validates the body (after `check`, given
    the JSON object), `translate(req, engine)` makes its `Spec`, `encoder(req, job, engine)`
    its `Encoder`. Requests whose schema has ``stream: true`` are streamed."""

    schema: type[Strict]
    translate: Callable[[Any, Engine], Spec]
    encoder: Callable[[Any, Job, Engine], Encoder]
    check: Callable[[dict], None] | None = None


# -- generation ---------------------------------------------------------------------------------


@dataclass
class Job:
    """One validated request: its spec, its prompt tokens and the text they came from (a chat's
    rendered prompt, where its parser starts), its completion length, its compiled grammar
    (`constrain.Constraints.check`; None: free), and the events of its generation (from the
    engine thread)."""

    request: BaseModel
    spec: Spec
    tokens: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    prompt: str | None = None
    tool_choice: str | None = None  # None for auto
    grammar: llguidance.LLMatcher | None = None
    # The most reasoning tokens before </think> is forced (`thinking.budget_for`; None: no cap).
    thinking_budget: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def messages(self) -> list[dict] | None:
        """The chat's messages, None for a raw prompt (what a `sampler_factory` reads)."""
        return self.spec.messages

    def emit(self, event: dict) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


def forbid_token(sampler: Sampler, token_id: int) -> Sampler:
    """`sampler` that can never pick `token_id`."""

    def sample(logprobs: mx.array) -> mx.array:
        banned = mx.arange(logprobs.shape[-1]) == token_id
        return sampler(mx.where(banned, -mx.inf, logprobs))

    return sample


SamplerFactory = Callable[[Job], "Sampler | None"]


class Engine:
    """The model, its prompt cache and the batching engine behind the HTTP routes.

    Every use of the tokenizer goes through this class, behind one lock: Hugging Face fast
    tokenizers are not made to be called from several threads at once (prompts are encoded in
    worker threads while the event loop decodes tokens and counts reasoning). Two readers stay
    outside it: llguidance's copy of the vocabulary, built here before any request, and the
    engine thread's streaming detokenizer (mlx-lm's BPE one for GLM), which reads its own
    tables."""

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
        self.tokenizer_lock = threading.Lock()
        self.thinking_budget = thinking_budget  # for requests that set none
        self.context_length = model.args.max_position_embeddings
        self.max_tokens = max_tokens
        self.sampling = {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, **(sampling or {})}
        self.sampler_factory = sampler_factory
        self.tool_call_token = tokenizer.convert_tokens_to_ids("<tool_call>")
        self.constraints = Constraints(tokenizer, model.args.vocab_size)
        # llguidance's copy of the vocabulary: built now, while no request uses the tokenizer.
        self.constraints.ll_tokenizer  # noqa: B018
        self.batch = BatchEngine(
            model, tokenizer, prompt_cache=prompt_cache, **(batch_kwargs or {})
        )

    # -- the tokenizer, on one lock ---------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        with self.tokenizer_lock:
            return encode(self.tokenizer, prompt)

    def render(self, spec: Spec) -> str:
        """A chat spec's prompt text (400 when the template refuses its messages)."""
        try:
            with self.tokenizer_lock:
                return render_prompt(
                    self.tokenizer,
                    spec.messages,
                    spec.tools,
                    spec.enable_thinking,
                    chat_template_kwargs=spec.template_kwargs,
                )
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    def decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens)

    def token_text(self, token: int) -> str:
        return self.decode([token])

    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return len(self.tokenizer.encode(text, add_special_tokens=False))

    def is_eos(self, token: int) -> bool:
        return token in self.tokenizer.eos_token_ids

    # -- requests ---------------------------------------------------------------------------

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

    def prepare(self, request: BaseModel, spec: Spec, loop: asyncio.AbstractEventLoop) -> Job:
        """Check a request's spec against the model (tools, context length, what it asks to
        enforce, compiling its grammar) and make its job. Runs in a worker thread."""
        if spec.messages is None:
            return self._prepare_text(request, spec, loop)
        names = {t["function"]["name"] for t in spec.tools or ()}
        choice = None if spec.tool_choice == "auto" else spec.tool_choice
        if choice not in (None, "none", "required") and choice not in names:
            raise APIError(
                400,
                f"Invalid value for 'tool_choice': no function named '{choice}' in 'tools'.",
                "tool_choice",
            )
        if choice == "required" and not spec.tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'.", "tool_choice")
        try:
            grammar = self.constraints.check(
                spec.response_format, spec.tools, choice, spec.parallel
            )
        except ConstraintError as e:
            raise APIError(400, e.message, e.param) from None
        prompt = self.render(spec)
        tokens = self.encode(prompt)
        max_tokens = self.room(len(tokens), spec.max_tokens, "messages", "messages")
        budget = None
        if spec.enable_thinking:
            budget = budget_for(
                spec.thinking_budget, self.thinking_budget, max_tokens, grammar is not None
            )
        return Job(
            request=request,
            spec=spec,
            tokens=tokens,
            max_tokens=max_tokens,
            loop=loop,
            prompt=prompt,
            tool_choice=choice,
            grammar=grammar,
            thinking_budget=budget,
        )

    def _prepare_text(self, request: BaseModel, spec: Spec, loop: asyncio.AbstractEventLoop) -> Job:
        tokens = self.encode(spec.prompt)
        if not tokens:
            raise APIError(400, "The prompt is empty.", "prompt")
        if any(not 0 <= t < self.model.args.vocab_size for t in tokens):
            raise APIError(400, "The prompt holds token ids outside the vocabulary.", "prompt")
        max_tokens = self.room(len(tokens), spec.max_tokens, "prompt", "prompt")
        return Job(request=request, spec=spec, tokens=tokens, max_tokens=max_tokens, loop=loop)

    def submit(self, job: Job) -> None:
        """Queue the job on the engine: 503 when the engine is not running (its thread died),
        429 (529 on the Anthropic routes) when its waiting queue is full."""
        if not self.batch.alive:
            raise APIError(503, "The engine is not running.", type="server_error")
        try:
            self.batch.submit(
                BatchRequest(
                    job.tokens,
                    job.max_tokens,
                    job.emit,
                    make_sampler=lambda: self._sampler(job),
                    seed=job.spec.seed,
                    top_logprobs=job.spec.top_logprobs,
                    cancel=job.cancel,
                    pin_cache=job.spec.pin_cache,
                    thinking_budget=job.thinking_budget,
                    progress=job.spec.progress and getattr(job.request, "stream", False),
                )
            )
        except QueueFull:
            raise queue_full() from None

    def _sampler(self, job: Job) -> Sampler:
        """Runs on the engine thread when the job starts."""
        custom = self.sampler_factory(job) if self.sampler_factory else None
        given = job.spec.sampling
        s = {k: d if given.get(k) is None else given[k] for k, d in self.sampling.items()}
        sampler = custom or make_sampler(s["temp"], s["top_p"], s["min_p"], top_k=s["top_k"])
        if job.grammar is not None:
            return self.constraints.sampler(
                job.grammar, sampler, job.prompt, job.spec.enable_thinking
            )
        if job.tool_choice == "none":
            return forbid_token(sampler, self.tool_call_token)
        return sampler

    async def engine_events(self, job: Job) -> AsyncIterator[dict]:
        """The engine's prefill and token events for `job`, then its done or error event; an
        error event too if the engine stops meanwhile (its thread died), so that no request
        waits on it for ever."""
        pending = asyncio.ensure_future(job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=ENGINE_CHECK_INTERVAL)
                if not done:
                    if not self.batch.alive:
                        yield {"type": "error", "message": "The engine stopped."}
                        return
                    continue
                event = pending.result()
                yield event
                if event["type"] not in ("prefill", "token"):
                    return
                pending = asyncio.ensure_future(job.events.get())
        finally:
            pending.cancel()

    async def serve(self, request: Request, api: API) -> Response | dict:
        """A request through the pipeline (see the module docstring): the whole answer's body,
        or the stream of server-sent events."""
        req = parse_request(await request.body(), api.schema, api.check)
        loop = asyncio.get_running_loop()
        job = await run_in_threadpool(lambda: self.prepare(req, api.translate(req, self), loop))
        encoder = api.encoder(req, job, self)
        self.submit(job)
        events = chat_events(job, self) if job.messages is not None else text_events(job, self)
        if getattr(req, "stream", False):
            return StreamingResponse(
                self._stream(request, job, encoder, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                # Also when the client left before the stream began (then it never ran).
                background=BackgroundTask(job.cancel.set),
            )
        return await self._collect(request, job, encoder, events)

    async def _stream(
        self, request: Request, job: Job, encoder: Encoder, events: AsyncIterator[dict]
    ) -> AsyncIterator[str]:
        watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
        try:
            try:
                for s in encoder.open():
                    yield s
                async for event in keepalive(events, lambda: TICK, self.keepalive_interval):
                    if event is TICK:
                        out = encoder.ping()
                    elif event["type"] == "error":
                        out = encoder.fail(event["message"])
                    elif event["type"] == "prefill":
                        out = encoder.progress(event)
                    else:
                        out = encoder.feed(event)
                    for s in out:
                        yield s
            except Exception:
                log.exception("a streamed answer failed")
                job.cancel.set()
                for s in encoder.fail("The server failed while answering."):
                    yield s
        finally:
            # The end of the stream, or the client's leaving (the generator is closed then).
            watcher.cancel()
            job.cancel.set()

    async def _collect(
        self, request: Request, job: Job, encoder: Encoder, events: AsyncIterator[dict]
    ) -> dict:
        watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
        try:
            async for event in events:
                if event["type"] == "error":
                    raise server_error(event["message"])
                encoder.feed(event)
                if event["type"] == "done":
                    return encoder.result()
        except APIError:
            raise
        except Exception:
            log.exception("an answer failed")
            raise server_error("The server failed while answering.") from None
        finally:
            watcher.cancel()
            job.cancel.set()  # ends the generation if the answer failed; no-op when done
        raise server_error("The generation ended without an answer.")


# -- replies ------------------------------------------------------------------------------------

TICK = {"type": "tick"}  # nothing came for a while (`keepalive`)


async def chat_events(job: Job, engine: Engine) -> AsyncIterator[dict]:
    """A chat job's reply events: ``reasoning`` / ``content`` deltas, whole ``tool_call``s,
    ``logprobs`` entries (when asked for), then ``done`` (see `chat.Reply`) or ``error``. A stop
    string ends the generation."""
    spec = job.spec
    reply = Reply(spec.tools, job.prompt, stop=spec.stop, parallel=spec.parallel)
    async for event in engine.engine_events(job):
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


async def text_events(job: Job, engine: Engine) -> AsyncIterator[dict]:
    """A raw prompt's token events as plain text: ``text`` deltas (stop strings cut),
    ``logprobs`` entries ``(token, logprob, {token: logprob})``, then ``done`` or ``error``."""
    stop = StopText(job.spec.stop)
    stopped = False
    async for event in engine.engine_events(job):
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


def prompt_progress(event: dict) -> dict:
    """A ``prefill`` event as llama.cpp's `prompt_progress` object: `processed` counts the
    cached tokens too; (processed - cache) / (total - cache) is the part of the work done."""
    return {
        "total": event["total"],
        "cache": event["cached"],
        "processed": event["done"],
        "time_ms": event["time_ms"],
    }


def _logprob_entry(engine: Engine, token: int, lp: dict) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = engine.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(token, lp["logprob"]), "top_logprobs": [entry(t, v) for t, v in lp["top"]]}


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def keepalive(
    events: AsyncIterator[T], ping: Callable[[], T], interval: float
) -> AsyncIterator[T]:
    """`events`, with `ping()` among them whenever `interval` seconds pass without one: a long
    prefill, or a long wait for a decode slot, then does not look like a dead connection."""
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
