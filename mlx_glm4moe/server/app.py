"""The app: the API modules' routes under ``/v1`` behind the key check, error bodies in each
API's shape, ``/health`` and ``/metrics``; and the ``glm4moe-server`` command line.

Generation runs on the continuous-batching engine (`batch.py`): concurrent requests decode
together, one forward pass per step, and new ones join between steps. A client that goes away
sets its request's cancel event, which ends its generation at the next step. A prompt cache
shared by the requests reuses the longest cached prefix of each new prompt.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from mlx_lm.tokenizer_utils import TokenizerWrapper
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import PromptCache
from ..models import Model
from . import anthropic, lifecycle, memory, openai, responses
from .core import APIError, SamplerFactory
from .residency import Leases, ResidentEngine

# -- metrics ------------------------------------------------------------------------------------

METRICS = {
    "requests_total": ("counter", "Requests received."),
    "requests_running": ("gauge", "Requests being prefilled or decoded."),
    "requests_waiting": ("gauge", "Requests waiting for a decode slot."),
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled (cached prefixes not counted)."),
    "generation_tokens_total": ("counter", "Tokens generated."),
    "decode_steps_total": (
        "counter",
        "Forward passes of the decode loop (one per batched step; with MTP, the verify passes).",
    ),
    "draft_tokens_total": ("counter", "Tokens drafted by the MTP layer."),
    "draft_accepted_total": ("counter", "Drafted tokens the main model accepted."),
    "batch_size": ("gauge", "Sequences in the latest decode step."),
}


MEMORY_METRICS = {
    "active": "Bytes of MLX arrays in use.",
    "cache": "Bytes MLX keeps in its buffer cache.",
    "peak": "Most bytes of MLX arrays in use at once.",
}


def metrics_text(metrics: Any) -> str:
    """The engine's metrics and MLX's memory in Prometheus' text format."""
    lines = []
    for name, (kind, help) in METRICS.items():
        lines += [
            f"# HELP glm4moe_{name} {help}",
            f"# TYPE glm4moe_{name} {kind}",
            f"glm4moe_{name} {getattr(metrics, name)}",
        ]
    for name, value in memory.figures().items():
        lines += [
            f"# HELP glm4moe_mlx_{name}_memory_bytes {MEMORY_METRICS[name]}",
            f"# TYPE glm4moe_mlx_{name}_memory_bytes gauge",
            f"glm4moe_mlx_{name}_memory_bytes {value}",
        ]
    return "\n".join(lines) + "\n"


# -- the app ------------------------------------------------------------------------------------


