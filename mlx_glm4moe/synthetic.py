"""Tiny GLM-4.5-, GLM-4.7-Flash- and GLM-5-shaped checkpoints in the real Hugging Face layout, built
offline.

Used by the tests, the benchmark and the bundled default: per-expert tensor names, sharded
safetensors with an index, config.json, generation_config.json, and a byte-level BPE tokenizer
carrying GLM's special tokens and the GLM-4.5 chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from .models import model_args
from .weights import FLOAT32, INDEX_FILE, layer_of

TEMPLATE_FILE = Path(__file__).parent / "chat_template.jinja"

# In GLM's id order (151329 = <|endoftext|> ... 151338 = <|observation|>), then the tags.
ROLE_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
TAG_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
    "/nothink",
]
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]
# Where the nextn layer is stored. GLM-4.5 and Air: among the shards, with its own embedding and
# head. GLM-4.6 and 4.7: in its own file, without them (it shares the main model's), listed in
# the index ("glm46") or not ("glm46-unlisted").
LAYOUTS = ("glm45", "glm46", "glm46-unlisted")
MTP_FILE = "mtp.safetensors"
MTP_SHARED = (".embed_tokens.weight", ".shared_head.head.weight")
LATENT = ("glm4_moe_lite", "glm_moe_dsa")  # the model types with latent attention

# The tiny presets share their sizes and differ in the switches that matter.
_TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=128,
    moe_intermediate_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
)
# GLM-4.7-Flash's: glm4_moe_lite's own keys (no head_dim: transformers reads it as the rotary
# head dim there) and its switches. The no-rope, value and rotary head dims differ, as in the
# published models (192/256/64), so that a port that swaps two of them fails.
_LITE_TINY = dict(
    model_type="glm4_moe_lite",
    architectures=["Glm4MoeLiteForCausalLM"],
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=24,
    qk_rope_head_dim=8,
    v_head_dim=32,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.8,
    partial_rotary_factor=1.0,
    rope_interleave=True,
    attention_bias=False,
)
PRESETS: dict[str, dict] = {
    # GLM-4.5's switches: QK-norm, several dense layers, grouped routing, scaling 2.5.
    "glm45": dict(
        _TINY,
        num_hidden_layers=4,
        first_k_dense_replace=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
    ),
    # GLM-4.5-Air's: no QK-norm, one dense layer, one group.
    "air": dict(
        _TINY,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        use_qk_norm=False,
    ),
    # GLM-4.5-Air's proportions scaled down 8x in width for the benchmark (Air: hidden 4096,
    # 96/8 heads of 128, dense 10944, 128 experts top-8 of 1408, vocab 151552, 46 layers): 12:1
    # query to KV heads, heads * head_dim = 3 * hidden, dense ~2.7 * hidden, expert width
    # ~hidden / 3, one dense layer, 64 experts top-8 + 1 shared. 6 layers: 113M parameters
    # (+25M MTP layer), 28M active per token (the head 7.5% of those); ~64 MB at 4-bit.
    "bench": dict(
        vocab_size=4096,
        hidden_size=512,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=24,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1408,
        moe_intermediate_size=192,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        use_qk_norm=False,
    ),
    # GLM-4.7-Flash's switches (glm4_moe_lite): latent attention with a query LoRA, one dense
    # layer, 8 experts top-2, scaling 1.8.
    "lite": dict(
        _LITE_TINY,
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
    ),
    # GLM-4.7-Flash's proportions scaled down 8x in width for the benchmark (Flash: hidden 2048,
    # 20 heads, q_lora 768, kv_lora 512, nope/rope/v head dims 192/64/256, dense 10240, 64
    # experts top-4 of 1536, vocab 154880, 47 layers): the same 20 heads and 64 experts top-4,
    # every width / 8, 6 layers: 53M parameters (+12M MTP layer), 7.8M active per token.
    "lite-bench": dict(
        _LITE_TINY,
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=20,
        num_key_value_heads=20,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=24,
        qk_rope_head_dim=8,
        v_head_dim=32,
        intermediate_size=1280,
        moe_intermediate_size=192,
        n_routed_experts=64,
        num_experts_per_tok=4,
    ),
    # GLM-5's switches (glm_moe_dsa): latent attention with DSA's indexer in every layer (16
    # heads: with few, ReLU ties make the top-k ambiguous), 8 positions selected so that prompts
    # longer than that are sparse, the first layer dense, scaling 2.5. config.json's head_dim is
    # meaningless (64 in GLM-5): a wrong one here must change nothing.
    "glm5": dict(
        _LITE_TINY,
        model_type="glm_moe_dsa",
        architectures=["GlmMoeDsaForCausalLM"],
        head_dim=24,
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        routed_scaling_factor=2.5,
        index_topk=8,
        index_head_dim=32,
        index_n_heads=16,
        # Keys GLM-5's config.json carries and mlx-lm's glm_moe_dsa requires.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        moe_layer_freq=1,
    ),
}
# GLM-5's proportions scaled down for the benchmark (GLM-5: hidden 6144, 64 heads, q_lora 2048,
# kv_lora 512, nope/rope/v head dims 192/64/256, dense 12288, 256 experts top-8 of 2048, vocab
# 154880, 78 layers, an indexer of 32 heads of 128 selecting 2048 positions): the same 64 heads,
# 2048 positions and top-8, widths / 8, 64 experts, an indexer of 32 heads of 16, 6 layers.
PRESETS["glm5-bench"] = dict(
    PRESETS["glm5"],
    vocab_size=4096,
    hidden_size=768,
    num_hidden_layers=6,
    num_attention_heads=64,
    num_key_value_heads=64,
    q_lora_rank=256,
    kv_lora_rank=64,
    intermediate_size=1536,
    moe_intermediate_size=256,
    n_routed_experts=64,
    num_experts_per_tok=8,
    index_topk=2048,
    index_head_dim=16,
    index_n_heads=32,
)
# GLM-5.2's IndexShare: layers 1 and 3 reuse the selection of layer 0 and 2, as transformers
# derives it from these keys (GLM-5.2 itself lists `indexer_types`).
PRESETS["glm52"] = dict(
    PRESETS["glm5"], num_hidden_layers=4, index_topk_freq=2, index_skip_topk_offset=1
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
I am a helpful assistant. Let me think about this step by step.
def add(a, b):
    return a + b
The weather in Paris is sunny, 21 degrees. {"city": "Paris", "unit": "celsius"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 3.14. Unicode: café, naïve, 你好, 日本語, emoji 🚀.
"""


