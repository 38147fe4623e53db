"""An OpenAI-compatible Chat Completions server for GLM-4.5 models, on FastAPI + uvicorn.

Generation on one MLX model is not thread-safe, so it runs on a single worker thread fed by a
request queue: requests are answered one at a time, in arrival order, while the asyncio side
validates, queues and streams. A client that goes away sets its request's cancel event, which
stops its generation (or skips it, if it is still queued). A prompt cache shared by the
requests reuses the longest cached prefix of each new prompt.

Run it with ``python -m mlx_glm4moe.server --model PATH`` (or ``glm4moe-server``).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import PromptCache, encode_messages, stream_chat
from .generate import MTP_BY_DEFAULT, Sampler
from .model import Model

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


class ChatRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (the fields this server acts on)."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    chat_template_kwargs: dict[str, Any] | None = None


# -- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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


def parse_request(body: bytes) -> ChatRequest:
    """Validate a request body; raises `APIError` (400) on invalid JSON or fields."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"], data)
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}.", param) from None


# -- generation ---------------------------------------------------------------------------------

_END = object()  # the worker's last word on a job


@dataclass
class Job:
    """One validated request, handed to the worker thread."""

    request: ChatRequest
    messages: list[dict]
    tools: list[dict] | None
    enable_thinking: bool
    max_tokens: int
    stop: list[str]
    tool_choice: str | None  # "none", "required", a function name, or None for auto
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class Worker:
    """Runs jobs one at a time on its own thread; `run(job)` yields the job's events."""

    def __init__(self, run: Callable[[Job], Iterator[dict]]) -> None:
        self._run = run
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if not job.cancel.is_set():  # a client that left while queued costs nothing
                    for event in self._run(job):
                        job.emit(event)
            except Exception:
                log.exception("generation failed")
                job.emit({"type": "error", "message": "The generation failed."})
            finally:
                job.emit(_END)


class StopText:
    """Cuts a text stream before the first of the `stops` strings, holding back any tail that
    could still grow into one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that is safe to emit, whether a stop string was found)."""
        text = self.held + text
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
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


SamplerFactory = Callable[[ChatRequest], "Sampler | None"]