def create_app(
    model: Model | None = None,
    tokenizer: TokenizerWrapper | None = None,
    *,
    loader: Callable[[], tuple[Model, TokenizerWrapper]] | None = None,
    keep_alive: float | None = None,
    model_id: str = "glm4moe",
    api_key: str | None = None,
    max_tokens: int = 512,
    sampling: dict[str, Any] | None = None,
    prompt_cache_bytes: int = 4 << 30,
    prompt_cache_size: int = 8,
    prompt_cache_dir: str | Path | None = None,
    prompt_cache_disk_bytes: int = 32 << 30,
    sampler_factory: SamplerFactory | None = None,
    decode_concurrency: int = 8,
    prompt_concurrency: int = 1,
    prefill_step_size: int = 512,
    mtp: bool | None = False,
    num_draft: int = 1,
    max_queue: int = 64,
    thinking_budget: int | None = None,
) -> FastAPI:
    """The server as an ASGI app (serve it with uvicorn).

    Args:
        model, tokenizer: from `load`; call this in the thread that loaded them. Or None,
            with a `loader`: the app then starts unloaded (`/health` says "unloaded") and
            loads on the first request, on `POST /v1/load` or when `lifecycle.run` starts it.
        loader: loads the model and tokenizer (on a worker thread), as often as it is
            unloaded: after `keep_alive` seconds idle (0: after each request; None: never) or
            on `POST /v1/unload`. See `residency.ResidentEngine`.
        model_id: the name `/v1/models` lists and responses carry.
        api_key: when set, `/v1/*` requires ``Authorization: Bearer <api_key>`` or
            ``x-api-key: <api_key>``.
        max_tokens: the completion length when a chat request gives none (capped by the
            context).
        sampling: default temp, top_p, top_k, min_p for requests that give none.
        prompt_cache_bytes, prompt_cache_size: the prompt cache's caps (bytes, entries);
            0 bytes turns it off.
        prompt_cache_dir, prompt_cache_disk_bytes: keep evicted entries, and all of them at
            shutdown, in this folder, within this many bytes (`chat.PromptCache`).
        sampler_factory: builds a job's sampler (None = the usual one from its fields): a seam
            for scripted output in tests and for custom sampling. Called on the engine thread.
        decode_concurrency, prompt_concurrency, prefill_step_size: the batching engine's
            limits (`batch.BatchEngine`).
        mtp, num_draft: MTP speculative decoding in the batched steps (`mtp_batch`); mtp None:
            when the loaded checkpoint has the layer.
        max_queue: the most requests waiting to start; more are refused at once (429, 529 on
            the Anthropic routes).
        thinking_budget: the most reasoning tokens of requests that set no budget (None: no
            cap; `thinking.py`).
    """
    if (model is None) != (tokenizer is None) or (model is None and loader is None):
        raise ValueError("create_app needs a model and its tokenizer, or a loader, or both")

    def prompt_cache(loaded: Model) -> PromptCache | None:
        if prompt_cache_bytes <= 0:
            return None
        return PromptCache(
            loaded,
            prompt_cache_bytes,
            prompt_cache_size,
            mtp=loaded.mtp is not None if mtp is None else mtp,
            directory=prompt_cache_dir,
            max_disk_bytes=prompt_cache_disk_bytes,
        )

    engine = ResidentEngine(
        loader,
        model=model,
        tokenizer=tokenizer,
        prompt_cache=prompt_cache,
        keep_alive=keep_alive,
        max_tokens=max_tokens,
        sampling=sampling,
        sampler_factory=sampler_factory,
        thinking_budget=thinking_budget,
        batch_kwargs={
            "decode_concurrency": decode_concurrency,
            "prompt_concurrency": prompt_concurrency,
            "prefill_step_size": prefill_step_size,
            "mtp": mtp,
            "num_draft": num_draft,
            "max_queue": max_queue,
        },
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.close()  # also writes the prompt cache out

    app = FastAPI(
        title="mlx-glm4moe", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.engine = engine
    app.add_middleware(Leases, engine=engine)
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
    # The routes that use the model hold it (loading it first) until they have answered.
    uses_model = APIRouter(dependencies=[Depends(engine.acquire)])

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
    async def health() -> JSONResponse:
        # "ok" and "unloaded" answer requests (the latter after a load); "loading", "stopping"
        # and an engine whose thread died ("error") are 503s.
        body: dict[str, Any] = {"status": engine.state, "memory": memory.figures()}
        if engine.loaded:
            body |= {"engine": "alive", "queue": engine.batch.metrics.requests_waiting}
            if not engine.batch.alive:
                body |= {"status": "error", "engine": "dead"}
        if engine.error:
            body["error"] = engine.error
        return JSONResponse(body, status_code=200 if body["status"] in ("ok", "unloaded") else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = metrics_text(engine.metrics)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @v1.post("/load")
    async def load_model() -> dict:
        await engine.load()
        return {"status": engine.state, "memory": memory.figures()}

    @v1.post("/unload")
    async def unload_model() -> dict:
        await engine.unload()
        return {"status": engine.state, "memory": memory.figures()}

    @v1.get("/models")
    async def models() -> dict:
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-glm4moe"}
        return {"object": "list", "data": [entry]}

    for router in (
        openai.routes(engine, model_id),
        responses.routes(engine, model_id),
        anthropic.routes(engine),
    ):
        uses_model.include_router(router)
    v1.include_router(uses_model)
    app.include_router(v1)
    return app


def main(argv: list[str] | None = None) -> None:
    from ..loading import load
    from ..progress import ndjson
    from ..streaming import resident_bytes

    p = argparse.ArgumentParser(
        description="OpenAI- and Anthropic-compatible server for GLM-4.5 models."
    )
    p.add_argument("--model", help="Model folder or Hugging Face repo (default: bundled demo).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback).")
    p.add_argument("--port", type=int, default=8080, help="Port to bind; 0 picks a free one.")
    p.add_argument("--uds", metavar="PATH", help="Serve on this Unix socket instead of a port.")
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
        "--prompt-cache-dir",
        help="Keep prompt caches evicted from memory, and all of them at shutdown, in this folder "
        "and find them again after a restart (default: memory only).",
    )
    p.add_argument(
        "--prompt-cache-disk-gb",
        type=float,
        default=32.0,
        help="Size cap of --prompt-cache-dir (least recently used files go first).",
    )
    p.add_argument(
        "--decode-concurrency",
        type=int,
        help="Most requests decoded together in one batch (default 8).",
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
        help="MTP speculative decoding, in batched steps (default: on when the checkpoint has the "
        "layer and --decode-concurrency is 1: measured, it pays alone and loses in full batches "
        "on the CPU; see the README).",
    )
    p.add_argument("--num-draft", type=int, default=1, help="Tokens drafted per MTP step.")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="Most requests waiting to start; more get 429 (529 on /v1/messages) at once.",
    )
    p.add_argument(
        "--thinking-budget",
        type=int,
        help="Most reasoning tokens for requests that set no budget, then </think> is forced "
        "(default: no cap).",
    )
    p.add_argument(
        "--expert-slots", type=int, help="Stream routed experts from disk, N per layer in memory."
    )
    p.add_argument("--log-level", default="info")
    life = p.add_argument_group("running as an app's helper (see README: Embedding in a macOS app)")
    life.add_argument("--parent-pid", type=int, help="Stop within a second of this process's end.")
    life.add_argument(
        "--exit-on-stdin-close", action="store_true", help="Stop when stdin is closed."
    )
    life.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="Seconds that SIGTERM gives the requests in flight before cancelling them.",
    )
    life.add_argument(
        "--keep-alive",
        default="-1",
        help="Unload the model after this long idle: 5m, 30s, 1h30m; 0 = after each request; "
        "-1 = never (the default). The next request loads it again.",
    )
    life.add_argument("--memory-limit", type=float, metavar="GB", help="MLX's memory limit.")
    life.add_argument(
        "--cache-limit", type=float, metavar="GB", help="MLX's buffer cache limit (0: none kept)."
    )
    life.add_argument(
        "--wired-limit",
        default="off",
        help="Memory MLX wires on Metal: auto (the model plus headroom, leaving a quarter of "
        "RAM unwired), off (the default) or GB.",
    )
    life.add_argument(
        "--progress", choices=["json"], help="Print loading progress as NDJSON on stdout."
    )
    a = p.parse_args(argv)
    if a.max_tokens < 1:
        p.error("--max-tokens must be at least 1")
    if a.temp < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or not 0 <= a.min_p <= 1:
        p.error("need --temp >= 0, 0 < --top-p <= 1, --top-k >= 0, 0 <= --min-p <= 1")
    if a.num_draft < 1 or a.max_queue < 1:
        p.error("--num-draft and --max-queue must be at least 1")
    if a.thinking_budget is not None and a.thinking_budget < 0:
        p.error("--thinking-budget must be at least 0")
    if a.prompt_cache_gb < 0 or a.prompt_cache_size < 1 or a.prompt_cache_disk_gb < 0:
        p.error("need --prompt-cache-gb, --prompt-cache-disk-gb >= 0, --prompt-cache-size >= 1")
    try:
        keep_alive = lifecycle.parse_duration(a.keep_alive)
    except ValueError as e:
        p.error(f"--keep-alive: {e}")
    if a.wired_limit not in ("auto", "off"):
        try:
            float(a.wired_limit)
        except ValueError:
            p.error("--wired-limit takes auto, off or a number of GB")
    if a.shutdown_grace < 0:
        p.error("--shutdown-grace must be >= 0")
    decode_concurrency = a.decode_concurrency or 8
    # Measured (README, "MTP in the batch"): MTP pays alone and loses in full batches on the
    # CPU, so by default it is on only at concurrency 1, and then only when the checkpoint has
    # the layer (None: decided when the model is loaded).
    mtp = a.mtp if a.mtp is not None else (None if decode_concurrency == 1 else False)
    if min(decode_concurrency, a.prompt_concurrency, a.prefill_step_size) < 1:
        p.error("--decode-concurrency, --prompt-concurrency, --prefill-step-size must be >= 1")

    if a.api_key is None and a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {a.host} without --api-key", file=sys.stderr)
    # stdout carries the JSON events only: whatever else writes to it (a library's print, a C
    # extension) goes to stderr with the logs.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    progress = ndjson(events) if a.progress == "json" else None
    memory.set_limits(a.memory_limit, a.cache_limit)

    def loader() -> tuple[Model, TokenizerWrapper]:
        model, tokenizer = load(a.model, expert_slots=a.expert_slots, progress=progress)
        if a.mtp and model.mtp is None:
            raise ValueError("--mtp: this checkpoint has no MTP layer")
        memory.set_wired(a.wired_limit, resident_bytes(model))
        return model, tokenizer

    model_id = Path(a.model).name if a.model else "glm4moe-demo"
    try:
        sock = lifecycle.listen(a.host, a.port, a.uds)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {a.uds or f'{a.host}:{a.port}'}: {e}") from None
    app = create_app(
        loader=loader,
        keep_alive=keep_alive,
        model_id=model_id,
        api_key=a.api_key,
        max_tokens=a.max_tokens,
        sampling={"temp": a.temp, "top_p": a.top_p, "top_k": a.top_k, "min_p": a.min_p},
        prompt_cache_bytes=int(a.prompt_cache_gb * (1 << 30)),
        prompt_cache_size=a.prompt_cache_size,
        prompt_cache_dir=a.prompt_cache_dir,
        prompt_cache_disk_bytes=int(a.prompt_cache_disk_gb * (1 << 30)),
        decode_concurrency=decode_concurrency,
        prompt_concurrency=a.prompt_concurrency,
        prefill_step_size=a.prefill_step_size,
        mtp=mtp,
        num_draft=a.num_draft,
        max_queue=a.max_queue,
        thinking_budget=a.thinking_budget,
    )
    status = lifecycle.run(
        app,
        sock,
        events=events,
        ready={"version": lifecycle.version(), "model": model_id},
        grace=a.shutdown_grace,
        parent_pid=a.parent_pid,
        exit_on_stdin_close=a.exit_on_stdin_close,
        log_level=a.log_level,
    )
    if a.uds:
        Path(a.uds).unlink(missing_ok=True)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