def make_tokenizer(out: Path, vocab_size: int = 384, corpus: str = _CORPUS) -> int:
    """Train a byte-level BPE with GLM's special tokens and chat template into `out`.
    Returns the tokenizer's size (regular + special tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer)
    # Role tokens are special (skipped when asked); the tags must stay visible in decoded text
    # for the reasoning and tool-call parsers.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ROLE_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 <sop>:0 $A:0",
        pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[gMASK]", "<sop>")],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "clean_up_tokenization_spaces": False,
                "model_max_length": 131072,
                "chat_template": TEMPLATE_FILE.read_text(),
            },
            indent=2,
        )
    )
    return tok.get_vocab_size()


def make_config(preset: str = "air", vocab_size: int = 512, **overrides) -> dict:
    """A config.json for a tiny model with the given preset's switches."""
    config = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": vocab_size,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "partial_rotary_factor": 0.5,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 1,
        "torch_dtype": "float32",
        **PRESETS[preset],
    }
    config.update(overrides)
    return config


def random_weights(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights under HF names, including the MTP layer (see `weight_groups`)."""
    return {k: w for group in weight_groups(config, seed, dtype) for k, w in group.items()}


def weight_groups(config: dict, seed: int = 0, dtype=np.float32) -> Iterator[dict[str, np.ndarray]]:
    """Random weights under HF names, one group at a time: the embedding, final norm and head,
    then each layer (the MTP layer last). Norm weights and the correction bias are moved off
    their init values so that a port that ignores them fails."""
    rng = np.random.default_rng(seed)
    H, V, E = config["hidden_size"], config["vocab_size"], config["n_routed_experts"]
    I, Im = (
        config["intermediate_size"],
        config["moe_intermediate_size"] * config["n_shared_experts"],
    )

    def lin(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(dtype)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(dtype)

    def mlp(prefix: str, inter: int) -> dict:
        return {
            f"{prefix}.gate_proj.weight": lin(inter, H),
            f"{prefix}.up_proj.weight": lin(inter, H),
            f"{prefix}.down_proj.weight": lin(H, inter),
        }

    yield {
        "model.embed_tokens.weight": rng.standard_normal((V, H)).astype(dtype),
        "model.norm.weight": norm(H),
        "lm_head.weight": lin(V, H),
    }
    n_layers = config["num_hidden_layers"]
    for i in range(n_layers + config.get("num_nextn_predict_layers", 0)):
        p, w = f"model.layers.{i}", {}
        w[f"{p}.input_layernorm.weight"] = norm(H)
        w[f"{p}.post_attention_layernorm.weight"] = norm(H)
        attention = _latent_attention if config["model_type"] in LATENT else _attention
        w.update({f"{p}.self_attn.{k}": a for k, a in attention(config, lin, norm, rng).items()})
        if config["model_type"] == "glm_moe_dsa" and (
            i >= n_layers or indexer_types(config)[i] == "full"
        ):
            w.update({f"{p}.self_attn.indexer.{k}": a for k, a in _indexer(config, lin, norm)})
        if i < config["first_k_dense_replace"]:
            w.update(mlp(f"{p}.mlp", I))
            yield w
            continue
        w[f"{p}.mlp.gate.weight"] = (2.0 * lin(E, H)).astype(np.float32)
        w[f"{p}.mlp.gate.e_score_correction_bias"] = (0.1 * rng.standard_normal(E)).astype(
            np.float32
        )
        w.update(mlp(f"{p}.mlp.shared_experts", Im))
        for e in range(E):
            w.update(mlp(f"{p}.mlp.experts.{e}", config["moe_intermediate_size"]))
        if i >= n_layers:  # the nextn layer's extras
            w[f"{p}.embed_tokens.weight"] = rng.standard_normal((V, H)).astype(dtype)
            w[f"{p}.enorm.weight"] = norm(H)
            w[f"{p}.hnorm.weight"] = norm(H)
            w[f"{p}.eh_proj.weight"] = lin(H, 2 * H)
            w[f"{p}.shared_head.norm.weight"] = norm(H)
            w[f"{p}.shared_head.head.weight"] = lin(V, H)
        yield w


def _attention(config: dict, lin: Callable, norm: Callable, rng: np.random.Generator) -> dict:
    """glm4_moe's: q/k/v/o projections (with biases when configured), optional QK-norm."""
    H, D, nq, nkv = (
        config["hidden_size"],
        config["head_dim"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    w = {}
    for name, out_dim in (("q", nq * D), ("k", nkv * D), ("v", nkv * D)):
        w[f"{name}_proj.weight"] = lin(out_dim, H)
        if config.get("attention_bias"):
            bias = 0.1 * rng.standard_normal(out_dim)
            w[f"{name}_proj.bias"] = bias.astype(w[f"{name}_proj.weight"].dtype)
    w["o_proj.weight"] = lin(H, nq * D)
    if config.get("use_qk_norm"):
        w["q_norm.weight"], w["k_norm.weight"] = norm(D), norm(D)
    return w


def _latent_attention(
    config: dict, lin: Callable, norm: Callable, rng: np.random.Generator
) -> dict:
    """glm4_moe_lite's multi-head latent attention, in transformers' names."""
    H, heads, q_rank, kv_rank = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["q_lora_rank"],
        config["kv_lora_rank"],
    )
    nope, rope, v = (config[f"{k}_head_dim"] for k in ("qk_nope", "qk_rope", "v"))
    return {
        "q_a_proj.weight": lin(q_rank, H),
        "q_a_layernorm.weight": norm(q_rank),
        "q_b_proj.weight": lin(heads * (nope + rope), q_rank),
        "kv_a_proj_with_mqa.weight": lin(kv_rank + rope, H),
        "kv_a_layernorm.weight": norm(kv_rank),
        "kv_b_proj.weight": lin(heads * (nope + v), kv_rank),
        "o_proj.weight": lin(H, heads * v),
    }


def indexer_types(config: dict) -> list[str]:
    """Each layer's indexer, "full" or "shared", as our `ModelArgs` (and transformers) read it."""
    return model_args(config).indexer_types


def _indexer(config: dict, lin: Callable, norm: Callable) -> Iterator[tuple[str, np.ndarray]]:
    """DSA's lightning indexer, in transformers' names: its key norm has a bias."""
    H, heads, dim = config["hidden_size"], config["index_n_heads"], config["index_head_dim"]
    yield "wq_b.weight", lin(heads * dim, config["q_lora_rank"])
    yield "wk.weight", lin(dim, H)
    yield "k_norm.weight", norm(dim)
    yield "k_norm.bias", norm(dim) - 1.0
    yield "weights_proj.weight", lin(heads, H).astype(np.float32)


def save_sharded(
    weights: dict, out: Path, num_shards: int = 2, dtype: str = "float32", layout: str = "glm45"
) -> None:
    """Write HF-style shards `model-0000i-of-0000n.safetensors` plus the index, the nextn layer
    stored as `layout` says (see `LAYOUTS`)."""
    mtp = {}
    if layout != "glm45":
        n = next(layer_of(k) for k in weights if k.endswith(".eh_proj.weight"))
        mtp = {k: w for k, w in weights.items() if layer_of(k) == n}
    names = [k for k in weights if k not in mtp]
    chunks = np.array_split(np.arange(len(names)), num_shards)
    shards = [{names[j]: weights[names[j]] for j in chunk} for chunk in chunks]
    write_shards(shards + ([mtp] if mtp else []), num_shards, out, dtype, layout)


def write_shards(
    groups: Iterable[dict[str, np.ndarray]], num_shards: int, out: Path, dtype: str, layout: str
) -> None:
    """Write each group as one shard, taking the next only once it is written (a generator then
    keeps one group in memory), and the index. In GLM-4.6's layouts the group holding the nextn
    layer goes to `mtp.safetensors` without its own embedding and head; `num_shards` counts the
    others."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
    weight_map, i = {}, 0
    for group in groups:
        # The router and the indexer's head weights stay float32, as in the published checkpoints.
        arrays = {
            k: mx.array(w) if k.endswith(FLOAT32) else mx.array(w).astype(getattr(mx, dtype))
            for k, w in group.items()
        }
        listed = True
        if layout != "glm45" and any(k.endswith(".eh_proj.weight") for k in group):
            arrays = {k: a for k, a in arrays.items() if not k.endswith(MTP_SHARED)}
            fname, listed = MTP_FILE, layout == "glm46"
        else:
            i += 1
            fname = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        mx.save_safetensors(str(out / fname), arrays, metadata={"format": "pt"})
        if listed:
            weight_map.update(dict.fromkeys(arrays, fname))
        del arrays
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def make_checkpoint(
    out: str | Path,
    preset: str = "air",
    seed: int = 0,
    dtype: str = "float32",
    num_shards: int | None = 2,
    layout: str = "glm45",
    **overrides,
) -> Path:
    """Build a complete tiny HF checkpoint folder (weights, config, tokenizer) in `out`, its
    nextn layer stored in `layout` (see `LAYOUTS`). `num_shards` None writes one shard per
    layer (and one for the embedding and head), each made and written in turn: checkpoints
    larger than memory."""
    out = Path(out)
    n_tokens = make_tokenizer(out)
    vocab_size = -(-n_tokens // 64) * 64  # padded like GLM's 151552
    config = make_config(preset, vocab_size=vocab_size, torch_dtype=dtype, **overrides)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = [tok.token_to_id(t) for t in STOP_TOKENS]
    config.update(eos_token_id=eos, pad_token_id=eos[0])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": eos[0]}, indent=2)
    )
    if num_shards is not None:
        save_sharded(random_weights(config, seed), out, num_shards, dtype, layout)
        return out
    own_mtp_shard = config["num_nextn_predict_layers"] > 0 and layout == "glm45"
    count = 1 + config["num_hidden_layers"] + own_mtp_shard
    write_shards(weight_groups(config, seed), count, out, dtype, layout)
    return out


def make_agreeing_checkpoint(
    out: str | Path,
    agreement: float = 1.0,
    preset: str = "air",
    seed: int = 0,
    layout: str = "glm45",
    **overrides,
) -> Path:
    """A tiny HF checkpoint whose MTP layer agrees with the main model on a known share of
    tokens (for tests and the benchmark, until a trained model exists).

    Every attention output and MLP down projection is zero, so each layer passes its input
    through and the next token is a function of the current one: `lm_head` makes greedy decoding
    walk one cycle through all the tokenizer's non-stop tokens. The MTP layer's decoder is zeroed
    too, `eh_proj` passes the embedding half on, and its embedding, norm and head copy the main
    model's, so it predicts the token after next exactly. For `round((1 - agreement) * n)` of
    the cycle's n tokens its embedding row is the next token's, so a draft made from one of them
    is wrong. The cycle and the wrong tokens are in the config, under "mtp_fixture". In
    GLM-4.6's `layout` the MTP layer has the main embedding, so agreement must be 1. `overrides`
    go to the config (e.g. num_hidden_layers).
    """
    from tokenizers import Tokenizer

    if not 0 <= agreement <= 1 or (layout != "glm45" and agreement != 1):
        raise ValueError("agreement must be between 0 and 1, and 1 in GLM-4.6's layout")
    out = make_checkpoint(out, preset, seed, **overrides)
    config = json.loads((out / "config.json").read_text())
    w = random_weights(config, seed)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = np.zeros_like(w[name])
    n_tokens = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    rng = np.random.default_rng(seed)
    cycle = [int(t) for t in rng.permutation(n_tokens) if t not in config["eos_token_id"]]
    wrong = sorted(int(t) for t in rng.choice(cycle, round((1 - agreement) * len(cycle)), False))

    embed = w["model.embed_tokens.weight"]
    u = embed / np.sqrt((embed**2).mean(-1, keepdims=True) + config["rms_norm_eps"])
    u = u * w["model.norm.weight"]
    successor = dict(zip(cycle, cycle[1:] + cycle[:1], strict=True))
    head = np.zeros_like(w["lm_head.weight"])
    for prev, nxt in successor.items():
        head[nxt] = u[prev] / np.linalg.norm(u[prev])
    w["lm_head.weight"] = head
    mtp_embed = embed.copy()
    mtp_embed[wrong] = embed[[successor[t] for t in wrong]]

    H, p = config["hidden_size"], f"model.layers.{config['num_hidden_layers']}"
    w[f"{p}.embed_tokens.weight"] = mtp_embed
    w[f"{p}.enorm.weight"] = np.ones(H, np.float32)
    w[f"{p}.eh_proj.weight"] = np.eye(H, 2 * H, dtype=np.float32)
    w[f"{p}.shared_head.norm.weight"] = w["model.norm.weight"]
    w[f"{p}.shared_head.head.weight"] = head
    save_sharded(w, out, layout=layout)
    config["mtp_fixture"] = {"cycle": cycle, "wrong": wrong}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
