"""The model in memory only while it is wanted: loaded in the background or on demand (one load
for the requests that arrive together), dropped after `keep_alive` seconds idle or on request
(weights, caches and MLX's buffer cache all given back), and drained on shutdown.

`ResidentEngine` is the `core.Engine` the routes hold, kept as one object across loads: each
load builds the engine's parts in place, each unload deletes them. A request holds a lease on the
loaded model from the `acquire` dependency to the end of its answer (`Leases`, the ASGI
middleware), so a model in use is never unloaded under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from fastapi import Request
from mlx_lm.tokenizer_utils import TokenizerWrapper
from starlette.types import ASGIApp, Receive, Scope, Send

from ..batch import Metrics
from ..chat import PromptCache
from ..models import Model
from .core import APIError, Engine, Job

log = logging.getLogger(__name__)
Loader = Callable[[], tuple[Model, TokenizerWrapper]]
_LEASE = "glm4moe.lease"  # the scope key of a request's lease holder


class ResidentEngine(Engine):
    """An `Engine` whose model is loaded and unloaded while the server runs.

    Args:
        loader: loads the model and tokenizer (on a worker thread, which then also reads the
            weights: MLX arrays belong to the thread that evaluates them first). None: only
            `model` and `tokenizer` given here, never unloaded.
        model, tokenizer: already loaded (in the calling thread), or None to start unloaded.
        prompt_cache: builds a prompt cache for a freshly loaded model (None: no cache).
        keep_alive: seconds idle before an unload; 0 unloads after each request, None never.
        engine_kwargs: the rest of `core.Engine`'s arguments.
    """

    def __init__(
        self,
        loader: Loader | None,
        *,
        model: Model | None = None,
        tokenizer: TokenizerWrapper | None = None,
        prompt_cache: Callable[[Model], PromptCache | None] = lambda model: None,
        keep_alive: float | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self._loader, self._prompt_cache = loader, prompt_cache
        self._engine_kwargs = engine_kwargs
        self.keep_alive = keep_alive
        self.metrics = Metrics()  # counts across loads
        self.state = "unloaded"  # "loading", "ok", "unloaded" or "stopping"
        self.loads = 0
        self.error: str | None = None  # why the last load failed
        self._parts: set[str] = set()  # the attributes a load sets, deleted by an unload
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._jobs: dict[int, Job] = {}
        if model is not None:
            self._attach(model, tokenizer)
            self.state = "ok"

    @property
    def loaded(self) -> bool:
        return bool(self._parts)

    # -- loading and unloading --------------------------------------------------------------

    async def load(self) -> None:
        """Load the model unless it is loaded; callers that come while it loads wait for that
        one load. Raises `APIError` (503) when loading fails or the server is stopping."""
        async with self._lock:
            if self.loaded:
                return
            if self.state == "stopping":
                raise APIError(503, "The server is shutting down.", type="server_error")
            if self._loader is None:
                raise APIError(409, "This server was given its model and cannot load it again.")
            self.state = "loading"
            try:
                await _on_daemon_thread(self._load)
            except Exception as e:
                self.error = str(e) or type(e).__name__
                self._settle("unloaded")
                log.exception("loading the model failed")
                raise APIError(
                    503, f"The model could not be loaded: {e}", type="server_error"
                ) from None
            self.error = None
            self._settle("ok")
        self._arm_timer()

    async def unload(self, wait: bool = True) -> bool:
        """Drop the model and its caches and give MLX's buffers back, once the requests in
        flight are answered (`wait`; else only if none are). Requests that come meanwhile
        wait and load it again. Returns whether it was unloaded."""
        async with self._lock:
            if self._loader is None:
                raise APIError(409, "This server was given its model: it cannot unload it.")
            if not self.loaded or (self._leases and not wait):
                return False
            await self._idle.wait()
            await asyncio.to_thread(self._detach)
            self._settle("unloaded")
        return True

    def _settle(self, state: str) -> None:
        """The state after a load or unload, unless the server began stopping meanwhile."""
        if self.state != "stopping":
            self.state = state

    def _load(self) -> None:
        model, tokenizer = self._loader()
        self._attach(model, tokenizer)

    def _attach(self, model: Model, tokenizer: TokenizerWrapper) -> None:
        before = set(vars(self))
        prompt_cache = self._prompt_cache(model)
        Engine.__init__(self, model, tokenizer, prompt_cache=prompt_cache, **self._engine_kwargs)
        # The new engine thread touches its metrics only once a request comes.
        self.batch.metrics = self.metrics
        self._parts = set(vars(self)) - before
        self.loads += 1

    def _detach(self) -> None:
        self.batch.close()  # writes the prompt cache to its folder, when it has one
        for name in self._parts:
            delattr(self, name)
        self._parts = set()
        gc.collect()
        mx.clear_cache()

    # -- requests -----------------------------------------------------------------------------

    async def acquire(self, request: Request) -> None:
        """FastAPI dependency of the routes that use the model: load it if needed and hold it
        until the answer is sent (the `Leases` middleware lets go)."""
        await self.load()
        # No await since the load: an unload cannot have come between.
        self._leases += 1
        self._idle.clear()
        self._disarm_timer()
        request.scope[_LEASE].append(self)

    def release(self) -> None:
        self._leases -= 1
        if not self._leases:
            self._idle.set()
            self._arm_timer()

    def submit(self, job: Job) -> None:
        # Known until its last event, so that a shutdown can end it with an error.
        self._jobs[id(job)] = job
        emit = job.emit

        def emit_and_forget(event: dict) -> None:
            emit(event)
            if event["type"] != "token":
                self._jobs.pop(id(job), None)

        job.emit = emit_and_forget
        super().submit(job)

    # -- shutdown -----------------------------------------------------------------------------

    def stop_admitting(self) -> None:
        """From now on, new requests are refused (503); callable from any thread."""
        self.state = "stopping"

    async def drain(self, grace: float) -> None:
        """Refuse new requests (503), give the ones in flight `grace` seconds, then end the
        rest with an error in their API's shape."""
        self.stop_admitting()
        self._disarm_timer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._jobs:
            log.warning("cancelling %d requests still running after %gs", len(self._jobs), grace)
        for job in list(self._jobs.values()):
            job.emit({"type": "error", "message": "The server shut down before the answer ended."})
            job.cancel.set()

    async def close(self) -> None:
        """Stop the engine thread, writing the prompt cache out (the app's shutdown)."""
        self.state = "stopping"
        self._disarm_timer()
        if self.loaded:
            await asyncio.to_thread(self.batch.close)

    # -- keep-alive ---------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        self._disarm_timer()
        if self.keep_alive is None or self._loader is None or self._leases:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            self.keep_alive, lambda: loop.create_task(self.unload(wait=False))
        )

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _on_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """`fn()` on a thread of its own that does not hold the process up at its end (a server
    stopped while it loads exits without waiting for the load)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: the server stopped meanwhile
            pass

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return future


class Leases:
    """ASGI middleware for ``/v1/*``: refuses requests (503) once the server stops admitting,
    and lets go of a request's lease on the model when its answer has been sent (streams
    included)."""

    def __init__(self, app: ASGIApp, engine: ResidentEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.engine.state == "stopping":
            error = APIError(503, "The server is shutting down.", type="server_error")
            response = error.response(scope["path"].startswith("/v1/messages"))
            return await response(scope, receive, send)
        holder: list[ResidentEngine] = []
        scope[_LEASE] = holder
        try:
            await self.app(scope, receive, send)
        finally:
            for engine in holder:
                engine.release()
