"""Layer-major prefill of streamed experts: the chunked prefill's KV cache and output, each expert
read about once per prompt, in the working memory `prefill.activation_bytes` states."""

import importlib
import json
import queue

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from mlx_glm4moe import load, mtp
from mlx_glm4moe import prefill as prefill_module
from mlx_glm4moe import streaming as st
from mlx_glm4moe.batch import BatchEngine, Request
from mlx_glm4moe.bench import streaming_row
from mlx_glm4moe.chat import PromptCache
from mlx_glm4moe.generate import stream_generate
from mlx_glm4moe.prefill import activation_bytes, prefill

# Bit-exact comparisons of float32 (and bfloat16 through float32) activations, and the
# allocator's peak memory: MLX's CPU (see conftest's `cpu`).
pytestmark = pytest.mark.usefixtures("cpu")

generation = importlib.import_module("mlx_glm4moe.generate")  # the package's name is a function
K = 2  # the tiny models' top-k: the minimum slot count
STEP = 32
RNG = np.random.default_rng(0)
FIRST, SECOND = RNG.integers(0, 380, 200).tolist(), RNG.integers(0, 380, 150).tolist()


def _turns(model, tokenizer, use_mtp: bool) -> tuple[list, list]:
    """Two turns on one prompt cache (the second from the first's cached prefix): their
    (token, logprobs) and the cache."""
    cache = mtp.make_cache(model, use_mtp)
    out = []
    for prompt in (FIRST, SECOND):
        for r in stream_generate(
            model, tokenizer, prompt, 6, prompt_cache=cache, prefill_step_size=STEP, mtp=use_mtp
        ):
            out.append((r.token, np.array(r.logprobs.astype(mx.float32))))
    return out, cache


@pytest.mark.parametrize("use_mtp", [False, True])
def test_layer_major_prefill_equals_chunked(air_q4, monkeypatch, use_mtp):
    """Streamed at the minimum slot count, with and without MTP, with a cached prefix: the same
    greedy tokens, logits and KV cache as the chunked prefill, to the bit on float32 activations
    (each token's rows are computed alone, whatever else is in its chunk)."""
    model, tokenizer = load(air_q4, expert_slots=K)
    layers, cache = _turns(model, tokenizer, use_mtp)
    read = st.stats(model).prefill_bytes_read
    # Today's prefill: chunk by chunk through every layer.
    for module in (generation, mtp):
        monkeypatch.setattr(module, "streams_experts", lambda model: False)
    model, tokenizer = load(air_q4, expert_slots=K)
    chunks, ref = _turns(model, tokenizer, use_mtp)
    assert [t for t, _ in layers] == [t for t, _ in chunks]
    for (_, a), (_, b) in zip(layers, chunks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(cache) == len(ref) == len(model.layers) + use_mtp
    for a, b in zip(cache, ref, strict=True):
        assert a.offset == b.offset
        for x, y in zip(a.state[:2], b.state[:2], strict=True):
            np.testing.assert_array_equal(np.array(x), np.array(y))
    assert read * 3 < st.stats(model).prefill_bytes_read


def test_quantized_kv_cache_equals_chunked(air_q4, monkeypatch):
    """With `kv_bits`, each layer's cache turns quantized after the chunk that passes the start,
    as in the chunked prefill: later chunks attend over the quantized cache alike."""
    prompt = mx.array(FIRST)
    runs = []
    for layer_major in (True, False):
        monkeypatch.setattr(generation, "streams_experts", lambda model, on=layer_major: on)
        model, _ = load(air_q4, expert_slots=K)
        cache = model.make_cache()
        quantize = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 64}
        steps = generation.generate_step(
            prompt, model, max_tokens=6, prompt_cache=cache, prefill_step_size=STEP, **quantize
        )
        runs.append(([(t, np.array(lp)) for t, lp in steps], cache))
    (ours, cache), (ref, ref_cache) = runs
    assert [t for t, _ in ours] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cache, ref_cache, strict=True):
        assert type(a) is type(b) is QuantizedKVCache and a.offset == b.offset
        for x, y in zip(
            nn.utils.tree_flatten(a.state), nn.utils.tree_flatten(b.state), strict=True
        ):
            np.testing.assert_array_equal(np.array(x[1]), np.array(y[1]))


def test_prefill_reads_each_expert_about_once(air_q4):
    """A 1,024-token prompt in 32-token chunks at the minimum slot count reads at most the
    checkpoint's routed-expert bytes (the chunked prefill read them once per chunk)."""
    model, _ = load(air_q4, expert_slots=K)
    size, layers = st.expert_bytes(air_q4, json.loads((air_q4 / "config.json").read_text()))
    experts = size * layers * model.args.n_routed_experts
    prompt = mx.array(RNG.integers(0, 380, 1024))
    prefill(model, prompt, model.make_cache(), STEP)
    assert 0 < st.stats(model).prefill_bytes_read <= experts
    model, _ = load(air_q4, expert_slots=K)
    cache = model.make_cache()
    with st.prefilling(model):
        for i in range(0, prompt.size, STEP):
            model(prompt[None, i : i + STEP], cache=cache)
    assert st.stats(model).prefill_bytes_read > 8 * experts


