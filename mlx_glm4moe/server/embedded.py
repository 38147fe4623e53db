"""`Server`: the server inside your own program, on a thread of its own, on a loopback port or a
Unix socket, with the lifecycle of the command line's (`lifecycle`)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..loading import load
from ..models import Model
from ..progress import Progress
from . import lifecycle
from .app import create_app


class Server:
    """The OpenAI- and Anthropic-compatible server, started in this process.

    ``with Server("path/to/model") as server: httpx.get(f"{server.url}/health")``

    Args:
        model: a model folder or Hugging Face repo (None: the bundled demo), loaded on a worker
            thread when the server starts (and again after an unload); or a `Model` already
            loaded, with its `tokenizer`, from the thread that creates the `Server` (never
            unloaded).
        host, port: where to listen (port 0: a free one); or `uds`, a Unix socket path.
        shutdown_grace: seconds `stop` gives the requests in flight by default.
        progress: the load's progress callback (`load`).
        app_options: `create_app`'s other arguments (`keep_alive`, `api_key`, `max_tokens`, ...).

    Attributes:
        url: ``http://127.0.0.1:PORT`` or ``unix:PATH``, once `start` has bound it (before the
            model has loaded).
        app: the FastAPI app.
    """

    def __init__(
        self,
        model: str | Path | Model | None = None,
        tokenizer: TokenizerWrapper | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        uds: str | Path | None = None,
        shutdown_grace: float = 10.0,
        progress: Progress | None = None,
        log_level: str = "warning",
        **app_options: Any,
    ) -> None:
        if isinstance(model, Model):
            self.app = create_app(model, tokenizer, **app_options)
        else:
            self.app = create_app(loader=lambda: load(model, progress=progress), **app_options)
        self._where = (host, port, None if uds is None else str(uds))
        self._server = lifecycle.Supervised(self.app, shutdown_grace, log_level)
        self.url: str | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Server:
        """Listen, load the model and return once it answers (a `Server` starts once). Raises
        RuntimeError when it cannot load (the reason is in the log and in `/health`'s
        "error")."""
        sock = lifecycle.listen(*self._where)
        self.url = lifecycle.url(sock)
        run = self._server.run_until_stopped(sock, self._ready.set)
        thread = threading.Thread(target=asyncio.run, args=(run,), name="server", daemon=True)
        self._thread = thread
        thread.start()
        while not self._ready.wait(0.05):
            if not thread.is_alive():
                error = self.app.state.engine.error
                raise RuntimeError(f"the server did not start: {error}")
        return self

    def stop(self, grace: float | None = None) -> None:
        """Refuse new requests, give those in flight `grace` seconds (default:
        `shutdown_grace`), end the rest with an error and return once the server is down."""
        if self._thread is None:
            return
        self._server.stop(self._server.grace if grace is None else grace)
        self._thread.join()
        self._thread = None
        if self._where[2] is not None:
            Path(self._where[2]).unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