class Engine:
    """The model, its prompt cache and the generation worker behind the HTTP routes."""

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        *,
        max_tokens: int = 512,
        sampling: dict[str, Any] | None = None,
        prompt_cache: PromptCache | None = None,
        sampler_factory: SamplerFactory | None = None,
        generation_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context_length = model.args.max_position_embeddings
        self.max_tokens = max_tokens
        self.sampling = {"temp": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, **(sampling or {})}
        self.prompt_cache = prompt_cache
        self.sampler_factory = sampler_factory
        self.generation_kwargs = generation_kwargs or {}
        self.tool_call_token = tokenizer.convert_tokens_to_ids("<tool_call>")
        self.think_end_token = tokenizer.convert_tokens_to_ids("</think>")
        # Weights loaded lazily belong to this thread's MLX stream; the worker thread has its
        # own, so they are read here.
        mx.eval(model.parameters())
        self.worker = Worker(self._run)

    def prepare(self, req: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Check a request against the model (tools, context length) and make its job."""
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported.", "n")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        names = {t["function"]["name"] for t in tools or ()}
        choice = req.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(
                400,
                f"Invalid value for 'tool_choice': no function named "
                f"'{choice.function.name}' in 'tools'.",
                "tool_choice",
            )
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs 'tools'.", "tool_choice")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "Stop strings must not be empty.", "stop")
        kwargs = req.chat_template_kwargs or {}
        thinking = kwargs.get("enable_thinking", True)
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

        try:
            n_prompt = len(encode_messages(self.tokenizer, messages, tools, thinking))
        except ValueError as e:  # the chat template rejects these messages
            raise APIError(400, str(e), "messages") from None
        room = self.context_length - n_prompt
        requested = req.max_completion_tokens or req.max_tokens
        if room < 1 or (requested is not None and requested > room):
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, your messages resulted in {n_prompt} tokens"
                + (f" and {requested} were requested for the completion." if requested else "."),
                "messages",
                "context_length_exceeded",
            )
        return Job(
            request=req,
            messages=messages,
            tools=tools,
            enable_thinking=thinking,
            max_tokens=requested or min(self.max_tokens, room),
            stop=stop,
            tool_choice=choice.function.name if isinstance(choice, NamedToolChoice) else choice,
            loop=loop,
        )

    def _sampler(self, job: Job) -> Sampler:
        custom = self.sampler_factory(job.request) if self.sampler_factory else None
        r = job.request
        sampler = custom or make_sampler(
            r.temperature if r.temperature is not None else self.sampling["temp"],
            r.top_p if r.top_p is not None else self.sampling["top_p"],
            r.min_p if r.min_p is not None else self.sampling["min_p"],
            top_k=r.top_k if r.top_k is not None else self.sampling["top_k"],
        )
        choice = job.tool_choice
        if choice == "none":
            return forbid_token(sampler, self.tool_call_token)
        if choice is None or choice == "auto":
            return sampler
        # "required" or a named function: the call is opened for the model once its reasoning
        # is over (it writes the arguments itself).
        forced = [self.tool_call_token]
        if choice != "required":
            forced += self.tokenizer.encode(choice + "\n", add_special_tokens=False)
        trigger = self.think_end_token if job.enable_thinking else None
        return ForceAfter(sampler, forced, trigger)

    def _run(self, job: Job) -> Iterator[dict]:
        """The worker side of one request: `stream_chat`'s events, with stop strings applied
        to the content."""
        stop = StopText(job.stop)
        stopped = False
        events = stream_chat(
            self.model,
            self.tokenizer,
            job.messages,
            tools=job.tools,
            enable_thinking=job.enable_thinking,
            prompt_cache=self.prompt_cache,
            max_tokens=job.max_tokens,
            sampler=self._sampler(job),
            seed=job.request.seed,
            cancel=job.cancel,
            **self.generation_kwargs,
        )
        for event in events:
            kind = event["type"]
            if kind == "done":
                if not stopped and stop.held:
                    yield {"type": "content", "delta": stop.flush()}
                finish = "stop" if stopped else event["finish_reason"]
                yield {**event, "finish_reason": finish}
            elif stopped:
                continue  # the tail generated before the cancel took effect
            elif kind == "content" and job.stop:
                text, stopped = stop.feed(event["delta"])
                if text:
                    yield {"type": "content", "delta": text}
                if stopped:
                    job.cancel.set()
            else:
                yield event


# -- responses ----------------------------------------------------------------------------------


def _usage(usage: dict) -> dict:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


async def _events(job: Job) -> AsyncIterator[dict]:
    while (event := await job.events.get()) is not _END:
        yield event


async def _stream(job: Job, head: dict) -> AsyncIterator[str]:
    """Server-sent events: one chunk per parser event; a tool call arrives whole in one chunk."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]}, ensure_ascii=False)}\n\n"

    options = job.request.stream_options
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in _events(job):
            kind = event["type"]
            if kind == "reasoning":
                yield chunk({"reasoning_content": event["delta"]})
            elif kind == "content":
                yield chunk({"content": event["delta"]})
            elif kind == "tool_call":
                yield chunk({"tool_calls": [event["tool_call"]]})
            elif kind == "done":
                yield chunk({}, event["finish_reason"])
                if options is not None and options.include_usage:
                    usage = {**head, "choices": [], "usage": _usage(event["usage"])}
                    yield f"data: {json.dumps(usage)}\n\n"
            elif kind == "error":
                error = APIError(500, event["message"], type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # stops the generation when the client went away; no-op when done


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


async def _complete(request: Request, job: Job, head: dict) -> JSONResponse:
    """The whole answer in one body. Content comes from the (stop-trimmed) deltas, the
    reasoning and tool calls from the final message."""
    watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
    content: list[str] = []
    done: dict | None = None
    try:
        async for event in _events(job):
            if event["type"] == "content":
                content.append(event["delta"])
            elif event["type"] == "done":
                done = event
            elif event["type"] == "error":
                return APIError(500, event["message"], type="server_error").response()
    finally:
        watcher.cancel()
    if done is None:  # cancelled before it started: nobody is listening any more
        return APIError(500, "The request was cancelled.", type="server_error").response()
    text, calls = "".join(content), done["message"]["tool_calls"]
    message = {
        "role": "assistant",
        "content": text if text or not calls else None,
        "reasoning_content": done["message"]["reasoning_content"],
        "tool_calls": calls or None,
    }
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": done["finish_reason"],
    }
    return JSONResponse(
        {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(done["usage"])}
    )


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
    generation_kwargs: dict[str, Any] | None = None,
) -> FastAPI:
    """The server as an ASGI app (serve it with uvicorn).

    Args:
        model, tokenizer: from `load`; call this in the thread that loaded them.
        model_id: the name `/v1/models` lists and responses carry.
        api_key: when set, `/v1/*` requires ``Authorization: Bearer <api_key>``.
        max_tokens: the completion length when a request gives none (capped by the context).
        sampling: default temp, top_p, top_k, min_p for requests that give none.
        prompt_cache_bytes, prompt_cache_size: the prompt cache's caps (bytes, entries);
            0 bytes turns it off.
        sampler_factory: builds a request's sampler (None = the usual one from its fields):
            a seam for scripted output in tests and for custom sampling.
        generation_kwargs: passed on to every generation (e.g. options of `stream_generate`).
    """
    engine = Engine(
        model,
        tokenizer,
        max_tokens=max_tokens,
        sampling=sampling,
        prompt_cache=PromptCache(
            model,
            prompt_cache_bytes,
            prompt_cache_size,
            mtp=(generation_kwargs or {}).get("mtp", False),
        )
        if prompt_cache_bytes > 0
        else None,
        sampler_factory=sampler_factory,
        generation_kwargs=generation_kwargs,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.worker.close)

    app = FastAPI(
        title="mlx-glm4moe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    created = int(time.time())

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect or missing API key.", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, for uvicorn to log; the process stays up.
        return APIError(500, "Internal server error.", type="server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @v1.get("/models")
    async def models() -> dict:
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-glm4moe"}
        return {"object": "list", "data": [entry]}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await request.body())
        job = await run_in_threadpool(engine.prepare, req, asyncio.get_running_loop())
        engine.worker.submit(job)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
        }
        if req.stream:
            return StreamingResponse(
                _stream(job, head),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                # Also when the client left before the stream began (then _stream never ran).
                background=BackgroundTask(job.cancel.set),
            )
        return await _complete(request, job, head)

    app.include_router(v1)
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .loading import load

    p = argparse.ArgumentParser(description="OpenAI-compatible server for GLM-4.5 models.")
    p.add_argument("--model", help="Model folder or Hugging Face repo (default: bundled demo).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback).")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("GLM4MOE_API_KEY"),
        help="Require this bearer key on /v1/* (default: $GLM4MOE_API_KEY, else none).",
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
        "--mtp",
        action=argparse.BooleanOptionalAction,
        help="MTP speculative decoding (default: on when the checkpoint has the layer).",
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

    if a.api_key is None and a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {a.host} without --api-key", file=sys.stderr)
    try:
        model, tokenizer = load(a.model, expert_slots=a.expert_slots)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if a.mtp and model.mtp is None:
        raise SystemExit("error: --mtp: this checkpoint has no MTP layer")
    mtp = a.mtp if a.mtp is not None else MTP_BY_DEFAULT and model.mtp is not None
    app = create_app(
        model,
        tokenizer,
        model_id=Path(a.model).name if a.model else "glm4moe-demo",
        api_key=a.api_key,
        max_tokens=a.max_tokens,
        sampling={"temp": a.temp, "top_p": a.top_p, "top_k": a.top_k, "min_p": a.min_p},
        prompt_cache_bytes=int(a.prompt_cache_gb * (1 << 30)),
        prompt_cache_size=a.prompt_cache_size,
        generation_kwargs={"mtp": mtp, "num_draft": a.num_draft},
    )
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)


if __name__ == "__main__":
    main()
