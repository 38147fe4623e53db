"""MTP speculative decoding: greedy output identical to plain decoding, caches left as plain
decoding leaves them, and an unchanged distribution when sampling."""

import json
import math
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, trim_prompt_cache

from mlx_glm4moe.cli import generate_main as main
from mlx_glm4moe.convert import convert
from mlx_glm4moe.generate import encode, stream_generate
from mlx_glm4moe.loading import load
from mlx_glm4moe.models.glm4_moe import Model, ModelArgs
from mlx_glm4moe.mtp import (
    MTPStats,
    RejectionSampling,
    make_cache,
    mtp_generate_step,
)
from mlx_glm4moe.synthetic import make_agreeing_checkpoint

# Bit-exact comparisons of float32 activations: MLX's CPU (see conftest's `cpu`).
pytestmark = pytest.mark.usefixtures("cpu")


@pytest.fixture(scope="module")
def random_models(air_f32, air_q4):
    """Random weights: the MTP layer almost never agrees."""
    return {"f32": load(air_f32), "q4": load(air_q4)}


def _agreeing(
    tmp_path_factory,
    agreement,
    quantize=False,
    layout="glm45",
    dtype=None,
    activations="auto",
    preset="air",
):
    root = tmp_path_factory.mktemp(f"agree{agreement}")
    hf = make_agreeing_checkpoint(root / "hf", agreement, preset, layout=layout)
    path = convert(str(hf), str(hf.parent / "mlx"), quantize=quantize, dtype=dtype)
    fixture = json.loads((hf / "config.json").read_text())["mtp_fixture"]
    return (*load(path, activations=activations), fixture)


@pytest.fixture(scope="module")
def agree_all(tmp_path_factory):
    return _agreeing(tmp_path_factory, 1.0)


@pytest.fixture(scope="module")
def agree_all_q4(tmp_path_factory):
    return _agreeing(tmp_path_factory, 1.0, quantize=True)


@pytest.fixture(scope="module")
def agree_all_glm46(tmp_path_factory):
    """GLM-4.6's layout: drafts agree only if the MTP layer reads the main embedding and head."""
    return _agreeing(tmp_path_factory, 1.0, quantize=True, layout="glm46")


@pytest.fixture(scope="module")
def agree_half(tmp_path_factory):
    return _agreeing(tmp_path_factory, 0.5)


@pytest.fixture(scope="module")
def agree_half_lite(tmp_path_factory):
    """GLM-4.7-Flash's architecture (latent attention), at 4 bits."""
    return _agreeing(tmp_path_factory, 0.5, quantize=True, preset="lite")


@pytest.fixture(scope="module")
def agree_half_native(tmp_path_factory):
    """bfloat16 activations (4-bit, bfloat16 scales), as on a GPU."""
    return _agreeing(tmp_path_factory, 0.5, True, dtype="bfloat16", activations="native")


def run(model, tokenizer, prompt, max_tokens, cache=None, **kwargs):
    rs = list(stream_generate(model, tokenizer, prompt, max_tokens, prompt_cache=cache, **kwargs))
    return [r.token for r in rs], rs


def offset(cache):
    return cache[0].offset


def check_same_as_plain(model, tokenizer, prompt, max_tokens, num_draft, **kwargs):
    """MTP and plain greedy decoding give the same tokens and leave the same main cache."""
    plain_cache, mtp_cache = model.make_cache(), make_cache(model)
    plain, _ = run(model, tokenizer, prompt, max_tokens, plain_cache, **kwargs)
    spec, rs = run(
        model, tokenizer, prompt, max_tokens, mtp_cache, mtp=True, num_draft=num_draft, **kwargs
    )
    assert spec == plain
    assert rs[-1].finish_reason in ("stop", "length")
    assert offset(mtp_cache) == offset(plain_cache)
    # The MTP part: the sequence's tokens, and KV entries only for pairs it has seen.
    assert mtp_cache[-1].tokens == (encode(tokenizer, prompt) + spec)[: offset(plain_cache)]
    assert mtp_cache[-1].offset <= offset(plain_cache) - 1
    return rs


@pytest.mark.parametrize("quant", ["f32", "q4"])
def test_greedy_matches_plain_on_random_weights(random_models, quant):
    model, tokenizer = random_models[quant]
    rng = random.Random(0)
    for _ in range(8):
        prompt = [rng.randrange(380) for _ in range(rng.randrange(1, 12))]
        check_same_as_plain(model, tokenizer, prompt, rng.randrange(1, 24), rng.choice([1, 2]))


def test_greedy_matches_plain_on_native_bfloat16(air_bf16_q4, air_bf16):
    """The GPU's code path: bfloat16 activations, no staging. Bit-exact here because MLX's CPU
    kernels compute each token row alone; a GPU's batched kernels may round a verify pass of
    several tokens differently from one-token steps, so there MTP equals plain greedy except
    at near-ties (only float32 activations make it exact by construction)."""
    rng = random.Random(2)
    for path in (air_bf16_q4, air_bf16):
        model, tokenizer = load(path, activations="native")
        for _ in range(3):
            prompt = [rng.randrange(380) for _ in range(rng.randrange(1, 80))]
            check_same_as_plain(model, tokenizer, prompt, rng.randrange(1, 16), rng.choice([1, 2]))


