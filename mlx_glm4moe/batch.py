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

With `mtp=True` the steps are MTP speculative ones (`mtp_batch.MTPBatchGenerator`, the same
interface): every row drafts with the MTP layer, one pass verifies all rows, and each row keeps
its own number of tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .generate import Sampler
from .models import Model
from .mtp import MTPStats, make_cache
from .mtp_batch import MTPBatchGenerator
from .prefill import prefill
from .streaming import streams_experts
from .thinking import ThinkingBudget

log = logging.getLogger("mlx_glm4moe.batch")


class PromptStore(Protocol):
    """What the engine needs of a prompt cache (`chat.PromptCache`)."""

    def fetch(self, tokens: list[int]) -> tuple[list, list[int], int]: ...

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
    With `top_logprobs` set (0 or more), each token event carries
    ``{"logprob": float, "top": [(token, logprob), ...]}``, else None. Setting `cancel` stops
    the request between steps. `pin_cache` keeps the request's cache entry ahead of plain
    ones (the client marked its prefix as one it sends again). `thinking_budget` caps the
    reasoning's tokens, then forces ``</think>`` (`thinking.ThinkingBudget`).
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


class _Seeded:
    """A sampler with a random stream of its own: draw n reseeds MLX's global generator from
    (seed, n), so a seeded request draws the same tokens whatever else runs in the batch."""

    def __init__(self, sampler: Sampler, seed: int) -> None:
        self.sampler, self.seed, self.draws = sampler, seed, 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        mx.random.seed(hash((self.seed, self.draws)) & (2**63 - 1))
        self.draws += 1
        return self.sampler(logprobs)


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@dataclass
class _Running:
    request: Request
    prompt_tokens: int
    cached: int
    detokenizer: Any
    sampler: Sampler
    generated: int = 0
    failed: str | None = None
    stored: bool = False

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
        mtp, num_draft: MTP speculative decoding, `num_draft` tokens drafted per row and step.
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
        mtp: bool = False,
        num_draft: int = 1,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = min(prompt_concurrency, self.decode_concurrency)
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache
        self.mtp, self.num_draft = mtp, num_draft
        self.mtp_stats = MTPStats(num_draft)
        self.metrics = Metrics()
        self._stops = StopSequences([[t] for t in tokenizer.eos_token_ids])
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()
        self._running: dict[int, _Running] = {}
        self._closed = False
        # Lazily loaded weights belong to the loading thread's MLX stream; read them here, on
        # the caller's thread, before the engine's thread uses them.
        mx.eval(model.parameters())
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue `request`; its events arrive through `request.emit`."""
        self.metrics.requests_total += 1
        self._inbox.put(request)

    def close(self) -> None:
        """Stop the engine thread (running requests end as cancelled) and flush the prompt
        cache (to its folder, when it has one)."""
        self._inbox.put(None)
        self._thread.join()

    # -- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        generator = self._new_generator()
        while not self._closed:
            self._receive(block=not self._running and not self._waiting)
            self._admit(generator)
            self._cancel(generator)
            if not self._running:
                continue
            try:
                _, responses = generator.next()
            except Exception:
                # The pass itself failed: every sequence in it is lost.
                log.exception("batched generation failed")
                for uid in list(self._running):
                    self._finish(uid, error="The generation failed.")
                generator = self._new_generator()
                continue
            if responses:
                self.metrics.decode_steps_total += 1
                self.metrics.batch_size = len({r.uid for r in responses})
                self.metrics.draft_tokens_total = sum(self.mtp_stats.drafted)
                self.metrics.draft_accepted_total = sum(self.mtp_stats.accepted)
            for r in responses:
                self._on_token(r)
            self._drop_failed(generator)
        for uid in list(self._running):
            self._finish(uid, "cancelled")
        for request in self._waiting:
            request.emit(_done("cancelled", len(request.tokens)))
        if self.prompt_cache is not None:
            # Here: the caches' arrays belong to this thread's MLX stream.
            self.prompt_cache.flush()

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
        self.metrics.requests_waiting = len(self._waiting)

    def _start(self, request: Request) -> tuple[list, list[int], _Running] | None:
        """The request's cache, the tokens still to feed and its state; None if it ended."""
        if request.cancel.is_set():
            request.emit(_done("cancelled", len(request.tokens)))
            return None
        try:
            sampler = request.make_sampler() or _greedy
            if request.thinking_budget is not None:
                sampler = ThinkingBudget(
                    sampler, request.thinking_budget, self.tokenizer, request.tokens
                )
        except Exception:
            log.exception("the sampler could not be made")
            request.emit({"type": "error", "message": "The generation failed."})
            return None
        if request.seed is not None:
            sampler = _Seeded(sampler, request.seed)
        if self.prompt_cache is not None:
            cache, rest, cached = self.prompt_cache.fetch(request.tokens)
        else:
            cache, rest, cached = make_cache(self.model, self.mtp), list(request.tokens), 0
        self.metrics.prompt_tokens_total += len(rest)
        state = _Running(request, len(request.tokens), cached, self.tokenizer.detokenizer, sampler)
        return cache, rest, state

    def _admit(self, generator: BatchGenerator) -> None:
        while self._waiting and len(self._running) < self.decode_concurrency:
            started = self._start(self._waiting.popleft())
            if started is None:
                continue
            cache, rest, state = started
            if streams_experts(self.model) and len(rest) > 1 and not self.mtp:
                # Layer by layer, reading each streamed expert once, not once per chunk; the
                # running sequences wait for it.
                # (MTP's prefill does so itself, with the MTP layer's part.)
                prefill(self.model, mx.array(rest[:-1]), cache, self.prefill_step_size)
                rest = rest[-1:]
            sampler = state.sampler

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
                max_tokens=[state.request.max_tokens],
                caches=[cache],
                all_tokens=[state.request.tokens[: len(state.request.tokens) - len(rest)]],
                samplers=[sample if sampler is not _greedy else None],
                stop_sequences=[self._stops],
            )
            self._running[uid] = state
        self.metrics.requests_waiting = len(self._waiting)
        self.metrics.requests_running = len(self._running)

    def _cancel(self, generator: BatchGenerator) -> None:
        gone = [uid for uid, s in self._running.items() if s.request.cancel.is_set()]
        if gone:
            for uid, (cache, tokens) in generator.remove(gone, return_prompt_caches=True).items():
                self._store(self._running[uid], tokens, cache)
                self._finish(uid, "cancelled")

    def _drop_failed(self, generator: BatchGenerator) -> None:
        failed = [uid for uid, s in self._running.items() if s.failed]
        if failed:
            generator.remove(failed)
            for uid in failed:
                self._finish(uid, error="The generation failed.")

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
            state.stored = self.prompt_cache.store(tokens, cache, state.request.pin_cache)

    def _finish(self, uid: int, finish: str | None = None, error: str | None = None) -> None:
        state = self._running.pop(uid)
        if error:
            state.request.emit({"type": "error", "message": error})
        else:
            state.request.emit(state.done(finish))
        self.metrics.requests_running = len(self._running)
        if not self._running:
            self.metrics.batch_size = 0


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
