"""GLM-5, 5.1 and 5.2 (`glm_moe_dsa`): float32 logits against transformers' GlmMoeDsaForCausalLM
on synthetic checkpoints in the real layout, with every layer indexed (GLM-5) and with
IndexShare (GLM-5.2), for a whole prompt and token by token through the cache, on sequences
longer than `index_topk` so that the selection decides what attention sees; the prompt scored
in blocks with bounded memory; the latent norms' epsilon; the published shapes' parameter counts;
the converter (FP8 sources, `-q`, mlx-lm); MTP, expert streaming, the prompt cache and batching
on this architecture."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file
from test_lite import runs_everywhere
from transformers import AutoModelForCausalLM, GlmMoeDsaConfig, GlmMoeDsaForCausalLM

from mlx_glm4moe import load
from mlx_glm4moe.convert import convert
from mlx_glm4moe.models import build, glm_moe_dsa, mla, model_args
from mlx_glm4moe.synthetic import make_checkpoint

IDS = np.random.default_rng(0).integers(0, 380, size=(2, 40))
PROMPT = 16  # decoding steps through the cache start after this many tokens (index_topk: 8)


@pytest.fixture(scope="module", params=["glm5", "glm52"])
def dsa_hf(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def hf_logits(path) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def reference(dsa_hf):
    return hf_logits(dsa_hf)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)))


def prefill_and_decode(model) -> tuple[np.ndarray, np.ndarray]:
    """The logits of one pass over IDS, and of a prompt then one token at a time."""
    cache = model.make_cache()
    steps = [model(mx.array(IDS[:, :PROMPT]), cache=cache)]
    steps += [model(mx.array(IDS[:, t : t + 1]), cache=cache) for t in range(PROMPT, IDS.shape[1])]
    return logits(model), np.array(mx.concatenate(steps, axis=1))


@pytest.mark.parametrize("converted", [False, True], ids=["raw", "converted"])
def test_prefill_and_decode_match_transformers(dsa_hf, reference, converted, tmp_path):
    path = convert(str(dsa_hf), str(tmp_path / "f32")) if converted else dsa_hf
    model, _ = load(path)
    assert model.mtp is not None and "indexer" in model.mtp.self_attn
    full, decoded = prefill_and_decode(model)
    print(
        f"{dsa_hf.name} {'converted' if converted else 'raw'}: max |ours - transformers| "
        f"prefill {np.abs(full - reference).max():.2e}, "
        f"decode {np.abs(decoded - reference).max():.2e}"
    )
    assert np.abs(full - reference).max() <= 1e-4
    assert np.abs(decoded - reference).max() <= 1e-4
    assert np.abs(reference).max() > 1.0  # not two near-zero tensors


def with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_the_selection_decides_what_attention_sees(dsa_hf, reference, tmp_path):
    """With every position selected (index_topk above the length) the first index_topk
    positions, which see fewer positions than that anyway, are unchanged; every later one
    changes."""
    model, _ = load(with_config(dsa_hf, tmp_path / "dense", index_topk=IDS.shape[1]))
    dense = logits(model)
    topk = json.loads((dsa_hf / "config.json").read_text())["index_topk"]
    assert np.abs(dense[:, :topk] - reference[:, :topk]).max() <= 1e-4
    assert (np.abs(dense - reference).max(axis=-1)[:, topk:] > 1e-2).all()


def test_shared_layers_have_no_indexer_and_reuse_the_selection(tmp_path):
    path = make_checkpoint(tmp_path, "glm52")
    names = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    model, _ = load(path)
    for i, kind in enumerate(model.args.indexer_types):
        assert kind == ("full", "shared")[i % 2]
        assert ("indexer" in model.layers[i].self_attn) == (kind == "full")
        assert (f"model.layers.{i}.self_attn.indexer.wk.weight" in names) == (kind == "full")
    with pytest.raises(ValueError, match="selection"):
        model.layers[1].self_attn(mx.zeros((1, 12, 64)), "causal", None, {})


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"index_topk_freq": 4, "index_skip_topk_offset": 3},
        {"index_topk_freq": 3, "index_skip_topk_offset": 1},
        {"index_topk_pattern": "FSSFFSFS"},
        {"index_topk_pattern": ["full", "shared"] * 4},
        {"indexer_types": ["full"] * 3 + ["shared"] * 5},
    ],
)
def test_indexer_types_are_derived_as_transformers_derives_them(keys):
    config = {**json.loads(json.dumps(PUBLISHED)), "num_hidden_layers": 8, **keys}
    theirs = GlmMoeDsaConfig(**config).indexer_types
    assert model_args(config).indexer_types == theirs


def test_a_prompt_scored_in_blocks_gives_the_same_logits(dsa_hf, monkeypatch):
    """Blocks of 3 query rows (the last one short), through the cache and in one pass."""
    model, _ = load(dsa_hf)
    whole = prefill_and_decode(model)
    monkeypatch.setattr(glm_moe_dsa, "SCORE_BUDGET", 3 * IDS.shape[0] * IDS.shape[1] * 16)
    assert glm_moe_dsa.block_rows(2, IDS.shape[1], 16) == 3
    for a, b in zip(prefill_and_decode(model), whole, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_prefill_memory_stays_within_the_score_budget(tmp_path, monkeypatch):
    """A 1024-token prompt on the CPU through 64 attention and 64 indexer heads (GLM-5's 64):
    in blocks of 2^16 scores (1 row) the peak working memory is the activations, linear in the
    prompt, plus one block's intermediates, under a fifth of what scoring the whole prompt at
    once takes (which is more than the indexer's [heads, L, T] scores). Without an evaluation
    per block the backend queues later blocks while one runs, and the peak is higher."""
    L, heads = 1024, 64
    path = make_checkpoint(
        tmp_path, "glm5", num_attention_heads=heads, num_key_value_heads=heads, index_n_heads=heads
    )
    model, _ = load(path, lazy=False)
    ids = mx.array(np.random.default_rng(1).integers(0, 380, size=(1, L)))

    def peak(budget: int) -> int:
        monkeypatch.setattr(glm_moe_dsa, "SCORE_BUDGET", budget)
        with mx.stream(mx.cpu):
            cache = model.make_cache()
            mx.eval(model(ids[:, :1], cache=cache))  # the weights are read outside the window
            mx.synchronize()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(model.model(ids[:, 1:], cache=cache))
            return mx.get_peak_memory() - base

    bounded, whole = peak(1 << 16), peak(1 << 40)
    print(f"peak: {bounded / 2**20:.1f} MiB in blocks, {whole / 2**20:.1f} MiB whole")
    assert whole > heads * L * L * 4
    assert bounded < whole / 5


@pytest.mark.parametrize(
    "preset,module,eps,inputs",
    [
        ("lite", mla, "LORA_NORM_EPS", ("kv_a_proj_with_mqa.weight", "q_a_proj.weight")),
        ("glm5", mla, "LORA_NORM_EPS", ("kv_a_proj_with_mqa.weight", "q_a_proj.weight")),
        ("glm5", glm_moe_dsa, "INDEXER_NORM_EPS", ("indexer.wk.weight",)),
    ],
    ids=["lite-latent", "glm5-latent", "glm5-indexer-keys"],
)
def test_norms_use_transformers_epsilon(preset, module, eps, inputs, tmp_path, monkeypatch):
    """The latent attention's two norms (GLM-4.7-Flash and GLM-5 share it) and the indexer's
    key norm, with the projections into them scaled down 1000x: their inputs' mean squares
    (~1e-6) are then of the order of the epsilon, so 1e-6 against 1e-5 (rms_norm_eps; mlx-lm's
    LayerNorm default) moves the logits far beyond the parity bound."""
    src = make_checkpoint(tmp_path / "hf", preset)
    for shard in src.glob("model-*.safetensors"):
        tensors = load_file(shard)
        for name in tensors:
            if name.endswith(inputs):
                tensors[name] = tensors[name] * np.float32(1e-3)
        save_file(tensors, shard, metadata={"format": "pt"})
    expected = hf_logits(src)
    model, _ = load(src)
    assert np.abs(logits(model) - expected).max() <= 1e-4
    monkeypatch.setattr(module, eps, 1e-5)
    model, _ = load(src)
    assert np.abs(logits(model) - expected).max() > 1e-2


# GLM-5's config.json fields (zai-org/GLM-5, as issue 29 lists them), with the nextn layer.
PUBLISHED = dict(
    model_type="glm_moe_dsa",
    architectures=["GlmMoeDsaForCausalLM"],
    vocab_size=154880,
    hidden_size=6144,
    intermediate_size=12288,
    moe_intermediate_size=2048,
    num_hidden_layers=78,
    num_nextn_predict_layers=1,
    num_attention_heads=64,
    num_key_value_heads=64,
    head_dim=64,
    q_lora_rank=2048,
    kv_lora_rank=512,
    qk_nope_head_dim=192,
    qk_rope_head_dim=64,
    v_head_dim=256,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    routed_scaling_factor=2.5,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    first_k_dense_replace=3,
    index_topk=2048,
    index_head_dim=128,
    index_n_heads=32,
    rms_norm_eps=1e-5,
    attention_bias=False,
    tie_word_embeddings=False,
    max_position_embeddings=202752,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
# GLM-5.2: IndexShare with 21 full layers of 78 (the count; derived here from
# index_topk_freq 4 and offset 3, which gives layers 0, 1, 2, 6, ..., 74), rope theta 8e6,
# 1,048,576 positions, head_dim 192 (as meaningless as GLM-5's 64).
PUBLISHED_52 = dict(
    PUBLISHED,
    head_dim=192,
    index_topk_freq=4,
    index_skip_topk_offset=3,
    max_position_embeddings=1048576,
    rope_parameters={"rope_type": "default", "rope_theta": 8000000.0},
)


@pytest.mark.parametrize(
    "config,billions,mtp",
    [(PUBLISHED, 743.9, 10.0), (PUBLISHED_52, 743.4, 10.0)],
    ids=["GLM-5", "GLM-5.2"],
)
def test_published_configs_have_transformers_parameter_count_plus_the_mtp_layer(
    config, billions, mtp
):
    """Ours built lazily (shapes only), transformers' on the meta device. transformers keeps
    the router's correction bias as a buffer and has no nextn layer, which (as GLM-4.6's on)
    uses the main model's embedding and head."""
    args = model_args(config)
    args.mtp_own_embeddings = False  # what loading finds in GLM-5's weights
    assert args.indexer_types.count("full") == (78 if config is PUBLISHED else 21)
    params = dict(tree_flatten(build(args).parameters()))
    mtp_prefix = f"model.layers.{args.num_hidden_layers}."
    ours = sum(p.size for k, p in params.items() if not k.startswith(mtp_prefix))
    nextn = sum(p.size for k, p in params.items() if k.startswith(mtp_prefix))
    with torch.device("meta"):
        theirs = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**config)).num_parameters()
    moe_layers = args.num_hidden_layers - args.first_k_dense_replace
    assert ours - args.n_routed_experts * moe_layers == theirs
    print(f"{config['head_dim']}: {theirs / 1e9:.2f} B + nextn {nextn / 1e9:.2f} B")
    assert round(theirs / 1e9, 1) == billions
    assert round(nextn / 1e9, 1) == mtp


