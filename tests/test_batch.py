"""The continuous-batching engine: every request's tokens equal what it gets alone."""

import queue
import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlx_glm4moe import batch
from mlx_glm4moe import prefill as prefill_module
from mlx_glm4moe.batch import BatchEngine, QueueFull, Request
from mlx_glm4moe.chat import PromptCache
from mlx_glm4moe.generate import stream_generate
from mlx_glm4moe.loading import load
from mlx_glm4moe.streaming import ExpertReadError

# Batched tokens equal a request's alone to the bit on float32 activations: MLX's CPU (see
# conftest's `cpu`).
pytestmark = pytest.mark.usefixtures("cpu")

DEMO = Path(batch.__file__).parent / "default_model"


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
        assert cache.lent == 0  # every copy the requests used came back
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


def test_a_seeded_sampler_leaves_the_threads_generator_alone():
    """A request's draws come from its own stream: the same for the same seed, and MLX's
    generator (which other requests' samplers draw from) is as it was."""
    logprobs = mx.zeros((1, 1000))  # uniform over 1000 tokens
    before = mx.random.state[0].tolist()
    seeded = batch._OwnRandom(make_sampler(1.0), 7)
    draws = [seeded(logprobs).item() for _ in range(8)]
    assert mx.random.state[0].tolist() == before
    again = batch._OwnRandom(make_sampler(1.0), 7)
    assert [again(logprobs).item() for _ in range(8)] == draws and len(set(draws)) > 1
    a, b = (batch._OwnRandom(make_sampler(1.0), None) for _ in range(2))
    assert [a(logprobs).item() for _ in range(8)] != [b(logprobs).item() for _ in range(8)]


def test_unseeded_requests_beside_a_seeded_one_stay_random(loaded):
    """Two unseeded requests sampling in the same steps as a seeded one: their tokens differ
    from run to run (a seed used to reseed the engine thread's generator before each of its
    draws, so theirs followed from it), while the seeded request repeats itself."""
    model, tokenizer = loaded
    [p] = prompts(tokenizer, 1)
    engine = BatchEngine(model, tokenizer, decode_concurrency=3, prompt_concurrency=3)

    def run():
        hot = lambda: make_sampler(3.0)  # noqa: E731  nearly uniform: runs differ
        seeded = Collector(p, 12, seed=5, make_sampler=hot)
        others = [Collector(p, 12, make_sampler=hot) for _ in range(2)]
        for c in (seeded, *others):
            engine.submit(c.request)
        return seeded.result()[0], [c.result()[0] for c in others]

    try:
        (seeded, first), (again, second) = run(), run()
    finally:
        engine.close()
    assert seeded == again
    assert first != second


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


