"""MTP inside continuous batching: every row's tokens (and log-probabilities) equal plain decoding
of the request alone, its drafts equal MTP decoding alone, and sampling keeps the distribution.

The fixtures are agreeing checkpoints (the MTP layer right about half the time, so rows keep
different numbers of drafts each step) with small random attention outputs added back, so every
cache entry of every row, main and MTP layers alike, moves the logits: a row rewound by another
row's count changes its log-probabilities and its drafts."""

import itertools
import math
import queue
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.sample_utils import make_sampler
from test_mtp import chi2_threshold, tiny_model
from test_server import main_kwargs

from mlx_glm4moe.batch import BatchEngine, Request
from mlx_glm4moe.chat import PromptCache
from mlx_glm4moe.convert import convert
from mlx_glm4moe.generate import generate_step, stream_generate
from mlx_glm4moe.loading import load
from mlx_glm4moe.mtp import make_cache
from mlx_glm4moe.mtp_batch import MTPBatchGenerator, rewind
from mlx_glm4moe.synthetic import make_agreeing_checkpoint


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """Float32 CPU kernels: batched and alone agree to the bit."""
    with mx.stream(mx.cpu):
        yield


@pytest.fixture(scope="module", params=["air", "lite"])
def attending(request, tmp_path_factory):
    """GLM-4.5-Air's attention, and GLM-4.7-Flash's latent attention (its cache holds the
    latent and the rotary key)."""
    root = tmp_path_factory.mktemp(f"attending-{request.param}")
    hf = make_agreeing_checkpoint(root / "hf", 0.5, request.param)
    model, tokenizer = load(convert(str(hf), str(root / "mlx")))
    mx.random.seed(3)
    for layer in model.model.layers:  # the MTP layer's too
        w = layer.self_attn.o_proj.weight
        layer.self_attn.o_proj.weight = 0.05 * mx.random.normal(w.shape).astype(w.dtype)
    mx.eval(model.parameters())
    return model, tokenizer


def prompts(tokenizer, n):
    words = "the quick brown fox jumps over the lazy dog hello world numbers 42".split()
    return [
        tokenizer.encode(" ".join(words[(i * 5) % len(words) :] + words * i)[: 8 + 25 * i])
        for i in range(n)
    ]


MAX_TOKENS = [20, 9, 31, 14, 25, 6, 17, 28]


def collect(events):
    tokens, logprobs = [], []
    while (event := events.get(timeout=120))["type"] == "token":
        tokens.append(event["token"])
        logprobs.append(event["logprobs"]["logprob"])
    return tokens, logprobs, event


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_greedy_equals_plain_decoding_alone(attending, concurrency):
    """Eight requests, half of them sent once the first has its first token: each gets plain
    decoding's tokens and log-probabilities, alone, to the bit."""
    model, tokenizer = attending
    asks = prompts(tokenizer, 8)
    expected = []
    for p, m in zip(asks, MAX_TOKENS, strict=True):
        steps = list(stream_generate(model, tokenizer, p, m))
        expected.append(([r.token for r in steps], [r.logprobs[r.token].item() for r in steps]))
    engine = BatchEngine(
        model,
        tokenizer,
        decode_concurrency=concurrency,
        prefill_step_size=16,
        prompt_cache=PromptCache(model, mtp=True),
        mtp=True,
        num_draft=2,
    )
    try:
        events = [queue.SimpleQueue() for _ in asks]
        requests = [
            Request(p, m, q.put, top_logprobs=0)
            for p, m, q in zip(asks, MAX_TOKENS, events, strict=True)
        ]
        for r in requests[:4]:
            engine.submit(r)
        for _ in range(1200):  # the others join once tokens are coming
            if engine.metrics.generation_tokens_total:
                break
            time.sleep(0.05)
        for r in requests[4:]:
            engine.submit(r)
        results = [collect(q) for q in events]
        for (tokens, logprobs, done), (want, want_lp) in zip(results, expected, strict=True):
            assert tokens == want
            np.testing.assert_allclose(logprobs, want_lp, atol=1e-5)
            assert done["usage"]["completion_tokens"] == len(want)
        m = engine.metrics
        assert m.generation_tokens_total == sum(len(t) for t, _ in expected)
        assert 0 < m.draft_accepted_total < m.draft_tokens_total
        assert m.decode_steps_total < m.generation_tokens_total

        # Asked again: the prompt cache (with its MTP part) serves the prompt.
        again = queue.SimpleQueue()
        engine.submit(Request(asks[2], MAX_TOKENS[2], again.put, top_logprobs=0))
        tokens, _, done = collect(again)
        assert tokens == expected[2][0] and done["usage"]["cached_tokens"] > 0
    finally:
        engine.close()