@pytest.fixture(scope="module")
def glm5_hf(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("glm5-hf"), "glm5")


@pytest.mark.parametrize("quant", [None, "4bit"])
def test_glm5_conversions_load_in_mlx_lm_with_the_same_logits(glm5_hf, quant, tmp_path):
    """mlx-lm drops the MTP layer and runs the indexer's key norm at 1e-5, not transformers' (and
    our) 1e-6: the logits agree to that difference."""
    out = convert(str(glm5_hf), str(tmp_path / "out"), quant_recipe=quant)
    ours, _ = load(out)
    theirs, _ = mlx_lm.load(str(out))
    diff = np.abs(logits(ours) - logits(theirs)).max()
    print(f"glm5 {quant}: max |ours - mlx-lm| {diff:.2e}")
    assert diff <= 1e-4


def test_glm52_conversions_are_ours_alone(tmp_path):
    """mlx-lm has no IndexShare: it asks for the indexers the shared layers do not have."""
    out = convert(str(make_checkpoint(tmp_path / "hf", "glm52")), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.indexer"):
        mlx_lm.load(str(out))


def test_quantized_conversion_keeps_the_router_indexer_weights_and_norms_precise(glm5_hf, tmp_path):
    out = convert(str(glm5_hf), str(tmp_path / "q4"), quantize=True, dtype="bfloat16")
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(mx.load(str(f)))
    for i in range(4):  # the nextn layer's indexer too
        p = f"model.layers.{i}.self_attn.indexer"
        assert tensors[f"{p}.weights_proj.weight"].dtype == mx.float32
        assert f"{p}.weights_proj.scales" not in tensors
        assert f"{p}.wk.scales" in tensors  # (wq_b's 32 inputs are no group of 64 here)
        assert tensors[f"{p}.k_norm.bias"].dtype == mx.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == mx.float32
    assert not any(k.endswith("norm.scales") for k in tensors)


def test_fp8_source_matches_transformers_on_its_dequantized_weights(glm5_hf, tmp_path):
    """GLM-5-FP8's layout: 128x128 block FP8 (here 32x48 blocks, partial at the edges) for the
    attention's and indexer's projections (wq_b, wk) and the experts; weights_proj, norms,
    router, embedding, head and the nextn layer's eh_proj stay as they were. transformers runs
    the float32 checkpoint of exactly the dequantized weights."""
    from test_convert import _fp8

    block = (32, 48)
    keep = ("weights_proj.weight", "mlp.gate.weight", "eh_proj.weight")
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    shutil.copytree(glm5_hf, fp8_dir)
    shutil.copytree(glm5_hf, ref_dir)
    index = json.loads((glm5_hf / "model.safetensors.index.json").read_text())
    quantized = set()
    for shard in sorted(glm5_hf.glob("model-*.safetensors")):
        fp8, ref = {}, {}
        for name, w in load_torch_file(shard).items():
            if w.ndim != 2 or "embed" in name or "head" in name or name.endswith(keep):
                fp8[name] = ref[name] = w
                continue
            fp8[name], fp8[f"{name}_scale_inv"], ref[name] = _fp8(w, block)
            index["weight_map"][f"{name}_scale_inv"] = shard.name
            quantized.add(name)
        save_torch_file(fp8, fp8_dir / shard.name, metadata={"format": "pt"})
        save_torch_file(ref, ref_dir / shard.name, metadata={"format": "pt"})
    assert "model.layers.0.self_attn.indexer.wq_b.weight" in quantized
    assert "model.layers.0.self_attn.indexer.wk.weight" in quantized
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((glm5_hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    out = convert(str(fp8_dir), str(tmp_path / "out"), dtype="float32")
    model, _ = load(out)
    assert np.abs(logits(model) - hf_logits(ref_dir)).max() <= 1e-4


# What the other architectures have, on this one. The test modules' own checks are reused.
@pytest.fixture(scope="module", params=["glm5", "glm52"])
def dsa_q4(request, tmp_path_factory):
    """4-bit, 16 routed experts (what test_streaming's check expects), with the MTP layer."""
    root = tmp_path_factory.mktemp(f"{request.param}-q4")
    hf = make_checkpoint(root / "hf", request.param, n_routed_experts=16)
    return convert(str(hf), str(root / "q4"), quantize=True)


def test_mtp_greedy_matches_plain(dsa_q4):
    """Verification passes of 2-4 tokens over a context beyond index_topk (the masked path)."""
    from test_mtp import check_same_as_plain

    model, tokenizer = load(dsa_q4)
    for text, n, k in (("Hello, world! How are you", 20, 1), ("def add(a, b):", 14, 3)):
        check_same_as_plain(model, tokenizer, tokenizer.encode(text), n, k)


def test_mtp_acceptance_is_the_designed_fraction(tmp_path):
    """GLM-5.2's schedule, an MTP layer right on half the tokens: the draft counts the loop
    must give, by hand (test_mtp's `simulate`)."""
    from test_mtp import run, simulate

    from mlx_glm4moe.synthetic import make_agreeing_checkpoint

    path = make_agreeing_checkpoint(tmp_path, 0.5, "glm52")
    fixture = json.loads((path / "config.json").read_text())["mtp_fixture"]
    model, tokenizer = load(path)
    tokens, rs = run(model, tokenizer, tokenizer.encode("The quick brown fox"), 40, mtp=True)
    expected_tokens, expected = simulate(tokens[0], 40, 1, fixture)
    assert tokens == expected_tokens
    stats = rs[-1].mtp_stats
    assert (stats["drafted"], stats["accepted"]) == (expected.drafted, expected.accepted)
    assert 0.2 < stats["acceptance"] < 0.8


def test_expert_streaming_gives_the_same_output(dsa_q4):
    from test_streaming import check_streaming_equals_resident

    check_streaming_equals_resident(dsa_q4)


@pytest.mark.parametrize("use_mtp", [False, True])
def test_layer_major_prefill_equals_chunked(dsa_q4, monkeypatch, use_mtp):
    """Streamed experts prefill layer by layer: shared-indexer layers take each chunk's
    selection from the full layer before them there too."""
    from test_prefill import _turns, generation

    from mlx_glm4moe import mtp

    model, tokenizer = load(dsa_q4, expert_slots=2)
    layers, cache = _turns(model, tokenizer, use_mtp)
    for module in (generation, mtp):
        monkeypatch.setattr(module, "streams_experts", lambda model: False)
    chunks, ref = _turns(*load(dsa_q4, expert_slots=2), use_mtp)
    assert [t for t, _ in layers] == [t for t, _ in chunks]
    for (_, a), (_, b) in zip(layers, chunks, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cache, ref, strict=True):
        for x, y in zip(a.state[:2], b.state[:2], strict=True):
            np.testing.assert_array_equal(np.array(x), np.array(y))


def test_the_prompt_cache_on_disk_restores_latents_and_indexer_keys(dsa_q4, tmp_path):
    from test_prompt_cache import MESSAGES, recording

    from mlx_glm4moe.chat import PromptCache, chat

    model, tok = load(dsa_q4)
    cold_logits, logits = [], []
    cold = chat(model, tok, MESSAGES, max_tokens=8, sampler=recording(cold_logits))
    pc = PromptCache(model, directory=tmp_path)
    chat(model, tok, MESSAGES, max_tokens=8, prompt_cache=pc)
    pc.flush()
    restarted = PromptCache(model, directory=tmp_path)
    again = chat(
        model, tok, MESSAGES, max_tokens=8, prompt_cache=restarted, sampler=recording(logits)
    )
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["content"] == cold["content"]
    for x, y in zip(logits, cold_logits, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_left_padded_row_equals_the_row_alone(dsa_hf):
    """mlx-lm's BatchKVCache: a 5-token row padded to 24 beside a 24-token one. It has fewer
    positions than index_topk (8) for its first steps, so the indexer's choice includes padding,
    which the mask must keep out of attention."""
    from mlx_lm.models.cache import BatchKVCache

    model, _ = load(dsa_hf)
    short, other = IDS[0, :5], IDS[1, :24]
    steps = IDS[:, 30:36]
    alone = model.make_cache()
    expected = [model(mx.array(short)[None], cache=alone)[:, -1]]
    expected += [model(mx.array(steps[:1, t : t + 1]), cache=alone)[:, -1] for t in range(6)]
    cache = [BatchKVCache(left_padding=[19, 0]) for _ in model.layers]
    padded = np.stack([np.concatenate([np.zeros(19, IDS.dtype), short]), other])
    got = [model(mx.array(padded), cache=cache)[:1, -1]]
    got += [model(mx.array(steps[:, t : t + 1]), cache=cache)[:1, -1] for t in range(6)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=0)


def test_batched_equals_alone(dsa_q4):
    """Left-padded rows: padding is masked out of the indexer's choice and of attention, even
    in a row with fewer positions than index_topk (8) beside longer ones."""
    from test_batch import Collector, alone, prompts

    from mlx_glm4moe.batch import BatchEngine

    model, tokenizer = load(dsa_q4)
    asks, max_tokens = [tokenizer.encode("Hi")] + prompts(tokenizer, 3), [10, 4, 12, 7]
    expected = [alone(model, tokenizer, p, m) for p, m in zip(asks, max_tokens, strict=True)]
    engine = BatchEngine(model, tokenizer, decode_concurrency=4, prefill_step_size=16)
    try:
        collectors = [Collector(p, m) for p, m in zip(asks, max_tokens, strict=True)]
        for c in collectors:
            engine.submit(c.request)
        assert [c.result()[0] for c in collectors] == expected
    finally:
        engine.close()


def test_generate_server_and_report_run_a_glm5_model(glm5_hf, tmp_path, capsys):
    q4 = convert(str(glm5_hf), str(tmp_path / "q4"), quantize=True)
    runs_everywhere(q4, "glm5", "Hello, world!", tmp_path, capsys)
