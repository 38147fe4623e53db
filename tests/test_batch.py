"""The continuous-batching engine: every request's tokens equal what it gets alone."""

import queue
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_glm4moe.batch import BatchEngine, Request
from mlx_glm4moe.chat import PromptCache
from mlx_glm4moe.generate import stream_generate
from mlx_glm4moe.loading import load


@pytest.fixture(scope="module")
def loaded(air_q4):
    return load(air_q4)


@pytest.fixture(scope="module", params=["air_q4", "air_f32", "lite_q4"])
def any_loaded(request):
    """4-bit weights (quantized matmuls) and float32 ones (BLAS matmuls)."""
    return load(request.getfixturevalue(request.param))


def prompts(tokenizer, n):
    """Prompts of different lengths (3 to 60 tokens)."""
    words = "the quick brown fox jumps over the lazy dog hello world numbers 42".split()
    return [
        tokenizer.encode(" ".join(words[(i * 5) % len(words) :] + words * i)[: 8 + 25 * i])
        for i in range(n)
    ]


def alone(model, tokenizer, tokens, max_tokens, **kwargs):
    return [r.token for r in stream_generate(model, tokenizer, tokens, max_tokens, **kwargs)]


class Collector:
    """A request's events, gathered from the engine thread."""

    def __init__(self, tokens, max_tokens, **kwargs):
        self.events = queue.SimpleQueue()
        self.request = Request(tokens, max_tokens, self.events.put, **kwargs)
        self.logprobs = []

    def result(self):
        tokens = []
        while (event := self.events.get(timeout=120))["type"] == "token":
            tokens.append(event["token"])
            self.logprobs.append(event["logprobs"])
        return tokens, event


def test_batched_equals_alone(any_loaded):
    model, tokenizer = any_loaded
    asks = prompts(tokenizer, 6)
    max_tokens = [12, 5, 16, 9, 12, 3]
    expected = [alone(model, tokenizer, p, m) for p, m in zip(asks, max_tokens, strict=True)]
    cache = PromptCache(model)
    engine = BatchEngine(
        model,
        tokenizer,
        decode_concurrency=4,
        prompt_concurrency=2,
        prefill_step_size=16,
        prompt_cache=cache,
    )
    try:
        collectors = [Collector(p, m) for p, m in zip(asks, max_tokens, strict=True)]
        for c in collectors:
            engine.submit(c.request)
        results = [c.result() for c in collectors]
        assert [tokens for tokens, _ in results] == expected
        for (tokens, done), p in zip(results, asks, strict=True):
            assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
            usage = done["usage"]
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(p), len(tokens))
        m = engine.metrics
        assert m.requests_total == 6 and m.requests_running == m.requests_waiting == 0
        assert m.generation_tokens_total == sum(map(len, expected))
        # 4 decoded together: fewer steps than tokens
        assert m.decode_steps_total < m.generation_tokens_total

        # Asked again: the prompt cache serves the prompt, the answer is the same.
        again = Collector(asks[2], max_tokens[2])
        engine.submit(again.request)
        tokens, done = again.result()
        assert tokens == expected[2] and done["usage"]["cached_tokens"] == len(asks[2]) - 1
    finally:
        engine.close()


def test_batched_logprobs_equal_alone(loaded):
    """Several requests decoded together, finishing at different steps: each token's
    log-probability and top alternatives are those of its own sequence, as it gets alone."""
    model, tokenizer = loaded
    asks = prompts(tokenizer, 4)
    max_tokens = [6, 3, 8, 5]
    expected = []
    for p, m in zip(asks, max_tokens, strict=True):
        steps = list(stream_generate(model, tokenizer, p, m))
        top = [np.argsort(-np.array(r.logprobs), kind="stable")[:3] for r in steps]
        expected.append(
            (
                [r.token for r in steps],
                [float(r.logprobs[r.token]) for r in steps],
                [t.tolist() for t in top],
                [np.array(r.logprobs)[t] for r, t in zip(steps, top, strict=True)],
            )
        )
    engine = BatchEngine(model, tokenizer, decode_concurrency=4, prompt_concurrency=2)
    try:
        collectors = [
            Collector(p, m, top_logprobs=3) for p, m in zip(asks, max_tokens, strict=True)
        ]
        for c in collectors:
            engine.submit(c.request)
        results = [c.result()[0] for c in collectors]
    finally:
        engine.close()
    assert len({tuple(lp) for _, lp, _, _ in expected}) == len(asks)  # the rows differ
    for c, tokens, (want_tokens, want_lp, want_top, want_top_lp) in zip(
        collectors, results, expected, strict=True
    ):
        assert tokens == want_tokens
        np.testing.assert_allclose([e["logprob"] for e in c.logprobs], want_lp, atol=1e-5)
        assert [[t for t, _ in e["top"]] for e in c.logprobs] == want_top
        got_top_lp = [[v for _, v in e["top"]] for e in c.logprobs]
        np.testing.assert_allclose(got_top_lp, want_top_lp, atol=1e-5)