def test_prefill_memory_is_bounded_by_the_tokens_in_flight(air_q4):
    """Peak memory above the weights: the KV cache plus `activation_bytes` for the tokens in
    flight, at the minimum and at the full slot count (all pairs in one pass)."""
    config = json.loads((air_q4 / "config.json").read_text())
    for slots in (K, config["n_routed_experts"]):
        model, _ = load(air_q4, expert_slots=slots)
        mx.eval(model.parameters())
        for n in (512, 2048):
            cache = model.make_cache()
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            prefill(model, mx.array(RNG.integers(0, 380, n)), cache, STEP)
            kv = sum(a.nbytes for c in cache for a in c.state[:2])
            assert 0 < mx.get_peak_memory() - base - kv <= activation_bytes(model.args, n, STEP, n)


def test_server_engine_prefills_layer_major(air_q4):
    """The batch engine's new prompts, the second from the prompt cache's prefix: the tokens the
    resident model gives alone, each prompt reading the experts about once."""
    resident, tokenizer = load(air_q4)
    model, _ = load(air_q4, expert_slots=K)
    size, layers = st.expert_bytes(air_q4, json.loads((air_q4 / "config.json").read_text()))
    experts = size * layers * model.args.n_routed_experts
    engine = BatchEngine(model, tokenizer, prefill_step_size=STEP, prompt_cache=PromptCache(model))
    history = []
    try:
        for turn in (FIRST, SECOND):
            history += turn
            expected = [r.token for r in stream_generate(resident, tokenizer, history, 6)]
            events = queue.SimpleQueue()
            before = st.stats(model).prefill_bytes_read
            engine.submit(Request(list(history), 6, events.put))
            tokens = []
            while (event := events.get(timeout=120))["type"] == "token":
                tokens.append(event["token"])
            assert tokens == expected
            assert 0 < st.stats(model).prefill_bytes_read - before <= experts
            history += tokens
        assert event["usage"]["cached_tokens"] > len(FIRST)
    finally:
        engine.close()


def test_bench_streaming_measures_prefill_reads(air_q4):
    """`bench streaming --prompt-tokens N [--chunked STEP]`'s row: MB read per prompt token,
    about one read of the experts layer by layer, one per chunk before."""
    size, layers = st.expert_bytes(air_q4, json.loads((air_q4 / "config.json").read_text()))
    experts = size * layers * load(air_q4)[0].args.n_routed_experts / 1e6
    rows = {
        c: streaming_row(str(air_q4), K, 2, 0.0, prompt_tokens=512, chunked=c) for c in (None, 64)
    }
    for row in rows.values():
        assert row["prompt_tokens"] == 512 and row["prompt_tps"] > 0
        assert row["prefill_mb_per_token"] == pytest.approx(row["prefill_mb_read"] / 511)
    assert 0 < rows[None]["prefill_mb_read"] <= experts < 4 * experts < rows[64]["prefill_mb_read"]


@pytest.mark.parametrize("activations", ["native", "auto"])
def test_layer_major_prefill_on_bfloat16_weights(air_bf16_q4, monkeypatch, activations):
    """bfloat16 weights with "native" activations (the GPU's path, run on the CPU: the experts
    go through SwitchGLU's sorted dispatch over all of a layer's tokens at once) and with the
    CPU's float32 ones (the embeddings widened first): the same greedy tokens and logits as the
    chunked prefill (on the CPU to the bit)."""
    runs = []
    for layer_major in (True, False):
        for module in (generation, mtp):
            monkeypatch.setattr(module, "streams_experts", lambda model, on=layer_major: on)
        model, tokenizer = load(air_bf16_q4, expert_slots=K, activations=activations)
        runs.append(_turns(model, tokenizer, use_mtp=False)[0])
    (ours, ref) = runs
    assert [t for t, _ in ours] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_prompts_longer_than_the_span(air_q4, monkeypatch):
    """A prompt of two and a half spans (48-token spans, 16-token attention chunks): the same KV
    caches, hidden states and MTP cache as one span holding it all, to the bit (a span boundary
    off by one drops or repeats a token)."""
    model, _ = load(air_q4, expert_slots=K)
    prompt = mx.array(np.random.default_rng(1).integers(0, 380, 120))
    runs = []
    for span in (48, prefill_module.SPAN):
        monkeypatch.setattr(prefill_module, "SPAN", span)  # prefill_mtp's
        cache, mtp_cache = model.make_cache(), mtp.make_cache(model, True)[-1]
        hidden = prefill(model, prompt, cache, 16, hidden=True, span=span)
        prefill_module.prefill_mtp(model, prompt[1:], hidden[:, :-1], mtp_cache, 16)
        runs.append((np.array(hidden), [*cache, mtp_cache]))
    (hidden, caches), (ref_hidden, ref_caches) = runs
    assert hidden.shape == (1, 120, model.args.hidden_size)
    np.testing.assert_array_equal(hidden, ref_hidden)
    offsets = [120] * len(model.layers) + [119]  # the MTP layer's pairs: one fewer
    assert [c.offset for c in caches] == [c.offset for c in ref_caches] == offsets
    for a, b in zip(caches, ref_caches, strict=True):
        for x, y in zip(a.state[:2], b.state[:2], strict=True):
            np.testing.assert_array_equal(np.array(x), np.array(y))