def filled(model, tokens):
    """A KV cache holding `tokens`."""
    cache = model.make_cache()
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def fail_once(monkeypatch, owner, name, when, error=None):
    """`owner.name` raises `error` (a RuntimeError by default) the first time `when(*args)`
    holds."""
    error = error or RuntimeError("injected fault")
    original = getattr(owner, name)
    armed = [True]

    def wrapper(*args, **kwargs):
        if armed[0] and when(*args, **kwargs):
            armed[0] = False
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("fault", ["fetch", "prefill", "insert", "emit", "detokenizer", "store"])
def test_a_fault_ends_only_its_request(air_q4, monkeypatch, fault):
    """A fault while a request starts (prompt cache, streamed prefill, insertion), handles its
    tokens or stores its cache: that request ends with an error, the one running beside it
    gets the tokens it gets alone, and the engine answers the next request."""
    model, tokenizer = load(air_q4, expert_slots=2 if fault == "prefill" else None)
    good, bad, later = prompts(tokenizer, 3)
    expected = alone(model, tokenizer, good, 12), alone(model, tokenizer, later, 4)
    assert len(expected[0]) > 2  # the bad request (2 tokens) finishes first
    cache = PromptCache(model)
    # Half the bad prompt cached: its request holds a copy of it, lent by the prompt cache.
    half = bad[: len(bad) // 2]
    cache.store(half, filled(model, half))
    emit_fails = False
    if fault == "fetch":
        fail_once(monkeypatch, cache, "fetch", lambda tokens: tokens == bad)
    elif fault == "prefill":
        is_bad = lambda model, rest, *a, **kw: rest.size == len(bad) - len(half) - 1  # noqa: E731
        fail_once(monkeypatch, batch, "prefill", is_bad, ExpertReadError("bytes missing"))
    elif fault == "insert":
        is_bad = lambda self, rest, **kw: kw["all_tokens"][0] + rest[0] == bad  # noqa: E731
        fail_once(monkeypatch, BatchGenerator, "insert", is_bad)
    elif fault == "emit":
        emit_fails = True
    elif fault == "detokenizer":
        fail_once(monkeypatch, type(tokenizer.detokenizer), "finalize", lambda self: True)
    else:
        fail_once(monkeypatch, cache, "store", lambda tokens, *a: tokens[: len(bad)] == bad)
    engine = BatchEngine(model, tokenizer, decode_concurrency=2, prompt_cache=cache)
    try:
        first = Collector(good, 12)
        engine.submit(first.request)
        head = first.events.get(timeout=60)
        assert head["type"] == "token"
        failing = Collector(bad, 2)
        if emit_fails:
            fail_once(monkeypatch, failing.request, "emit", lambda e: e["type"] == "token")
        engine.submit(failing.request)
        assert failing.result()[1] == {"type": "error", "message": "The generation failed."}
        tokens, done = first.result()
        assert [head["token"], *tokens] == expected[0] and done["type"] == "done"
        next_one = Collector(later, 4)
        engine.submit(next_one.request)
        tokens, done = next_one.result()
        assert tokens == expected[1] and done["type"] == "done"
        assert engine.alive and engine.metrics.requests_running == 0 and cache.lent == 0
    finally:
        engine.close()


def test_a_dead_engine_answers_every_request(loaded, monkeypatch):
    """A bug that ends the engine's thread: the requests it holds and every later one get an
    error event (none waits forever), and `alive` turns False."""
    model, tokenizer = loaded
    [p] = prompts(tokenizer, 1)
    blocked, go = threading.Event(), threading.Event()

    def stuck():
        blocked.set()
        go.wait(60)

    engine = BatchEngine(model, tokenizer, decode_concurrency=1)
    try:
        running = Collector(p, 50, make_sampler=stuck)
        engine.submit(running.request)
        assert blocked.wait(60)
        waiting = Collector(p, 5)
        engine.submit(waiting.request)
        assert engine.alive
        monkeypatch.setattr(engine, "_step", lambda generator: 1 / 0)  # outside every guard
        monkeypatch.setattr(engine, "_finish", lambda *a, **k: 1 / 0)
        go.set()
        stopped = {"type": "error", "message": batch.STOPPED}
        assert running.result() == ([], stopped) and waiting.result() == ([], stopped)
        assert not engine.alive
        later = Collector(p, 5)
        engine.submit(later.request)
        assert later.events.get_nowait() == stopped  # at once
    finally:
        engine.close()


def test_a_bug_while_a_request_starts_still_answers_it(loaded, monkeypatch):
    """The engine's thread ends in the middle of starting a request: that request too gets its
    error event."""
    model, tokenizer = loaded
    [p] = prompts(tokenizer, 1)

    class Bug(BaseException):
        pass

    def bug(*args):
        raise Bug

    engine = BatchEngine(model, tokenizer)
    try:
        monkeypatch.setattr(engine, "_join", bug)
        request = Collector(p, 5)
        engine.submit(request.request)
        assert request.result() == ([], {"type": "error", "message": batch.STOPPED})
        assert not engine.alive
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once(loaded):
    """With `max_queue` requests waiting, `submit` raises `QueueFull`; the queue's depth is
    `metrics.requests_waiting`; the waiting ones are served, and then new ones again."""
    model, tokenizer = loaded
    [p] = prompts(tokenizer, 1)
    expected = alone(model, tokenizer, p, 3)
    blocked, go = threading.Event(), threading.Event()

    def stuck():
        blocked.set()
        go.wait(60)

    engine = BatchEngine(model, tokenizer, decode_concurrency=1, max_queue=2)
    try:
        first = Collector(p, 3, make_sampler=stuck)
        engine.submit(first.request)
        assert blocked.wait(60)  # started: no longer waiting
        waiting = [Collector(p, 3) for _ in range(2)]
        for c in waiting:
            engine.submit(c.request)
        assert engine.metrics.requests_waiting == 2
        with pytest.raises(QueueFull):
            engine.submit(Collector(p, 3).request)
        assert engine.metrics.requests_total == 3
        go.set()
        assert [c.result()[0] for c in [first, *waiting]] == [expected] * 3
        assert engine.metrics.requests_waiting == 0
        again = Collector(p, 3)
        engine.submit(again.request)
        assert again.result()[0] == expected
    finally:
        go.set()
        engine.close()


def closes_within(engine, seconds):
    """close() on a thread of its own: whether it returned within `seconds`."""
    closer = threading.Thread(target=engine.close)
    tic = time.perf_counter()
    closer.start()
    closer.join(seconds)
    return not closer.is_alive(), time.perf_counter() - tic


@pytest.mark.parametrize("stop", ["close", "cancel"])
def test_a_streamed_prefill_stops_between_layers(air_q4, monkeypatch, stop):
    """close(), or the client's cancel, during a layer-major prefill (each layer made to take
    1 s, three layers): it stops after the layer under way, and the request ends as
    cancelled (after a cancel, the engine serves the next request)."""
    model, tokenizer = load(air_q4, expert_slots=2)
    started = threading.Event()
    attend = prefill_module._attend

    def slow(*args):
        started.set()
        time.sleep(1.0)
        return attend(*args)

    monkeypatch.setattr(prefill_module, "_attend", slow)
    engine = BatchEngine(model, tokenizer)
    try:
        request = Collector(prompts(tokenizer, 3)[2], 5)
        engine.submit(request.request)
        assert started.wait(60)
        tic = time.perf_counter()
        if stop == "close":
            closed, _ = closes_within(engine, 20)
            assert closed
        else:
            request.request.cancel.set()
        tokens, done = request.result()
        assert time.perf_counter() - tic < 2  # not the 3 s of the whole prefill
        assert tokens == [] and done["finish_reason"] == "cancelled"
        if stop == "cancel":
            monkeypatch.setattr(prefill_module, "_attend", attend)
            [p] = prompts(tokenizer, 1)
            after = Collector(p, 3)
            engine.submit(after.request)
            assert after.result()[0] == alone(model, tokenizer, p, 3)
    finally:
        engine.close()


def test_close_cancels_an_mtp_generation(loaded):
    """close() while MTP generates a long answer: it returns at the next token."""
    model, tokenizer = loaded
    engine = BatchEngine(model, tokenizer, mtp=True)
    request = Collector(prompts(tokenizer, 1)[0], 10**6)
    try:
        engine.submit(request.request)
        assert request.events.get(timeout=60)["type"] == "token"
        closed, took = closes_within(engine, 20)
        assert closed and took < 5
        tokens, done = request.result()
        assert done["finish_reason"] == "cancelled" and len(tokens) < 10**6
    finally:
        request.request.cancel.set()


def test_a_weight_file_cut_short_while_serving(tmp_path):
    """The demo model with streamed experts, its weight file truncated while the engine runs
    (a drive going away): each request that needs an expert past the cut ends with an error,
    none hangs, the engine stays alive, and once the file is whole again the answers are
    the same as before (no slot kept the bytes it failed to read)."""
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    [weights] = folder.glob("*.safetensors")
    whole = weights.read_bytes()
    model, tokenizer = load(folder, expert_slots=2)
    asks = prompts(tokenizer, 3)
    engine = BatchEngine(model, tokenizer)

    def ask(tokens):
        c = Collector(tokens, 6)
        engine.submit(c.request)
        return c.result()

    try:
        before = [ask(p)[0] for p in asks]
        weights.write_bytes(whole[: len(whole) // 2])
        ends = [ask(p)[1] for p in asks]
        assert {"type": "error", "message": "The generation failed."} in ends
        assert engine.alive
        weights.write_bytes(whole)
        assert [ask(p)[0] for p in asks] == before
    finally:
        engine.close()