def test_seeded_sampling_equals_plain_decoding(attending):
    """A seeded request draws each emitted token once, from the main model's distribution at its
    position, in order: with MTP, eight at a time, joining mid-flight, it gets the tokens plain
    decoding gets with the same seed."""
    model, tokenizer = attending
    asks = prompts(tokenizer, 8)

    def run(**kwargs):
        engine = BatchEngine(model, tokenizer, prefill_step_size=16, **kwargs)
        try:
            events = [queue.SimpleQueue() for _ in asks]
            for i, (p, m, q) in enumerate(zip(asks, MAX_TOKENS, events, strict=True)):
                sampler = lambda: make_sampler(temp=1.0)  # noqa: E731
                engine.submit(Request(p, m, q.put, make_sampler=sampler, seed=i, top_logprobs=0))
            return [collect(q)[:2] for q in events]
        finally:
            engine.close()

    plain = run(decode_concurrency=1)
    spec = run(decode_concurrency=8, mtp=True, num_draft=2)
    assert [t for t, _ in spec] == [t for t, _ in plain]
    for (_, lp), (_, want) in zip(spec, plain, strict=True):
        np.testing.assert_allclose(lp, want, atol=1e-5)
    assert len({tuple(t) for t, _ in plain}) == len(asks)


def run_generator(model, asks, max_tokens, num_draft, join_after=3):
    """(token, from_draft) per request, half inserted after `join_after` steps; the caches the
    finished rows hand back."""
    generator = MTPBatchGenerator(model, num_draft=num_draft, prefill_step_size=16)
    half = len(asks) // 2
    uids = generator.insert(
        asks[:half], max_tokens[:half], [make_cache(model) for _ in asks[:half]]
    )
    out, caches = {}, {}
    for step in range(500):
        if step == join_after:
            rest = asks[half:]
            uids += generator.insert(rest, max_tokens[half:], [make_cache(model) for _ in rest])
        for r in generator.next()[1]:
            out.setdefault(r.uid, []).append((r.token, r.from_draft))
            if r.finish_reason:
                caches[r.uid] = (r.prompt_cache, r.all_tokens)
        if len(caches) == len(asks):
            break
    return [out[u] for u in uids], [caches[u] for u in uids]


@pytest.mark.parametrize("num_draft", [1, 3])
def test_drafts_and_caches_equal_mtp_alone(attending, num_draft):
    """Each row drafts and keeps what MTP decoding alone does (its MTP cache rewound right), and
    hands back the cache MTP decoding alone leaves."""
    model, tokenizer = attending
    asks = prompts(tokenizer, 6)
    got, caches = run_generator(model, asks, MAX_TOKENS[:6], num_draft)
    kept = 0
    for p, m, rows, (cache, tokens) in zip(asks, MAX_TOKENS[:6], got, caches, strict=True):
        alone = make_cache(model)
        steps = list(
            stream_generate(
                model, tokenizer, p, m, prompt_cache=alone, mtp=True, num_draft=num_draft
            )
        )
        assert rows == [(r.token, r.from_draft) for r in steps]
        kept += sum(r.from_draft for r in steps)
        assert tokens == alone[-1].tokens == cache[-1].tokens
        for c, a in zip(cache, alone, strict=True):
            assert c.offset == a.offset
            np.testing.assert_array_equal(c.keys[..., : c.offset, :], a.keys[..., : a.offset, :])
    assert kept > 10