@pytest.mark.parametrize(
    "fixture",
    [
        "agree_all",
        "agree_all_q4",
        "agree_all_glm46",
        "agree_half",
        "agree_half_native",
        "agree_half_lite",
    ],
)
def test_greedy_matches_plain_when_drafts_agree(fixture, request):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    rng = random.Random(1)
    drafted = 0
    for _ in range(6):
        prompt = tokenizer.encode(rng.choice(["Hello", "The quick brown fox", "def add(a, b):"]))
        rs = check_same_as_plain(
            model, tokenizer, prompt, rng.randrange(2, 40), rng.choice([1, 2, 3])
        )
        drafted += sum(r.from_draft for r in rs)
        stats = rs[-1].mtp_stats
        assert rs[-1].mtp_acceptance == stats["acceptance"]
        assert sum(r.from_draft for r in rs) <= sum(stats["accepted"])
    assert drafted > 20


def simulate(first, max_tokens, k, fixture):
    """The loop's expected draft counts on an agreeing fixture, by hand: greedy walks the cycle;
    a draft made from a 'wrong' token skips one step."""
    cycle, wrong = fixture["cycle"], set(fixture["wrong"])
    succ = dict(zip(cycle, cycle[1:] + cycle[:1], strict=True))
    stats, out, y = MTPStats(k), [], first
    while True:
        out.append(y)
        n = min(k, max_tokens - len(out))
        if n <= 0:
            return out, stats
        d, t, a = y, y, 0
        for i in range(n):
            d = succ[succ[d]] if d in wrong else succ[d]
            t = succ[t]
            a += a == i and d == t
        stats.record(n, a)
        for _ in range(a):
            y = succ[y]
            out.append(y)
        y = succ[y]


@pytest.mark.parametrize("num_draft", [1, 2])
def test_acceptance_is_the_designed_fraction(agree_half, num_draft):
    model, tokenizer, fixture = agree_half
    prompt = tokenizer.encode("The quick brown fox")
    tokens, rs = run(model, tokenizer, prompt, 60, mtp=True, num_draft=num_draft)
    expected_tokens, expected = simulate(tokens[0], 60, num_draft, fixture)
    assert tokens == expected_tokens
    stats = rs[-1].mtp_stats
    assert (stats["drafted"], stats["accepted"]) == (expected.drafted, expected.accepted)
    assert 0.2 < stats["acceptance"] < 0.8
    assert stats["tokens_per_pass"] > 1.2


@pytest.mark.parametrize("fixture", ["agree_all", "agree_all_glm46"])
def test_full_agreement_chains(fixture, request):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    tokens, rs = run(model, tokenizer, "Hello", 61, mtp=True, num_draft=2)
    stats = rs[-1].mtp_stats
    assert stats["acceptance_per_position"] == [1.0, 1.0]
    assert stats["tokens_per_pass"] == pytest.approx(61 / 21)  # the first pass is the prompt's
    assert [r.from_draft for r in rs[1:7]] == [True, True, False, True, True, False]


@pytest.mark.parametrize("fixture", ["agree_all", "agree_all_q4"])
def test_max_tokens_inside_an_accepted_block(fixture, request):
    model, tokenizer, _ = request.getfixturevalue(fixture)
    for max_tokens in range(1, 9):
        rs = check_same_as_plain(model, tokenizer, "Hello", max_tokens, num_draft=3)
        assert len(rs) == max_tokens and rs[-1].finish_reason == "length"


def test_stops_on_every_eos_id_inside_a_block(agree_all):
    model, tokenizer, _ = agree_all
    plain, _ = run(model, tokenizer, "Hello", 8)
    for eos in tokenizer.eos_token_ids:
        for position in (2, 3, 4):
            # Greedy, except that the token at `position` becomes this stop id; drafts use the
            # same sampler, so the stop id arrives as an accepted draft.
            def sampler(logprobs, x=plain[position], eos=eos):
                y = mx.argmax(logprobs, axis=-1)
                return mx.where(y == x, eos, y)

            rs = check_same_as_plain(model, tokenizer, "Hello", 20, 2, sampler=sampler)
            assert [r.token for r in rs] == plain[:position] + [eos]
            assert rs[-1].finish_reason == "stop"
            assert rs[-1].from_draft == (position % 3 != 0)


def test_prompt_cache_turns_and_trims(agree_half, random_models):
    for model, tokenizer, *_ in (agree_half, random_models["f32"]):
        plain_cache, mtp_cache = model.make_cache(), make_cache(model)
        for turn, prompt in enumerate(["Hello", " world", "The quick", "!"]):
            if turn == 2:  # drop the end of the cache, as a server does with a shared prefix
                assert trim_prompt_cache(plain_cache, 5) == trim_prompt_cache(mtp_cache, 5)
            plain, _ = run(model, tokenizer, tokenizer.encode(prompt), 9, plain_cache)
            spec, _ = run(model, tokenizer, tokenizer.encode(prompt), 9, mtp_cache, mtp=True)
            assert spec == plain
            assert offset(mtp_cache) == offset(plain_cache)
            assert len(mtp_cache[-1].tokens) == offset(plain_cache)


