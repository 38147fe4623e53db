"""MTP speculative decoding inside continuous batching.

`MTPBatchGenerator` serves the batching engine (`batch.BatchEngine`) with the interface of
mlx-lm's `BatchGenerator` that it uses (`insert`, `next`, `remove`). Each step:

1. one MTP call over every row catches up on the row's positions kept by the last step and
   drafts from its newest token; `num_draft - 1` chained calls draft the rest;
2. one main-model pass verifies every row (input `(B, 1 + num_draft)`);
3. each row draws its tokens from the main model's logits, one position at a time, with its own
   sampler, and keeps drafts while they equal the draws; the first draw that differs (or the
   one after the last draft) is the row's next token;
4. each row's caches drop what it did not keep (`rewind`), row by row.

Drafts are the MTP layer's argmax. For a deterministic draft x, the standard speculative rule
(keep x with probability min(1, p(x)/q(x)), else draw from norm(max(p - q, 0))) with q one-hot at
x is: keep x with probability p(x), else draw from p without x. Drawing y from p and keeping x
when y == x (emitting y either way) is that rule; every emitted token is one draw of the row's
sampler from the main model's distribution at its position, in order, as in plain decoding. So a
greedy row gets plain decoding's tokens, a seeded one (`batch._Seeded`, reseeded per draw) its
draws, a grammar's sampler (`constrain.ConstrainedSampler`) masks each position after advancing
over the tokens kept before it: a draft the grammar forbids has p(x) = 0 and is never kept, and
the matcher never sees a token that was not kept.

Rows join once their prompt is in: each prompt is prefilled alone (`mtp.prefill_steps`), one
chunk per step between the verify passes, and its first token drawn; the row then takes its
place in the batched caches (mlx-lm's left-padded `BatchKVCache`, for the main layers and for
the MTP layer). A catch-up call feeds every row `num_draft + 1` positions (the verify pass's
draws and hidden states); the positions past what a row kept are rewound at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences, generation_stream
from mlx_lm.models.cache import BatchKVCache, CacheList, KVCache, dynamic_roll

from .models import Model
from .mtp import CLEAR_CACHE_EVERY, MTPCache, MTPStats, prefill_steps, split_cache

Sampler = Callable[[mx.array], mx.array]


def rewind(cache: Any, counts: list[int]) -> None:
    """Drop the last `counts[b]` entries of row b of a batched cache, in place.

    A `BatchKVCache` (keys and values, or glm4_moe_lite's latent and rotary key) keeps its rows
    right-aligned under one write index: the common part is trimmed, then each row that drops
    more rolls right by the difference, its dropped entries past the write index and stale
    ones into its left padding, which the attention mask hides. A `CacheList` (caches that
    move together, e.g. an indexer's keys beside the attention's) rewinds each part.
    """
    if isinstance(cache, CacheList):
        for part in cache.caches:
            rewind(part, counts)
        return
    if not isinstance(cache, BatchKVCache):
        raise TypeError(f"{type(cache).__name__} cannot rewind row by row")
    low = min(counts)
    cache.trim(low)
    shift = [n - low for n in counts]
    if not any(shift) or cache.keys is None:
        return
    by = mx.array(shift)
    cache.keys = dynamic_roll(cache.keys, by[:, None], axis=2)
    cache.values = dynamic_roll(cache.values, by[:, None], axis=2)
    cache.offset = cache.offset - by
    cache.left_padding = cache.left_padding + by


def _extract(cache: BatchKVCache, row: int, cls: type[KVCache] = KVCache) -> KVCache:
    """Row `row` of a batched cache as a single sequence's cache (empty when it has none)."""
    if cache.keys is None:
        return cls()
    single = cache.extract(row)
    if cls is KVCache:
        return single
    out = cls()
    out.keys, out.values, out.offset = single.keys, single.values, single.offset
    return out


@dataclass
class Response:
    """One generated token, with mlx-lm's `GenerationBatch.Response` fields; the last token of
    a sequence carries its cache (`prompt_cache`) and the tokens in it (`all_tokens`)."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None = None
    prompt_cache: list | None = None
    all_tokens: list[int] | None = None
    from_draft: bool = False


@dataclass
class PromptProgress:
    """A prompt's prefill step, with mlx-lm's `PromptProcessingBatch.Response` fields that the
    engine reads: `progress` is (tokens fed, tokens to feed) of the prompt given to `insert`."""

    uid: int
    progress: tuple[int, int]


@dataclass
class _Row:
    uid: int
    max_tokens: int
    sampler: Sampler | None  # None: greedy
    stop: Any  # a StopSequences matcher
    cache: list  # the prompt cache while prefilling; its MTP part keeps the tokens
    steps: Generator | None = None  # prefill, while it runs
    prompt: int = 0  # the tokens `insert` was given
    cached: int = 0  # the tokens in the main cache before them
    generated: int = 0
    accepted: int = 0  # drafts kept by the last verify pass
    tokens: list[int] = field(default_factory=list)  # the tokens in the main cache


class MTPBatchGenerator:
    """Continuous batching with MTP speculative decoding (see the module docstring).

    Args:
        model: a model whose checkpoint has the MTP layer.
        num_draft: tokens drafted per row per step.
        prefill_batch_size: the most prompts prefilled (one chunk each) per step.
        prefill_step_size: prompt tokens per chunk.
        stats: counts of drafted and accepted tokens and of main-model passes, updated in place.
    """

    def __init__(
        self,
        model: Model,
        *,
        num_draft: int = 1,
        prefill_batch_size: int = 1,
        prefill_step_size: int = 2048,
        stats: MTPStats | None = None,
    ) -> None:
        if model.mtp is None:
            raise ValueError("This checkpoint has no MTP layer (its weights are absent)")
        if num_draft < 1:
            raise ValueError("num_draft must be at least 1")
        self.model, self.num_draft = model, num_draft
        self.prefill_batch_size, self.prefill_step_size = prefill_batch_size, prefill_step_size
        self.stats = stats if stats is not None else MTPStats(num_draft)
        self._uids = 0
        self._prefilling: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._main: list[BatchKVCache] = []  # one per main layer, over `_rows`
        self._mtp: BatchKVCache | None = None
        # Per row, the next catch-up call's inputs: the tokens drawn at each position of the
        # last verify pass (or the first token) and the main model's hidden states there.
        self._inputs: mx.array | None = None
        self._hidden: mx.array | None = None

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        caches: list[list],
        all_tokens: list[list[int]] | None = None,
        samplers: list[Sampler | None] | None = None,
        stop_sequences: list[StopSequences] | None = None,
    ) -> list[int]:
        """Queue sequences; their ids. Each cache comes from `mtp.make_cache(model)` (or a prompt
        cache of such caches) and `prompts` are the tokens to add to it; `all_tokens` (mlx-lm's
        tokens already cached) is not needed: the MTP part of each cache keeps them."""
        uids = []
        for i, (prompt, m, cache) in enumerate(zip(prompts, max_tokens, caches, strict=True)):
            if m < 1:
                raise ValueError("max_tokens must be at least 1")
            split_cache(self.model, cache)
            sampler = samplers[i] if samplers else None
            stops = stop_sequences[i] if stop_sequences else StopSequences()
            row = _Row(self._uids, m, sampler, stops.matcher(), cache, prompt=len(prompt))
            row.cached = split_cache(self.model, cache)[0][0].offset
            row.steps = prefill_steps(self.model, prompt, cache, self.prefill_step_size)
            self._prefilling.append(row)
            uids.append(row.uid)
            self._uids += 1
        return uids

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> dict:
        """Drop sequences; with `return_prompt_caches`, ``{uid: (cache, tokens in it)}``."""
        gone = set(uids)
        caches = {}
        for row in [r for r in self._prefilling if r.uid in gone]:
            self._prefilling.remove(row)
            if return_prompt_caches:
                main, mcache = split_cache(self.model, row.cache)
                # A prefill cut short: the tokens in the main cache, and the MTP pairs whose
                # next token is among them.
                n = main[0].offset
                del mcache.tokens[n:]
                KVCache.trim(mcache, max(mcache.offset - max(n - 1, 0), 0))
                caches[row.uid] = (row.cache, list(mcache.tokens))
        rows = [i for i, r in enumerate(self._rows) if r.uid in gone]
        if return_prompt_caches:
            for i in rows:
                caches[self._rows[i].uid] = (self._extract(i), list(self._rows[i].tokens))
        if rows:
            self._keep([i for i in range(len(self._rows)) if i not in rows])
        return caches

    def next(self) -> tuple[list[PromptProgress], list[Response]]:
        """One step: a verify pass over the running rows, then a prefill chunk of waiting
        prompts (rows whose prompt is in draw their first token and join). Returns (the
        prompts' progress, the generated tokens), as mlx-lm's."""
        progress: list[PromptProgress] = []
        with mx.stream(generation_stream):
            responses = self._step() if self._rows else []
            responses += self._prefill(progress)
        return progress, responses

    # -- prefill and joining ------------------------------------------------------------------

    def _prefill(self, progress: list[PromptProgress]) -> list[Response]:
        responses = []
        for row in list(self._prefilling)[: self.prefill_batch_size]:
            try:
                next(row.steps)
                fed = split_cache(self.model, row.cache)[0][0].offset - row.cached
                progress.append(PromptProgress(row.uid, (fed, row.prompt)))
                continue
            except StopIteration as done:
                logits, hidden = done.value
            progress.append(PromptProgress(row.uid, (row.prompt, row.prompt)))
            self._prefilling.remove(row)
            row.steps = None
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            token = self._draw(row, logprobs[None])
            self.stats.main_passes += 1
            row.tokens = list(split_cache(self.model, row.cache)[1].tokens)
            if self._emit(row, [token], logprobs[None], responses) is None:
                self._join(row, token, hidden)
            else:  # it ended with its first token: its cache as it stands
                responses[-1].prompt_cache, responses[-1].all_tokens = row.cache, row.tokens
        return responses

    def _join(self, row: _Row, token: int, hidden: mx.array) -> None:
        main, mcache = split_cache(self.model, row.cache)
        row.cache = []
        k = self.num_draft
        merged = [BatchKVCache.merge([c]) for c in main]
        mtp = BatchKVCache.merge([mcache])
        inputs = mx.array([[token] + [0] * k])
        hidden = mx.concatenate([hidden, mx.zeros((1, k, hidden.shape[-1]), hidden.dtype)], 1)
        if not self._rows:
            self._main, self._mtp, self._inputs, self._hidden = merged, mtp, inputs, hidden
        else:
            for c, new in zip(self._main, merged, strict=True):
                c.extend(new)
            self._mtp.extend(mtp)
            self._inputs = mx.concatenate([self._inputs, inputs])
            self._hidden = mx.concatenate([self._hidden, hidden])
        row.accepted = 0
        self._rows.append(row)

    # -- the batched step ---------------------------------------------------------------------

    def _step(self) -> list[Response]:
        k, model, rows = self.num_draft, self.model, self._rows
        accepted = [r.accepted for r in rows]
        at = mx.array(accepted)[:, None, None]
        # Catch up and draft the first token; the catch-up positions past what each row kept
        # are rewound before the chained drafts read the cache.
        d_logits, g = model.mtp.predict(self._inputs, self._hidden, self._mtp)
        rewind(self._mtp, [k - a for a in accepted])
        d_logits = mx.take_along_axis(d_logits, at, axis=1)
        g = mx.take_along_axis(g, at, axis=1)
        drafts = [mx.argmax(d_logits, axis=-1)]
        for _ in range(k - 1):
            d_logits, g = model.mtp.predict(drafts[-1], g, self._mtp)
            drafts.append(mx.argmax(d_logits, axis=-1))
        drafts = mx.concatenate(drafts, axis=1)  # (B, k)
        fed = mx.take_along_axis(self._inputs, at[..., 0], axis=1)  # each row's newest token
        logits, hidden = model(mx.concatenate([fed, drafts], axis=1), self._main, True)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        self._mtp.trim(k - 1)  # the chained drafts' entries read the MTP layer's own states
        greedy = mx.argmax(logprobs, axis=-1)
        mx.eval(greedy, drafts, fed, hidden)
        self.stats.main_passes += 1
        if self.stats.main_passes % CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        greedy_rows, draft_rows, fed_rows = greedy.tolist(), drafts.tolist(), fed[:, 0].tolist()

        responses: list[Response] = []
        inputs, keep, finished = [], [], []
        for i, row in enumerate(rows):
            if row.sampler is None:
                draws = greedy_rows[i]
                a = 0
                while a < k and draws[a] == draft_rows[i][a]:
                    a += 1
                draws = draws[: a + 1]
            else:
                draws = []
                while True:  # position by position: the sampler may hold state (a grammar)
                    draws.append(self._draw(row, logprobs[i, len(draws)][None]))
                    if len(draws) > k or draws[-1] != draft_rows[i][len(draws) - 1]:
                        break
                a = len(draws) - 1
            self.stats.record(k, a)
            row.accepted = a
            row.tokens += [fed_rows[i]] + draws[:a]
            inputs.append(draws + [0] * (k - a))
            last = self._emit(row, draws, logprobs[i], responses)
            if last is None:
                keep.append(i)
            else:
                # The cache is to hold the tokens before the last one emitted, as plain
                # decoding's does: the drafts kept after it go.
                finished.append((i, len(row.tokens) - (a - last), responses[-1]))
        rewind_by = [k - r.accepted for r in rows]
        for c in self._main:
            rewind(c, rewind_by)
        for i, n, response in finished:
            response.all_tokens = rows[i].tokens[:n]
            response.prompt_cache = self._extract(i, n)
        self._inputs, self._hidden = mx.array(inputs), hidden
        if finished:
            self._keep(keep)
        return responses

    def _draw(self, row: _Row, logprobs: mx.array) -> int:
        if row.sampler is None:
            return mx.argmax(logprobs, axis=-1).item()
        return row.sampler(logprobs).item()

    def _emit(
        self, row: _Row, tokens: list[int], logprobs: mx.array, out: list[Response]
    ) -> int | None:
        """Responses for `tokens` (drafts kept, then the row's own draw) up to the first that
        ends the sequence; that one's index, None when the sequence goes on."""
        for j, token in enumerate(tokens):
            row.generated += 1
            self.stats.tokens += 1
            finish = None
            if row.stop.advance(token):
                finish = "stop"
            elif row.generated >= row.max_tokens:
                finish = "length"
            drafted = j < len(tokens) - 1
            out.append(Response(row.uid, token, logprobs[j], finish, from_draft=drafted))
            if finish:
                return j
        return None

    def _extract(self, i: int, keep: int | None = None) -> list:
        """Row i's prompt cache (main layers, then the MTP part), cut to its first `keep`
        tokens (default: all it holds)."""
        row = self._rows[i]
        main = [_extract(c, i) for c in self._main]
        mcache = _extract(self._mtp, i, MTPCache)
        tokens = row.tokens if keep is None else row.tokens[:keep]
        for c in main:
            c.trim(c.offset - len(tokens))
        KVCache.trim(mcache, max(mcache.offset - max(len(tokens) - 1, 0), 0))
        mcache.tokens = list(tokens)
        return [*main, mcache]

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._main, self._mtp, self._inputs, self._hidden = [], None, None, None
            return
        for c in [*self._main, self._mtp]:
            c.filter(keep)
        index = mx.array(keep)
        self._inputs, self._hidden = self._inputs[index], self._hidden[index]