def test_rewind_drops_each_rows_own_count():
    """Rows of different lengths (left-padded), each dropping its own number of entries: what is
    left of each row is its first entries, and the next write lands after them."""
    lengths, drop = [5, 3, 6], [2, 0, 3]
    singles = []
    for i, n in enumerate(lengths):
        c = KVCache()
        c.update_and_fetch(*(mx.full((1, 1, n, 2), i * 100.0) + mx.arange(n)[:, None],) * 2)
        singles.append(c)
    batch = BatchKVCache.merge(singles)
    rewind(batch, drop)
    batch.update_and_fetch(*(mx.full((3, 1, 1, 2), -1.0),) * 2)
    for i, (n, d) in enumerate(zip(lengths, drop, strict=True)):
        row = batch.extract(i).keys[0, 0, :, 0].tolist()
        assert row == [i * 100.0 + j for j in range(n - d)] + [-1.0]
    assert batch.offset.tolist() == [n - d + 1 for n, d in zip(lengths, drop, strict=True)]


def test_sampling_keeps_the_distribution():
    """Speculative sampling in the batch (greedy drafts, so q is one-hot: a draft x is kept with
    probability p(x), else the token comes from p without x) keeps plain decoding's distribution.
    N = 2000 seeded three-token continuations of one prompt, eight rows at a time that join at
    different steps, two drafts per step: the third token's frequencies against its exact
    distribution under plain decoding (summed over the first two). With 5 tokens the total
    variation's sampling noise is about 0.5 * sum_i sqrt(2 p_i / (pi N)) <= 0.02, so TV < 0.05
    holds by more than five standard deviations; chi-square at p ~ 1e-4 too. Each emitted token
    is one draw from its position's distribution, in order, so with a random stream reseeded per
    draw, 64 sixteen-token samples are plain decoding's with the same seeds, token for token
    (what a row rewound by another row's count breaks; the distribution alone barely moves)."""
    model, temp, prompt = tiny_model(), 1.0, [1, 4, 2]
    V = model.args.vocab_size

    def probs(tokens):
        return np.array(nn.softmax(model(mx.array(tokens)[None])[0, -1] / temp))

    exact = np.zeros(V)
    p1 = probs(prompt)
    for a in range(V):
        p2 = probs(prompt + [a])
        for b in range(V):
            exact += p1[a] * p2[b] * probs(prompt + [a, b])

    def seeded(seed):
        draws = itertools.count()

        def sample(logprobs):
            mx.random.seed(seed * 1000 + next(draws))
            return mx.random.categorical(logprobs.reshape(1, -1) / temp)

        return sample

    def run(n, max_tokens):
        """{seed: tokens} for seeds 0..n-1, eight rows at a time."""
        generator = MTPBatchGenerator(model, num_draft=2, prefill_batch_size=8)
        running: dict[int, tuple[int, list[int]]] = {}  # uid: (seed, tokens)
        samples: dict[int, list[int]] = {}
        while len(samples) < n:
            seeds = range(len(samples) + len(running), min(len(samples) + 8, n))
            uids = generator.insert(
                [prompt] * len(seeds),
                [max_tokens] * len(seeds),
                [make_cache(model) for _ in seeds],
                samplers=[seeded(seed) for seed in seeds],
            )
            running |= {uid: (seed, []) for uid, seed in zip(uids, seeds, strict=True)}
            for r in generator.next()[1]:
                running[r.uid][1].append(r.token)
                if r.finish_reason:
                    seed, tokens = running.pop(r.uid)
                    samples[seed] = tokens
        return samples, generator.stats.acceptance

    n = 2000
    samples, acceptance = run(n, 3)
    counts = np.bincount([tokens[2] for tokens in samples.values()], minlength=V)
    expected = exact * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < chi2_threshold(V - 1)
    assert 0.5 * np.abs(counts / n - exact).sum() < 0.05
    assert 0.05 < acceptance < 0.9  # both branches ran
    assert math.isclose(exact.sum(), 1, rel_tol=1e-5)
    for seed, tokens in run(64, 16)[0].items():
        plain = generate_step(mx.array(prompt), model, max_tokens=16, sampler=seeded(seed))
        assert [t for t, _ in plain] == tokens