def test_bad_caches_and_settings_are_refused(random_models):
    model, tokenizer = random_models["f32"]
    with pytest.raises(ValueError, match="make_cache"):
        run(model, tokenizer, "Hi", 4, model.make_cache(), mtp=True)
    with pytest.raises(ValueError, match="mtp=True"):
        run(model, tokenizer, "Hi", 4, make_cache(model))
    cache = make_cache(model)
    run(model, tokenizer, "Hi", 4, cache, mtp=True)
    cache[0].trim(1)  # the main part moved without the MTP part
    with pytest.raises(ValueError, match="out of step"):
        run(model, tokenizer, "Hi", 4, cache, mtp=True)
    with pytest.raises(ValueError, match="num_draft"):
        run(model, tokenizer, "Hi", 4, mtp=True, num_draft=0)


def test_cli(air_f32, capsys):
    main(["--model", str(air_f32), "-p", "Hi", "-m", "6", "--mtp", "--num-draft", "2"])
    assert "tokens per forward pass" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(air_f32), "--num-draft", "0"])


def tiny_model(vocab=5):
    """A one-layer model on a tiny vocabulary, with sharp, different main and draft
    distributions."""
    args = ModelArgs.from_dict(
        dict(
            model_type="glm4_moe",
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            num_nextn_predict_layers=1,
        )
    )
    mx.random.seed(3)
    model = Model(args)
    model.lm_head.weight = 3 * mx.random.normal(model.lm_head.weight.shape) / math.sqrt(32)
    head = model.mtp.shared_head.head
    head.weight = 3 * mx.random.normal(head.weight.shape) / math.sqrt(32)
    mx.eval(model.parameters())
    return model


def chi2_threshold(df, z=3.7):
    """Wilson-Hilferty: the chi-square quantile at about p = 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_rejection_sampling_keeps_the_distribution():
    """Many 3-token continuations with two drafts per step: the joint distribution of tokens 2
    and 3 (drafted, resampled or bonus) matches the main model's, computed exactly. (Drawing
    rejected positions from p instead of the residual gives chi2 ~190 against a threshold of
    ~37 at n = 800; keeping every draft, ~60000.)"""
    model, temp, prompt = tiny_model(), 1.0, [1, 4, 2]
    V = model.args.vocab_size

    def probs(tokens):
        return np.array(nn.softmax(model(mx.array(tokens)[None])[0, -1] / temp))

    p1 = probs(prompt)
    exact = np.zeros((V, V))
    for a in range(V):
        p2 = probs(prompt + [a])
        for b in range(V):
            exact[b] += p1[a] * p2[b] * probs(prompt + [a, b])

    mx.random.seed(0)
    n, counts, stats = 500, np.zeros((V, V)), MTPStats(2)
    for _ in range(n):
        steps = mtp_generate_step(
            prompt,
            model,
            max_tokens=3,
            num_draft=2,
            sampling=RejectionSampling(temp),
            stats=stats,
        )
        tokens = [t for t, _, _ in steps]
        counts[tokens[1], tokens[2]] += 1
    expected = exact * n
    keep = expected > 5
    chi2 = ((counts - expected)[keep] ** 2 / expected[keep]).sum()
    assert chi2 < chi2_threshold(keep.sum() - 1)
    # Both the accepting and the rejecting branch ran.
    assert 0.1 < stats.acceptance < 0.9


def test_mtp_cache_pairs_each_token_with_the_previous_hidden_state(random_models):
    """After chunked prefill and blocks of accepted and rejected drafts, the MTP layer's KV
    cache equals one built in a single pass over the final sequence: entry p from (t_{p+1},
    h_p)."""
    model, tokenizer = random_models["f32"]

    def sampler(logprobs):  # three tokens only, so that drafts are often accepted
        return mx.argmax(logprobs, axis=-1) % 3 + 10

    cache = make_cache(model)
    prompt = "The quick brown fox jumps"
    kwargs = dict(mtp=True, num_draft=2, sampler=sampler, prefill_step_size=3)
    _, rs = run(model, tokenizer, prompt, 30, cache, **kwargs)
    _, rs = run(model, tokenizer, " over", 20, cache, **kwargs)
    assert 0 < rs[-1].mtp_stats["acceptance"] < 1
    mcache = cache[-1]
    seq = mx.array(mcache.tokens)[None]
    _, h = model(seq, return_hidden=True)
    ref = KVCache()
    model.mtp.predict(seq[:, 1:], h[:, :-1], ref)
    m = mcache.offset
    assert m >= seq.shape[1] - 4
    for got, want in ((mcache.keys, ref.keys), (mcache.values, ref.values)):
        assert mx.allclose(got[..., :m, :], want[..., :m, :], atol=1e-4).item()
