"""The server as an app's helper process: it listens before it loads (``/health`` says "loading"),
announces itself with one JSON line on stdout when ready, dies with its app (macOS has no
parent-death signal, so it polls) and stops cleanly on SIGTERM.

    start ─▶ listen (503 "loading") ─▶ load ─▶ {"event": "ready", ...} ─▶ serve
        ─▶ idle: unload ─▶ request: load again ─▶ ... ─▶ SIGTERM / app gone ─▶ drain ─▶ exit 0
"""

from __future__ import annotations

import asyncio
import copy
import errno
import importlib.metadata
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import uvicorn
from fastapi import FastAPI

from .core import APIError
from .residency import ResidentEngine

log = logging.getLogger(__name__)
PARENT_POLL = 0.5  # seconds between checks that the parent process lives
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float | None:
    """Seconds from Ollama's ``keep_alive``: ``"5m"``, ``"1h30m"``, ``"30s"``, a number of
    seconds, ``"0"`` (at once) or a negative number (never: None). Raises ValueError."""
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"not a duration: {text!r} (e.g. 5m, 30s, 1h30m, 0, -1)") from None
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    return None if seconds < 0 else seconds


def listen(host: str, port: int, uds: str | None = None) -> socket.socket:
    """A listening socket: on `host`:`port` (0: a free port), or on the Unix socket `uds`
    (only the user may connect)."""
    if uds is not None:
        path = Path(uds)
        if path.is_socket():
            _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def _remove_stale(path: Path) -> None:
    """Remove the Unix socket of a server that died; refuse one that a server listens on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise OSError(errno.EADDRINUSE, f"a server is listening on {path}")


def url(sock: socket.socket) -> str:
    """``http://HOST:PORT`` or ``unix:PATH`` for a socket from `listen`."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_config() -> dict[str, Any]:
    """uvicorn's logging, all of it on stderr (stdout carries the JSON events)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    return config


class Supervised(uvicorn.Server):
    """uvicorn's server, stopped our way: the first SIGTERM or SIGINT, the parent's end or
    stdin's close drains (`ResidentEngine.drain`, then exit); a second signal exits at once."""

    def __init__(self, app: FastAPI, grace: float, log_level: str = "info") -> None:
        config = uvicorn.Config(
            app, log_level=log_level, log_config=log_config(), timeout_graceful_shutdown=5
        )
        super().__init__(config)
        self.engine: ResidentEngine = app.state.engine
        self.grace = grace
        self.stop_grace: float | None = None  # set by `stop`, acted on at the next tick
        self._draining: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_grace is not None:
            os._exit(1)
        self.stop(self.grace)

    def stop(self, grace: float) -> None:
        """Drain for at most `grace` seconds, then exit; callable from any thread."""
        if self.stop_grace is None:
            self.engine.stop_admitting()
            self.stop_grace = grace

    async def on_tick(self, counter: int) -> bool:
        if self.stop_grace is not None and self._draining is None:
            self._draining = asyncio.create_task(self._drain(self.stop_grace))
        return await super().on_tick(counter)

    async def _drain(self, grace: float) -> None:
        await self.engine.drain(grace)
        self.should_exit = True

    async def run_until_stopped(
        self, sock: socket.socket, on_ready: Callable[[], None] | None = None
    ) -> int:
        """Serve on `sock`, load the model, call `on_ready`, serve until stopped. Returns the
        exit status: 0, or 1 when the model could not be loaded. A stop during the load does
        not wait for it (the loading thread is left to the process's end)."""
        serving = asyncio.create_task(self.serve(sockets=[sock]))
        while not self.started and not serving.done():
            await asyncio.sleep(0.01)
        loading = asyncio.create_task(self.engine.load())
        await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            loading.cancel()
            return 0
        status = 0
        try:
            loading.result()
        except APIError as e:
            log.error("%s", e.message)
            self.should_exit, status = True, 1
        else:
            if on_ready is not None and self.stop_grace is None:
                on_ready()
        await serving
        return status


def watch_parent(pid: int, stop: Callable[[], None]) -> None:
    """Call `stop` within `PARENT_POLL` seconds of process `pid`'s end (a daemon thread). When
    `pid` is our parent, being handed to another parent counts: a dead parent not yet reaped
    still answers signals."""
    was_parent = os.getppid() == pid

    def alive() -> bool:
        if was_parent and os.getppid() != pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            pass
        return True

    def watch() -> None:
        while alive():
            threading.Event().wait(PARENT_POLL)
        log.info("process %d ended: stopping", pid)
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def watch_stdin(stop: Callable[[], None], stdin: TextIO | None = None) -> None:
    """Call `stop` when stdin reaches its end (the parent closed its pipe, or ended)."""
    stream = (stdin or sys.stdin).buffer

    def watch() -> None:
        while stream.read(4096):
            pass
        log.info("stdin closed: stopping")
        stop()

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def version() -> str:
    """This package's version, as installed."""
    try:
        return importlib.metadata.version("mlx-glm4moe")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def announce(out: TextIO, **fields: Any) -> None:
    """One JSON event line on `out`."""
    print(json.dumps(fields), file=out, flush=True)


def run(
    app: FastAPI,
    sock: socket.socket,
    *,
    events: TextIO,
    ready: dict[str, Any],
    grace: float = 10.0,
    parent_pid: int | None = None,
    exit_on_stdin_close: bool = False,
    log_level: str = "info",
) -> int:
    """Serve `app` (from `create_app`) on `sock` until stopped (see `Supervised`); writes the
    ready event, ``{"event": "ready", "url", "pid", **ready}``, on `events` once the model is
    loaded. Returns the exit status."""
    server = Supervised(app, grace, log_level)
    if parent_pid is not None:
        watch_parent(parent_pid, lambda: server.stop(0))
    if exit_on_stdin_close:
        watch_stdin(lambda: server.stop(0))

    def on_ready() -> None:
        announce(events, event="ready", url=url(sock), pid=os.getpid(), **ready)

    return asyncio.run(server.run_until_stopped(sock, on_ready))
