"""Continuous batching: concurrent requests decoded together, one forward pass per step.

`BatchEngine` runs mlx-lm's `BatchGenerator` on a thread of its own. Each decode step feeds the
last token of every running sequence in one `(batch, 1)` pass over a left-padded
`BatchKVCache` (each row with its own offset, sampler, stop tokens, token budget and cancel
flag); requests join between steps, and prompts are prefilled in chunks of
`prefill_step_size` tokens, one chunk per step, between the decode passes. The prompt cache
hands each request its longest cached prefix and takes the cache back when it ends.

Greedy output equals what a request gets alone (`stream_generate`), to the bit, on float32
activations (the CPU): the MoE adds each token's experts in expert order whatever the rest of
the batch holds, and masked padding contributes exact zeros to attention. `tests/test_batch.py`
holds it.

Sampling requests draw from random streams of their own (`_OwnRandom`): a seeded request gives
the same tokens alone and in any batch, and never makes another request's draws predictable.

A failure stays inside its request: a fault while a request starts (the prompt cache, the
streamed prefill, the insertion), handles its tokens or stores its cache ends that request with
an error event, and the others go on; a failed batched pass ends the requests in it. Should the
engine's thread end anyway, every request it holds and every later one gets an error event, and
`alive` turns False. At most `max_queue` requests wait; past that `submit` raises `QueueFull`.
`close()` cancels running requests at their next step (a streamed prefill between layers).

With `mtp=True` the steps are MTP speculative ones (`mtp_batch.MTPBatchGenerator`, the same
interface): every row drafts with the MTP layer, one pass verifies all rows, and each row keeps
its own number of tokens.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .generate import Sampler
from .models import Model
from .mtp import MTPStats, make_cache
from .mtp_batch import MTPBatchGenerator
from .prefill import PrefillCancelled, prefill
from .streaming import streams_experts
from .thinking import ThinkingBudget

log = logging.getLogger("mlx_glm4moe.batch")

FAILED = "The generation failed."
STOPPED = "The engine stopped."
# Requests that may wait for a place in the batch. Each holds its prompt in memory, and at the
# default 8 decoded together the last of 64 waits for 8 whole rounds of the batch: a client
# past that is better told at once (429 / 529) to retry than left minutes in line.
MAX_QUEUE = 64


class QueueFull(Exception):
    """The waiting queue is full: the request is refused at once (HTTP 429 / 529)."""


class PromptStore(Protocol):
    """What the engine needs of a prompt cache (`chat.PromptCache`)."""

    def fetch(self, tokens: list[int]) -> tuple[list, list[int], int]: ...

    def lend(self, cache: list) -> int: ...

    def release(self, nbytes: int) -> None: ...

    def store(self, tokens: list[int], cache: list, pinned: bool = False) -> bool: ...

    def flush(self) -> None: ...


@dataclass
class Request:
    """One generation. `emit` is called on the engine's thread with, in order: a
    ``{"type": "token", "token", "text", "logprobs"}`` per generated token (the stop token
    included, with empty text), then ``{"type": "done", "finish_reason", "usage"}`` or
    ``{"type": "error", "message"}``. `finish_reason` is "stop", "length" or "cancelled";
    `usage` is ``{prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens}``:
    the prompt tokens read from the prompt cache, and those newly written to it.

    `make_sampler` is called when the request starts (an error there fails only this request).
    A sampling request draws from a random stream of its own, from `seed` when given (the same
    tokens whatever else runs), else from fresh entropy. With `top_logprobs` set (0 or more),
    each token event carries ``{"logprob": float, "top": [(token, logprob), ...]}``, else None.
    Setting `cancel` stops the request between steps. `pin_cache` keeps the request's cache
    entry ahead of plain ones (the client marked its prefix as one it sends again).
    `thinking_budget` caps the reasoning's tokens, then forces ``</think>``
    (`thinking.ThinkingBudget`).

    With `progress`, ``{"type": "prefill", "done", "total", "cached", "time_ms"}`` events come
    before the first token, as llama.cpp's `prompt_progress` counts: `total` is the prompt's
    tokens, `cached` those read from the prompt cache, `done` those in the request's cache so
    far (the cached ones included), and `time_ms` the time since it left the queue. The first
    says ``done == cached``, then one per prefill chunk (per layer in a layer-major prefill,
    where `done` counts the share of the work; MTP's is one step), and the last
    ``done == total``.
    """

    tokens: list[int]
    max_tokens: int
    emit: Callable[[dict], None]
    make_sampler: Callable[[], Sampler | None] = lambda: None
    seed: int | None = None
    top_logprobs: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    pin_cache: bool = False
    thinking_budget: int | None = None
    progress: bool = False


@dataclass
class Metrics:
    """Counters since start (`*_total`) and gauges, as `/metrics` shows them."""

    requests_total: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    decode_steps_total: int = 0
    draft_tokens_total: int = 0
    draft_accepted_total: int = 0
    batch_size: int = 0


class _OwnRandom:
    """A sampler with a random stream of its own. mlx-lm's samplers take no key: they draw from
    the thread's generator. Draw n runs with that generator set to the key of (seed, n), and
    puts it back as it was after, so this request's draws depend on nothing else in the batch,
    and no other request's draws depend on this one's seed."""

    def __init__(self, sampler: Sampler, seed: int | None) -> None:
        self.sampler, self.draws = sampler, 0
        self.seed = secrets.randbits(63) if seed is None else seed

    def __call__(self, logprobs: mx.array) -> mx.array:
        with _random_key(hash((self.seed, self.draws)) & (2**63 - 1)):
            self.draws += 1
            return self.sampler(logprobs)


@contextmanager
def _random_key(seed: int) -> Iterator[None]:
    """The thread's MLX generator at `mx.random.key(seed)` inside the block, as it was after."""
    hi, lo = mx.random.state[0].tolist()
    mx.random.seed(seed)
    try:
        yield
    finally:
        mx.random.seed(hi << 32 | lo)  # a key is its seed's two 32-bit halves


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@dataclass
class _Running:
    request: Request
    prompt_tokens: int
    cached: int
    detokenizer: Any
    sampler: Sampler
    lent: int = 0  # bytes of the prompt cache's copy, counted against its cap until released
    generated: int = 0
    failed: str | None = None
    stored: bool = False
    started: float = field(default_factory=time.perf_counter)

    def progress(self, done: int) -> None:
        """A ``prefill`` event with `done` of the prompt's tokens in, if the request asked."""
        if self.request.progress:
            ms = round((time.perf_counter() - self.started) * 1000)
            total, cached = self.prompt_tokens, self.cached
            event = {"type": "prefill", "done": done, "total": total, "cached": cached}
            self.request.emit({**event, "time_ms": ms})

    def done(self, finish: str) -> dict:
        created = self.prompt_tokens - self.cached if self.stored else 0
        return _done(finish, self.prompt_tokens, self.generated, self.cached, created)


class BatchEngine:
    """Continuous batching over `model` on a thread of its own (see the module docstring).

    Args:
        decode_concurrency: the most sequences decoded together; more requests wait.
        prompt_concurrency: the most prompts prefilled together in one chunked pass.
        prefill_step_size: prompt tokens per sequence per step.
        prompt_cache: a `chat.PromptCache` (or None).
        mtp, num_draft: MTP speculative decoding, `num_draft` tokens drafted per row and step
            (mtp None: when the model has the layer).
        max_queue: the most requests waiting to start; `submit` refuses more.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: TokenizerWrapper,
        *,
        decode_concurrency: int = 8,
        prompt_concurrency: int = 1,
        prefill_step_size: int = 512,
        prompt_cache: PromptStore | None = None,
        mtp: bool | None = False,
        num_draft: int = 1,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = min(prompt_concurrency, self.decode_concurrency)
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache
        self.mtp = model.mtp is not None if mtp is None else mtp
        self.num_draft = num_draft
        self.mtp_stats = MTPStats(num_draft)
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._stops = StopSequences([[t] for t in tokenizer.eos_token_ids])
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._running: dict[int, _Running] = {}
        self._starting: Request | None = None  # taken from the queue, not yet running or ended
        # Guards what `submit` shares with the engine's thread: the count of requests not yet
        # started (in the inbox or waiting) and whether the engine still takes requests.
        self._lock = threading.Lock()
        self._queued = 0
        self._stopped = False
        self._stopping = threading.Event()  # set by close(): running requests end now
        self._closed = False
        # Lazily loaded weights belong to the loading thread's MLX stream; read them here, on
        # the caller's thread, before the engine's thread uses them.
        mx.eval(model.parameters())
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The engine's thread runs and takes requests (not closed, not crashed)."""
        return not self._stopped and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue `request`; its events arrive through `request.emit`. Raises `QueueFull` when
        `max_queue` requests are waiting already. A request submitted once the engine has
        stopped gets its error event at once."""
        with self._lock:
            if not self._stopped:
                if self._queued >= self.max_queue:
                    raise QueueFull(f"{self._queued} requests are waiting")
                self._queued += 1
                self.metrics.requests_total += 1
                self.metrics.requests_waiting = self._queued
                self._inbox.put(request)
                return
        _emit(request, {"type": "error", "message": STOPPED})

    def close(self) -> None:
        """Stop the engine thread (running requests end as cancelled at their next step,
        waiting ones at once) and flush the prompt cache (to its folder, when it has one)."""
        with self._lock:
            self._stopped = True
            self._inbox.put(None)
        self._stopping.set()
        self._thread.join()

    # -- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:
            # A bug outside every request's guard: nothing here can go on, but nobody waits.
            log.exception("the batch engine stopped")
            with self._lock:
                self._stopped = True
            self._end_all(lambda _: {"type": "error", "message": STOPPED})
            return
        self._end_all(lambda tokens: _done("cancelled", tokens))
        if self.prompt_cache is not None:
            # Here: the caches' arrays belong to this thread's MLX stream.
            self.prompt_cache.flush()

    def _serve(self) -> None:
        generator = self._new_generator()
        while True:
            self._receive(block=not self._running and not self._waiting)
            if self._closed:
                return
            self._admit(generator)
            if not self._running:
                continue
            try:
                self._cancel(generator)
                self._step(generator)
            except Exception:
                # The pass itself failed: every sequence in it is lost.
                log.exception("batched generation failed")
                for uid in list(self._running):
                    self._finish(uid, error=FAILED)
                generator = self._new_generator()

    def _end_all(self, event: Callable[[int], dict]) -> None:
        """End every request the engine holds with `event(prompt_tokens)`."""
        if self._starting is not None:
            _emit(self._starting, event(len(self._starting.tokens)))
            self._starting = None
        for uid in list(self._running):
            state = self._running.pop(uid)
            self._release(state)
            _emit(state.request, event(state.prompt_tokens))
        self.metrics.requests_running = self.metrics.batch_size = 0
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                self._waiting.append(request)
        while self._waiting:
            request = self._take()
            _emit(request, event(len(request.tokens)))

    def _new_generator(self) -> BatchGenerator | MTPBatchGenerator:
        if self.mtp:
            return MTPBatchGenerator(
                self.model,
                num_draft=self.num_draft,
                prefill_batch_size=self.prompt_concurrency,
                prefill_step_size=self.prefill_step_size,
                stats=self.mtp_stats,
            )
        return BatchGenerator(
            self.model,
            sampler=_greedy,
            completion_batch_size=self.decode_concurrency,
            prefill_batch_size=self.prompt_concurrency,
            prefill_step_size=self.prefill_step_size,
        )

    def _receive(self, block: bool) -> None:
        while True:
            try:
                request = self._inbox.get(block=block)
            except queue.Empty:
                break
            if request is None:
                self._closed = True
                break
            self._waiting.append(request)
            block = False

    def _take(self) -> Request:
        """The next waiting request, no longer counted as waiting."""
        with self._lock:
            self._queued -= 1
            self.metrics.requests_waiting = self._queued
        return self._waiting.popleft()

    def _start(self, request: Request) -> tuple[list, list[int], _Running] | None:
        """The request's cache, the tokens still to feed and its state; None if it was
        cancelled. Raises what the sampler or the prompt cache raises."""
        if request.cancel.is_set():
            _emit(request, _done("cancelled", len(request.tokens)))
            return None
        sampler = request.make_sampler()
        sampler = _greedy if sampler is None else _OwnRandom(sampler, request.seed)
        if request.thinking_budget is not None:
            sampler = ThinkingBudget(
                sampler, request.thinking_budget, self.tokenizer, request.tokens
            )
        lent = 0
        if self.prompt_cache is not None:
            cache, rest, cached = self.prompt_cache.fetch(request.tokens)
            lent = self.prompt_cache.lend(cache)
        else:
            cache, rest, cached = make_cache(self.model, self.mtp), list(request.tokens), 0
        self.metrics.prompt_tokens_total += len(rest)
        detokenizer = self.tokenizer.detokenizer
        state = _Running(request, len(request.tokens), cached, detokenizer, sampler, lent)
        return cache, rest, state

    def _admit(self, generator: BatchGenerator) -> None:
        while self._waiting and len(self._running) < self.decode_concurrency:
            request = self._starting = self._take()
            try:
                self._join(generator, request)
            except PrefillCancelled:
                _emit(request, _done("cancelled", len(request.tokens)))
            except Exception:
                log.exception("a request failed to start")
                _emit(request, {"type": "error", "message": FAILED})
            self._starting = None
        self.metrics.requests_running = len(self._running)

    def _join(self, generator: BatchGenerator, request: Request) -> None:
        """Start `request` in the batch (its prefill first when the model streams experts)."""
        started = self._start(request)
        if started is None:
            return
        cache, rest, state = started
        try:
            state.progress(state.cached)
            if streams_experts(self.model) and len(rest) > 1 and not self.mtp:
                # Layer by layer, reading each streamed expert once, not once per chunk; the
                # running sequences wait for it. (MTP's prefill does so itself, with the MTP
                # layer's part.)
                prefill(
                    self.model,
                    mx.array(rest[:-1]),
                    cache,
                    self.prefill_step_size,
                    cancel=lambda: request.cancel.is_set() or self._stopping.is_set(),
                    progress=lambda n: state.progress(state.prompt_tokens - len(rest) + n),
                )
                rest = rest[-1:]

            def sample(logprobs: mx.array, state: _Running = state) -> mx.array:
                # A failing sampler fails its own request; the step goes on with a stand-in.
                try:
                    return state.sampler(logprobs).reshape(-1)
                except Exception as e:
                    log.exception("sampling failed")
                    state.failed = str(e) or type(e).__name__
                    return _greedy(logprobs).reshape(-1)

            [uid] = generator.insert(
                [rest],
                max_tokens=[request.max_tokens],
                caches=[cache],
                all_tokens=[request.tokens[: len(request.tokens) - len(rest)]],
                samplers=[sample if state.sampler is not _greedy else None],
                stop_sequences=[self._stops],
            )
        except BaseException:
            self._release(state)
            raise
        self._running[uid] = state

    def _cancel(self, generator: BatchGenerator) -> None:
        gone = [uid for uid, s in self._running.items() if s.request.cancel.is_set()]
        if gone:
            for uid, (cache, tokens) in generator.remove(gone, return_prompt_caches=True).items():
                try:
                    self._store(self._running[uid], tokens, cache)
                except Exception:
                    log.exception("a cancelled request's cache could not be stored")
                self._finish(uid, "cancelled")

    def _step(self, generator: BatchGenerator) -> None:
        """One batched pass; each token to its request (a fault there fails only that one)."""
        prompts, responses = generator.next()
        for p in prompts:
            # mlx-lm counts (tokens fed, tokens to feed) of what `insert` was given.
            if (state := self._running.get(p.uid)) is not None and not state.failed:
                try:
                    state.progress(state.prompt_tokens - p.progress[1] + p.progress[0])
                except Exception as e:
                    log.exception("a prefill event could not be handled")
                    state.failed = str(e) or type(e).__name__
        if responses:
            self.metrics.decode_steps_total += 1
            self.metrics.batch_size = len({r.uid for r in responses})
            self.metrics.draft_tokens_total = sum(self.mtp_stats.drafted)
            self.metrics.draft_accepted_total = sum(self.mtp_stats.accepted)
        for r in responses:
            try:
                self._on_token(r)
            except Exception as e:
                log.exception("a token could not be handled")
                if (state := self._running.get(r.uid)) is not None:
                    state.failed = str(e) or type(e).__name__
        failed = [uid for uid, s in self._running.items() if s.failed]
        if failed:
            generator.remove(failed)
            for uid in failed:
                self._finish(uid, error=FAILED)

    def _on_token(self, r: Any) -> None:
        state = self._running[r.uid]
        if state.failed:
            return
        state.generated += 1
        self.metrics.generation_tokens_total += 1
        finish = r.finish_reason
        if finish != "stop":
            state.detokenizer.add_token(r.token)
        if finish:
            state.detokenizer.finalize()
        state.request.emit(
            {
                "type": "token",
                "token": r.token,
                "text": state.detokenizer.last_segment,
                "logprobs": _logprobs(r.logprobs, r.token, state.request.top_logprobs),
            }
        )
        if finish:
            self._store(state, r.all_tokens, r.prompt_cache)
            self._finish(r.uid, finish)

    def _store(self, state: _Running, tokens: list[int], cache: list) -> None:
        if self.prompt_cache is not None and tokens:
            self._release(state)  # the copy comes back as this entry, counted as one
            state.stored = self.prompt_cache.store(tokens, cache, state.request.pin_cache)

    def _release(self, state: _Running) -> None:
        if state.lent:
            lent, state.lent = state.lent, 0
            self.prompt_cache.release(lent)

    def _finish(self, uid: int, finish: str | None = None, error: str | None = None) -> None:
        state = self._running.pop(uid)
        self._release(state)
        if error:
            _emit(state.request, {"type": "error", "message": error})
        else:
            _emit(state.request, state.done(finish))
        self.metrics.requests_running = len(self._running)
        if not self._running:
            self.metrics.batch_size = 0


def _emit(request: Request, event: dict) -> None:
    """A request's last event. A failing `emit` (the receiving side's fault) is logged: there
    is nothing more to tell that request, and the engine goes on."""
    try:
        request.emit(event)
    except Exception:
        log.exception("a request's emit failed")


def _done(
    finish: str, prompt_tokens: int, generated: int = 0, cached: int = 0, created: int = 0
) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated}
    usage |= {"cached_tokens": cached, "cache_creation_tokens": created}
    return {"type": "done", "finish_reason": finish, "usage": usage}


def _logprobs(logprobs: mx.array, token: int, top: int | None) -> dict | None:
    """The chosen token's log-probability and the `top` most likely tokens', as Python."""
    if top is None:
        return None
    logprobs = logprobs.reshape(-1)
    best = mx.argsort(-logprobs)[:top] if top else mx.array([], dtype=mx.uint32)
    values = logprobs[best].tolist()
    return {"logprob": logprobs[token].item(), "top": list(zip(best.tolist(), values, strict=True))}