def test_stop_token_finishes_with_stop(loaded):
    """Each of GLM's stop tokens, drawn mid-answer, ends its request with finish_reason "stop":
    the stop token is the last token event (with no text), as `stream_generate` has it alone."""
    model, tokenizer = loaded
    asks = prompts(tokenizer, 3)
    stops = sorted(tokenizer.eos_token_ids)
    assert len(stops) == 3

    def stop_after(n, stop):
        def make():
            steps = 0

            def sample(logprobs):
                nonlocal steps
                steps += 1
                if steps > n:
                    return mx.array([stop], dtype=mx.uint32)
                return mx.argmax(logprobs, axis=-1)

            return sample

        return make

    scripts = [stop_after(n, stop) for n, stop in zip((2, 4, 3), stops, strict=True)]
    expected = []
    for p, make in zip(asks, scripts, strict=True):
        steps = list(stream_generate(model, tokenizer, p, 50, sampler=make()))
        assert steps[-1].finish_reason == "stop" and steps[-1].token in stops
        expected.append([r.token for r in steps])
    engine = BatchEngine(model, tokenizer, decode_concurrency=3, prompt_concurrency=3)
    try:
        collectors = [
            Collector(p, 50, make_sampler=make) for p, make in zip(asks, scripts, strict=True)
        ]
        for c in collectors:
            engine.submit(c.request)
        results = [c.result() for c in collectors]
    finally:
        engine.close()
    for (tokens, done), want in zip(results, expected, strict=True):
        assert tokens == want
        assert done["finish_reason"] == "stop"
        assert done["usage"]["completion_tokens"] == len(want)


def test_seeded_sampling_is_independent_of_the_batch(loaded):
    model, tokenizer = loaded
    asks = prompts(tokenizer, 3)
    engine = BatchEngine(model, tokenizer, decode_concurrency=3)

    def ask(indices):
        collectors = {
            i: Collector(asks[i], 8, seed=i, make_sampler=lambda: make_sampler(1.0))
            for i in indices
        }
        for c in collectors.values():
            engine.submit(c.request)
        return {i: c.result()[0] for i, c in collectors.items()}

    try:
        one_by_one = {i: ask([i])[i] for i in range(3)}
        assert ask(range(3)) == one_by_one
        assert len({tuple(t) for t in one_by_one.values()}) > 1
    finally:
        engine.close()


def test_one_request_fails_or_leaves_alone(loaded):
    model, tokenizer = loaded
    asks = prompts(tokenizer, 3)
    expected = alone(model, tokenizer, asks[0], 10)
    calls = 0

    def breaks_later():
        def sample(logprobs):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("scripted failure")
            return logprobs.argmax(axis=-1)

        return sample

    engine = BatchEngine(model, tokenizer, decode_concurrency=3, prompt_concurrency=3)
    try:
        good = Collector(asks[0], 10, top_logprobs=2)
        broken = Collector(asks[1], 10, make_sampler=breaks_later)
        leaver = Collector(asks[2], 1000)
        for c in (good, broken, leaver):
            engine.submit(c.request)
        assert leaver.events.get(timeout=60)["type"] == "token"
        leaver.request.cancel.set()
        tokens, done = good.result()
        assert tokens == expected and done["finish_reason"] in ("stop", "length")
        assert broken.result()[1] == {"type": "error", "message": "The generation failed."}
        left, done = leaver.result()
        assert done["finish_reason"] == "cancelled" and len(left) < 1000
        assert engine.metrics.requests_running == 0
    finally:
        engine.close()


def test_logprobs(loaded):
    model, tokenizer = loaded
    [p] = prompts(tokenizer, 1)
    events = queue.SimpleQueue()
    engine = BatchEngine(model, tokenizer)
    try:
        engine.submit(Request(p, 3, events.put, top_logprobs=3))
        first = events.get(timeout=60)
    finally:
        engine.close()
    lp = first["logprobs"]
    [(best, best_lp), *_] = lp["top"]
    assert len(lp["top"]) == 3 and best == first["token"] and lp["logprob"] == best_lp
    assert [v for _, v in lp["top"]] == sorted((v for _, v in lp["top"]), reverse=True)


def test_close_ends_waiting_requests(loaded):
    model, tokenizer = loaded
    [p] = prompts(tokenizer, 1)
    engine = BatchEngine(model, tokenizer, decode_concurrency=1)
    ended = threading.Event()
    engine.submit(Request(p, 10_000, lambda e: None))
    engine.submit(Request(p, 5, lambda e: e["type"] == "done" and ended.set()))
    engine.close()
    assert ended.is_set()


def test_long_prompt_prefills_between_decode_steps(loaded):
    """A 200-token prompt prefilled 16 tokens a step does not hold up a running request: the
    short one finishes before the long one's first token."""
    model, tokenizer = loaded
    short, long = prompts(tokenizer, 1)[0], tokenizer.encode("the lazy dog " * 70)[:200]
    order = queue.SimpleQueue()
    engine = BatchEngine(model, tokenizer, prefill_step_size=16)
    seen = []

    def record(name):
        return lambda event: order.put((name, event["type"]))

    def until(event):
        while event not in seen:
            seen.append(order.get(timeout=120))

    try:
        engine.submit(Request(short, 8, record("short")))
        until(("short", "token"))
        engine.submit(Request(long, 2, record("long")))
        until(("long", "done"))
    finally:
        engine.close()
    assert seen.index(("short", "done")) < seen.index(("long", "token"))


def test_mtp_decodes_with_the_prompt_cache(loaded):
    model, tokenizer = loaded
    assert model.mtp is not None
    asks = prompts(tokenizer, 2)
    expected = [alone(model, tokenizer, p, 10) for p in asks]
    engine = BatchEngine(model, tokenizer, mtp=True, prompt_cache=PromptCache(model, mtp=True))
    try:
        collectors = [Collector(p, 10) for p in asks]
        for c in collectors:
            engine.submit(c.request)
        assert [c.result()[0] for c in collectors] == expected  # greedy MTP: the same tokens
        again = Collector(asks[0], 10)
        engine.submit(again.request)
        tokens, done = again.result()
        assert tokens == expected[0] and done["usage"]["cached_tokens"] == len(asks[0]) - 1
    finally:
        engine.close()
