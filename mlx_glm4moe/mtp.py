"""Speculative decoding with the checkpoint's own multi-token-prediction (nextn) layer.

The MTP layer at position i reads the main model's final normed hidden state h_i and token
t_{i+1}, and predicts t_{i+2}. Each step drafts `num_draft` tokens with it (chaining its own
hidden state after the first), checks them all in one forward pass of the main model, keeps the
longest prefix the main model agrees with and trims both KV caches back to what was kept.

Cache alignment: entry p of the MTP layer's KV cache pairs (t_{p+1}, h_p), at RoPE position p,
so it holds one entry fewer than the main cache. A verify pass yields the main hidden states of
every kept position; the next draft call runs the MTP layer on all of them at once (the pairs of
the accepted tokens, then the pair whose output is the new draft), so the catch-up costs no extra
call. Entries made by chained drafts used the MTP layer's own hidden state, not the main model's,
and are always trimmed.

Run `python -m mlx_glm4moe.bench mtp --synthetic 0.8` for the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import KVCache, trim_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from .models import Model
from .prefill import prefill, prefill_mtp
from .streaming import prefilling, streams_experts

Sampler = Callable[[mx.array], mx.array]
T = TypeVar("T")
# A long decode returns MLX's cached buffers to the system this often (tokens), as mlx-lm does.
CLEAR_CACHE_EVERY = 256


class MTPCache(KVCache):
    """The MTP layer's KV cache; it sits after the main layers' caches in a prompt cache.

    It also keeps the token ids of the sequence in the main cache: the MTP layer's next entry
    needs the main hidden state of the last cached token, which no cache stores, so a generation
    that starts from a cached prefix re-feeds the main model the tokens from the MTP cache's end
    (at least one). `trim` (and so mlx-lm's `trim_prompt_cache`) keeps the two in step.
    """

    def __init__(self):
        super().__init__()
        self.tokens: list[int] = []

    def trim(self, n: int) -> int:
        del self.tokens[max(len(self.tokens) - n, 0) :]
        return super().trim(n)


def make_cache(model: Model, mtp: bool = True) -> list[KVCache]:
    """A prompt cache for `stream_generate`: the main layers' KV caches, then, with `mtp` and a
    checkpoint that has the layer, an `MTPCache` (as mlx-lm keeps a draft model's caches after
    the main model's). Use a cache with an MTP part only with `mtp=True`."""
    cache = model.make_cache()
    if mtp and model.mtp is not None:
        cache.append(MTPCache())
    return cache


def split_cache(model: Model, cache: list) -> tuple[list[KVCache], MTPCache | None]:
    """(main layers' caches, the MTP cache or None)."""
    n = len(model.layers)
    if len(cache) == n + 1 and isinstance(cache[n], MTPCache):
        return cache[:n], cache[n]
    if len(cache) != n:
        raise ValueError(f"The prompt cache has {len(cache)} entries; this model needs {n}")
    return cache, None


@dataclass
class MTPStats:
    """Running counts of one MTP generation."""

    num_draft: int
    drafted: list[int] = field(init=False)  # per draft position
    accepted: list[int] = field(init=False)
    tokens: int = 0
    main_passes: int = 0

    def __post_init__(self):
        self.drafted, self.accepted = [0] * self.num_draft, [0] * self.num_draft

    def record(self, num_drafted: int, num_accepted: int) -> None:
        for i in range(num_drafted):
            self.drafted[i] += 1
            self.accepted[i] += i < num_accepted

    @property
    def acceptance(self) -> float:
        """Accepted / drafted, over all draft positions."""
        return sum(self.accepted) / max(sum(self.drafted), 1)

    def as_dict(self) -> dict:
        return {
            "num_draft": self.num_draft,
            "acceptance": self.acceptance,
            # Position i counts as accepted only when positions before it were too.
            "acceptance_per_position": [
                a / max(d, 1) for a, d in zip(self.accepted, self.drafted, strict=True)
            ],
            "drafted": list(self.drafted),
            "accepted": list(self.accepted),
            "tokens_per_pass": self.tokens / max(self.main_passes, 1),
        }


class MatchSampling:
    """Drafts and main-model tokens drawn independently with the same sampler; a draft is kept
    while it equals the main model's own draw. Every emitted token is the main model's draw, so
    the output is plain decoding's for any sampler, and exactly its tokens when greedy."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def draw(self, logprobs: mx.array) -> tuple[mx.array, None]:
        return self.sampler(logprobs), None

    def verify(self, logprobs: mx.array, drafts: mx.array, q: None) -> tuple[mx.array, mx.array]:
        """(accepted flag per draft, the token to emit after each possible accepted prefix)."""
        y = self.sampler(logprobs)
        return drafts == y[:-1], y


class RejectionSampling:
    """Speculative (rejection) sampling, Leviathan et al. 2023: a draft x drawn from q is kept
    with probability min(1, p(x)/q(x)), else a token is drawn from norm(max(p - q, 0)); the
    output distribution is p's. p and q are mlx-lm `make_sampler`'s distributions for the same
    settings (its filters, then the temperature)."""

    def __init__(self, temp: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0):
        self.temp, self.top_p, self.top_k, self.min_p = temp, top_p, top_k, min_p

    def logits(self, logprobs: mx.array) -> mx.array:
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1 / self.temp)

    def draw(self, logprobs: mx.array) -> tuple[mx.array, mx.array]:
        z = self.logits(logprobs)
        return mx.random.categorical(z), mx.softmax(z, axis=-1)

    def verify(
        self, logprobs: mx.array, drafts: mx.array, q: mx.array
    ) -> tuple[mx.array, mx.array]:
        k = drafts.size
        p = mx.softmax(self.logits(logprobs), axis=-1)
        p_x = mx.take_along_axis(p[:k], drafts[:, None], axis=-1)[:, 0]
        q_x = mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
        accepted = mx.random.uniform(shape=(k,)) * q_x < p_x
        # Row i: the residual if draft i is rejected; the last row: p itself, after all drafts.
        residual = mx.concatenate([mx.maximum(p[:k] - q, 0), p[k:]])
        return accepted, mx.random.categorical(mx.log(residual))


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def prefill_steps(
    model: Model, prompt: list[int], cache: list, prefill_step_size: int = 2048
) -> Generator[None, None, tuple[mx.array, mx.array]]:
    """Feed `prompt` into an MTP prompt cache (from `make_cache(model)`, possibly holding a
    prefix), one chunk per iteration, so a caller can interleave other work; returns the last
    token's logits `(vocab,)` and final hidden state `(1, 1, hidden)`. The main cache then holds
    the whole sequence and the MTP cache one pair fewer (the last token's pair needs the token
    after it)."""
    if model.mtp is None:
        raise ValueError("This checkpoint has no MTP layer (its weights are absent)")
    if not prompt:
        raise ValueError("The prompt is empty")
    main, mcache = split_cache(model, cache)
    if mcache is None:
        raise ValueError("MTP decoding needs a prompt cache from mtp.make_cache(model)")
    cached = main[0].offset
    if len(mcache.tokens) != cached or mcache.offset > max(cached - 1, 0):
        raise ValueError(
            "The prompt cache's MTP part is out of step with its main part (was it used "
            "without mtp?); make a new one with mtp.make_cache(model)"
        )
    mtp = model.mtp
    seq = mcache.tokens
    seq.extend(prompt)
    # Re-feed what the MTP layer has not paired yet (see MTPCache).
    pos = mcache.offset
    trim_prompt_cache(main, cached - pos)

    # Prefill all but the last token in chunks; pair p of the MTP layer needs seq[p + 1], which
    # the chunk never reaches past. Work runs on mlx-lm's generation stream (see generate_step).
    # Streamed experts go layer by layer (see prefill.py).
    if streams_experts(model) and len(seq) - pos > 1:
        h = prefill(model, mx.array(seq[pos:-1]), main, prefill_step_size, hidden=True)
        prefill_mtp(model, mx.array(seq[pos + 1 :]), h, mcache, prefill_step_size)
        pos = len(seq) - 1
        yield
    while len(seq) - pos > 1:
        n = min(prefill_step_size, len(seq) - pos - 1)
        with mx.stream(generation_stream), prefilling(model):
            _, h = model(mx.array(seq[pos : pos + n])[None], cache=main, return_hidden=True)
            mtp.predict(mx.array(seq[pos + 1 : pos + n + 1])[None], h, mcache)
        mx.eval([c.state for c in cache])
        pos += n
        mx.clear_cache()
        yield
    with mx.stream(generation_stream):
        logits, h = model(mx.array(seq[-1:])[None], cache=main, return_hidden=True)
    return logits[0, -1], h


def finish(steps: Generator[None, None, T]) -> T:
    """Run a generator of steps (`prefill_steps`) to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def mtp_generate_step(
    prompt: list[int],
    model: Model,
    *,
    max_tokens: int = 256,
    num_draft: int = 1,
    sampling: MatchSampling | RejectionSampling | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 2048,
    stats: MTPStats | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yield (token, logprobs, from_draft) for each generated token, never more than
    `max_tokens`. `sampling` defaults to greedy; `stats` (updated in place) collects the counts.

    `prompt_cache` (from `make_cache(model)`) may hold a prefix; it is updated in place. When the
    generator stops, early or not, the main cache holds what plain decoding's would: the prompt
    and every token yielded, except a last one that reached `max_tokens`.
    """
    if num_draft < 1:
        raise ValueError("num_draft must be at least 1")
    sampling = sampling or MatchSampling(greedy_sampler)
    stats = stats if stats is not None else MTPStats(num_draft)
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    logits, pending_h = finish(prefill_steps(model, prompt, cache, prefill_step_size))
    main, mcache = split_cache(model, cache)
    mtp = model.mtp
    seq = mcache.tokens  # the tokens in the main cache, kept in step with it
    base = len(seq)
    with mx.stream(generation_stream):
        logprobs = _logprobs(logits)
        y = sampling.draw(logprobs)[0]
    stats.main_passes += 1
    token = y.item()
    pending: list[int] = []  # accepted drafts whose MTP pairs are still to run
    valid = mcache.offset  # MTP entries below this pair main-model hidden states
    emitted, next_clear = 0, CLEAR_CACHE_EVERY
    try:
        while emitted < max_tokens:
            k = min(num_draft, max_tokens - emitted - 1)
            if k > 0:
                with mx.stream(generation_stream):
                    # Catch up on the accepted positions and draft from the new token in one
                    # call.
                    d_logits, g = mtp.predict(mx.array(pending + [token])[None], pending_h, mcache)
                    valid = mcache.offset
                    drafts, qs = [], []
                    for i in range(k):
                        if i:
                            d_logits, g = mtp.predict(drafts[-1].reshape(1, 1), g[:, -1:], mcache)
                        d, q = sampling.draw(_logprobs(d_logits[0, -1]))
                        drafts.append(d)
                        qs.append(q)
                    drafts = mx.stack(drafts)
                    inputs = mx.concatenate([mx.array([token]), drafts])[None]
                    logits, h = model(inputs, cache=main, return_hidden=True)
                    block_logprobs = _logprobs(logits[0])
                    accepted, next_tokens = sampling.verify(
                        block_logprobs, drafts, None if qs[0] is None else mx.stack(qs)
                    )
                stats.main_passes += 1
                mx.async_eval(accepted, next_tokens, drafts, block_logprobs, h)
            seq.append(token)
            emitted += 1
            stats.tokens += 1
            yield token, logprobs, False
            if k <= 0:
                break
            # The step's one wait on the device: acceptance decides what to feed next. The
            # drafts and the next tokens came with it, so reading them whole starts no work.
            accepted, next_tokens, drafts = (a.tolist() for a in (accepted, next_tokens, drafts))
            a = 0
            while a < k and accepted[a]:
                a += 1
            stats.record(k, a)
            for d, lp in zip(drafts[:a], block_logprobs[:a], strict=True):
                seq.append(d)
                emitted += 1
                stats.tokens += 1
                yield d, lp, True
            if emitted >= next_clear:
                mx.clear_cache()
                next_clear += CLEAR_CACHE_EVERY
            trim_prompt_cache(main, k - a)
            KVCache.trim(mcache, mcache.offset - valid)  # the KV entries only, not the tokens
            pending, pending_h = drafts[:a], h[:, : a + 1]
            token, logprobs = next_tokens[a], block_logprobs[a]
    finally:
        # Leave the caches as plain decoding would (see the docstring).
        keep = base + emitted - (emitted == max_tokens)
        trim_prompt_cache(main, main[0].offset - keep)
        KVCache.trim(mcache, mcache.offset - min(valid, max(keep - 1, 0)))
        del seq[keep:]


def sampling_for(
    sampler: Sampler | None, temp: float, top_p: float, top_k: int, min_p: float
) -> MatchSampling | RejectionSampling:
    """Greedy or a custom sampler: drafts kept when they match; otherwise rejection sampling."""
    if sampler is not None:
        return MatchSampling(sampler)
    if temp == 0:
        return MatchSampling(greedy_sampler)
    return RejectionSampling(temp, top_p, top_k, min_p)