def test_removed_rows_hand_back_caches_that_continue(attending):
    """Rows removed mid-flight, one still prefilling its prompt and one decoding, hand back
    caches (main and MTP parts) that a later request continues from as from a fresh prefill;
    the row left goes on as alone."""
    model, tokenizer = attending
    short, other, long = prompts(tokenizer, 3)
    generator = MTPBatchGenerator(model, num_draft=2, prefill_step_size=8)
    uids = generator.insert([short, other], [40, 12], [make_cache(model), make_cache(model)])
    out: dict[int, list[int]] = {u: [] for u in uids}

    def step():
        for r in generator.next()[1]:
            out[r.uid].append(r.token)

    for _ in range(5):
        step()
    [late] = generator.insert([long], [10], [make_cache(model)])
    [row] = [r for r in generator._prefilling if r.uid == late]
    while not row.cache[0].offset:  # until the long prompt is in, in part
        step()
    caches = generator.remove([uids[0], late], return_prompt_caches=True)
    for _ in range(100):
        step()
    assert out[uids[1]] == [r.token for r in stream_generate(model, tokenizer, other, 12)]
    for cache, tokens in caches.values():
        assert 0 < len(tokens) and tokens == cache[-1].tokens
        rest = tokenizer.encode(" the end")
        fresh = [r.token for r in stream_generate(model, tokenizer, tokens + rest, 8, mtp=True)]
        again = stream_generate(model, tokenizer, rest, 8, prompt_cache=cache, mtp=True)
        assert [r.token for r in again] == fresh
    assert caches[late][1] == long[: len(caches[late][1])] and len(caches[late][1]) < len(long)


@pytest.mark.parametrize(
    ("flags", "mtp"),
    [
        ([], False),  # full batches: MTP loses on the CPU (see the README's table)
        (["--decode-concurrency", "1"], None),  # alone it pays: on if the checkpoint has it
        (["--mtp"], True),  # with every concurrency
        (["--no-mtp", "--decode-concurrency", "1"], False),
    ],
)
def test_server_mtp_switch(monkeypatch, flags, mtp):
    made = main_kwargs(monkeypatch, flags)  # the bundled demo model, which has the layer
    assert made["mtp"] is mtp
    assert made["decode_concurrency"] == (1 if "1" in flags else 8)


def test_mtp_none_follows_the_checkpoint(air_q4):
    """`mtp=None` (the server's default at concurrency 1) turns MTP on when the model has the
    layer, and off when it has none."""
    model, tokenizer = load(air_q4)
    engine = BatchEngine(model, tokenizer, mtp=None)
    try:
        assert engine.mtp is True
    finally:
        engine.close()
    model.model.layers = list(model.layers)  # the same model without its MTP layer
    assert model.mtp is None
    engine = BatchEngine(model, tokenizer, mtp=None)
    try:
        assert engine.mtp is False
    finally:
        engine.close()


def test_streamed_experts(air_q4):
    """Experts streamed from disk (two slots a layer): MTP in the batch, prompts prefilled layer
    by layer with their MTP pairs, gives plain decoding's tokens (the weights are the resident
    model's)."""
    resident, tokenizer = load(air_q4)
    model, _ = load(air_q4, expert_slots=2)
    asks = prompts(tokenizer, 3)
    expected = [[r.token for r in stream_generate(resident, tokenizer, p, 10)] for p in asks]
    engine = BatchEngine(model, tokenizer, decode_concurrency=3, mtp=True)
    try:
        events = [queue.SimpleQueue() for _ in asks]
        for p, q in zip(asks, events, strict=True):
            engine.submit(Request(p, 10, q.put, top_logprobs=0))
        assert [collect(q)[0] for q in events] == expected
        assert engine.metrics.draft_tokens_total > 0
    finally:
        engine.close()
