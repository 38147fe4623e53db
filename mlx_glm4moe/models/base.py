"""What the GLM MoE architectures share: the config fields, the router and the MoE (experts
dispatched by `SortedSwitchGLU`), the dense MLP, the decoder layer, the nextn (MTP) layer with
its wiring to the main model, the layer loop and the causal LM. Each architecture's module
(`glm4_moe`, `glm4_moe_lite`, `glm_moe_dsa`; the latter two over the latent attention of `mla`)
adds its attention and `ModelArgs`; `models` maps `model_type` to them. Unlike mlx-lm, the
multi-token-prediction layer the checkpoints ship is kept."""

from __future__ import annotations

import weakref
from dataclasses import MISSING, dataclass, fields
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU


@dataclass(kw_only=True)
class BaseModelArgs:
    """The config fields every architecture shares: sizes, the MoE and its router, the nextn
    layer. Each architecture's `ModelArgs` adds its attention's."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    n_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    # Not a config.json key; loading sets it from the weights. GLM-4.5 and Air ship the nextn
    # layer with its own embedding and head; GLM-4.6 and later without: it uses the main model's.
    mtp_own_embeddings: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BaseModelArgs:
        """Read a Hugging Face `config.json` (transformers v4 or v5 layout) of this
        architecture (`models.model_args` picks the architecture from `model_type`)."""
        config = dict(config)
        expected = next(f.default for f in fields(cls) if f.name == "model_type")
        if config.get("model_type") != expected:
            raise ValueError(
                f"{cls.__module__} reads model_type {expected!r}, not {config.get('model_type')!r}"
            )
        # transformers v5 moves rope_theta and partial_rotary_factor into rope_parameters.
        rope = config.get("rope_parameters") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in config and key in rope:
                config[key] = rope[key]
        if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = rope
        if "num_nextn_predict_layers" not in config and "num_mtp_layers" in config:
            config["num_nextn_predict_layers"] = config["num_mtp_layers"]

        names = [f.name for f in fields(cls)]
        missing = [
            f.name for f in fields(cls) if f.default is MISSING and config.get(f.name) is None
        ]
        if missing:
            raise ValueError(f"config.json is missing required key(s): {', '.join(missing)}")
        args = cls(**{k: config[k] for k in names if config.get(k) is not None})
        if args.n_routed_experts % args.n_group or args.topk_group > args.n_group:
            raise ValueError(
                "n_routed_experts must split into n_group groups, topk_group <= n_group"
            )
        return args


def attention_dtype(x: mx.array, projection: nn.Module, cache: Any) -> mx.Dtype:
    """The dtype attention and its KV cache run in: the weights' (`projection`'s) when the
    activations run wider (float32 on the CPU), so the cache takes half the memory that float32
    would. A quantized cache is small either way, and its matmuls run 7x faster on float32
    queries there than on bfloat16 ones."""
    if isinstance(cache, QuantizedKVCache):
        return x.dtype
    return (projection.scales if "scales" in projection else projection.weight).dtype


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# How activations run: "auto" in float32 on the CPU and in the weights' dtype elsewhere;
# "native" in the weights' dtype everywhere (a Mac's code path, testable on the CPU); "float32".
ACTIVATIONS = ("auto", "native", "float32")


def activation_dtype(activations: str) -> mx.Dtype | None:
    """The dtype the activations are cast to after the embedding; None keeps the weights'. The
    CPU backend's quantized matmuls are ~10x slower on half-precision inputs than on float32
    ones, hence float32 there by default."""
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"activations must be one of {', '.join(ACTIVATIONS)}, not {activations!r}"
        )
    if activations == "float32" or (activations == "auto" and mx.default_device() == mx.cpu):
        return mx.float32
    return None


def bounded_prefill(tokens: int, dtype: mx.Dtype) -> bool:
    """Whether to evaluate a prompt chunk in stages: float32 activations on the CPU backend only.
    That backend allocates each queued op's output when the op is queued, not when it runs, so
    a whole lazy layer's intermediates are alive at once; evaluating attention, then the
    experts' activations, before the rest cuts that prefill working memory by 40% (bench preset,
    128 tokens). A sync costs nothing there; decode steps (few tokens) stay lazy so the next step
    queues while this one runs. Other activations (a GPU's, or `activations="native"` on the CPU)
    run a layer as one lazy graph."""
    return tokens >= 8 and dtype == mx.float32 and mx.default_device() == mx.cpu


@mx.compile
def select_experts(
    scores: mx.array,
    bias: mx.array,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[mx.array, mx.array]:
    """DeepSeek-V3 "noaux_tc" routing on float32 sigmoid scores.

    The correction bias only steers which experts are chosen; the mixing weights come from the
    unbiased scores.
    """
    choice = scores + bias
    if n_group > 1 and topk_group < n_group:
        choice = mx.unflatten(choice, -1, (n_group, -1))
        group_scores = mx.topk(choice, 2, axis=-1).sum(axis=-1, keepdims=True)
        drop = n_group - topk_group
        dropped = mx.argpartition(group_scores, kth=drop - 1, axis=-2)[..., :drop, :]
        # -inf, not 0: biased scores can be negative, and a zeroed group could then win.
        choice = mx.put_along_axis(choice, dropped, mx.array(-mx.inf, choice.dtype), axis=-2)
        choice = mx.flatten(choice, -2, -1)
    inds = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * routed_scaling_factor


def _gather_project(layer: nn.Module, x: mx.array, rows: mx.array, experts: mx.array) -> mx.array:
    """`layer(x[rows], experts)` for sorted `experts`, without materializing `x[rows]`."""
    if isinstance(layer, QuantizedSwitchLinear):
        return mx.gather_qmm(
            x,
            layer.weight,
            layer.scales,
            layer.get("biases"),
            lhs_indices=rows,
            rhs_indices=experts,
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
            sorted_indices=True,
        )
    return mx.gather_mm(
        x, layer.weight.swapaxes(-1, -2), lhs_indices=rows, rhs_indices=experts, sorted_indices=True
    )


@partial(mx.compile, shapeless=True)
def weighted_swiglu(up: mx.array, gate: mx.array, weights: mx.array) -> mx.array:
    return nn.silu(gate) * up * weights


class SortedSwitchGLU(SwitchGLU):
    """mlx-lm's SwitchGLU (same weights), called as `switch_mlp(x, indices, weights)`: it returns
    the routed experts' outputs already mixed by `weights`.

    Half-precision activations (a GPU's) run SwitchGLU itself: for many tokens it copies each
    token row once per chosen expert, in expert order, and passes gather_(q)mm right-hand
    indices only, which MLX needs to pick its batched sorted-experts kernels (gather_qmm_rhs /
    gather_mm_rhs). Float32 activations (the CPU's) go through `accumulate` instead.

    `remap` (expert id -> row of the stacked weights) is for expert streaming, whose rows are
    slots holding some of the experts; results are bit-identical to holding them all.
    """

    def __call__(
        self, x: mx.array, indices: mx.array, weights: mx.array, remap: mx.array | None = None
    ) -> mx.array:
        ids = indices if remap is None else remap[indices]
        if x.dtype != mx.float32:
            return mix(super().__call__(x, ids), weights)
        # Float32 activations (the CPU): every chunk, one token or many, in expert-id order, so
        # a token's result depends neither on the rest of its chunk (prompt-cache reuse and MTP
        # verification match one pass, to the bit) nor on which rows hold its experts.
        k = indices.shape[-1]
        x = x.reshape(-1, 1, x.shape[-1])  # [tokens, 1, hidden]
        order = mx.argsort(indices.flatten())
        out = mx.zeros((x.shape[0], x.shape[-1]), x.dtype)
        w = weights.flatten()[order]
        out = self.accumulate(out, x, order // k, ids.flatten()[order], w)
        return out.reshape(*indices.shape[:-1], -1)

    def accumulate(
        self, out: mx.array, x: mx.array, tokens: mx.array, rows: mx.array, weights: mx.array
    ) -> mx.array:
        """`out[tokens] += weights * expert_rows(x[tokens])` over (token, expert) pairs in
        expert order, in float32 (the CPU's activations). The token rows go to gather_(q)mm as
        left-hand indices, so they are never copied once per expert: less prefill memory, and
        on the CPU no slower. (On a GPU, left-hand indices rule out MLX's batched sorted-experts
        kernels, so `activations="float32"` there is for debugging.) The weights go on the
        intermediate activations, which are narrower than the output (down_proj is linear), and
        the outputs are added into their tokens in place: no unsorted copy of every pair's
        output is made. (On the CPU the scatter adds in order; GPU scatters add atomically, in
        no fixed order.)"""
        up = _gather_project(self.up_proj, x, tokens, rows)
        gate = _gather_project(self.gate_proj, x, tokens, rows)
        h = weighted_swiglu(up, gate, weights[:, None, None])
        if bounded_prefill(x.shape[0], x.dtype):
            mx.eval(h)
        return out.at[tokens].add(self.down_proj(h, rows, sorted_indices=True)[:, 0])


def mix(y: mx.array, weights: mx.array) -> mx.array:
    """The routed experts' outputs `y` (..., k, hidden) summed with their float32 `weights`."""
    return (y * weights[..., None]).sum(axis=-2).astype(y.dtype)


class MoEGate(nn.Module):
    """The router. Its weight and correction bias stay float32 whatever the model dtype."""

    def __init__(self, args: BaseModelArgs):
        super().__init__()
        self.args = args
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        a = self.args
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return select_experts(
            mx.sigmoid(logits),
            self.e_score_correction_bias.astype(mx.float32),
            a.num_experts_per_tok,
            a.n_group,
            a.topk_group,
            a.norm_topk_prob,
            a.routed_scaling_factor,
        )


class MoE(nn.Module):
    def __init__(self, args: BaseModelArgs):
        super().__init__()
        self.gate = MoEGate(args)
        # Routed experts stacked [E, out, in]; SwitchGLU dispatches them with gather_(q)mm and
        # sorts tokens by expert for prefill. Expert streaming swaps in a module with the same call.
        self.switch_mlp = SortedSwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        )
        self.shared_experts = MLP(
            args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
        )
        # Set by tensor parallelism: each rank then holds a slice of every expert.
        self.sharding_group: mx.distributed.Group | None = None

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)
        y = self.switch_mlp(x, inds, weights).astype(x.dtype) + self.shared_experts(x)
        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)
        return y


class DecoderLayer(nn.Module):
    """Attention then MLP (dense in the first `first_k_dense_replace` layers, MoE after), each
    around a residual. The attention is built with the layer's index (an architecture may vary
    its attention by layer) and called with the pass's `state`: a dict that one forward pass
    hands from layer to layer, in order, fresh for each pass (GLM-5.2's shared-indexer layers
    read the token selection the last full-indexer layer put there)."""

    def __init__(self, args: BaseModelArgs, layer_idx: int, attention: type[nn.Module]):
        super().__init__()
        self.self_attn = attention(args, layer_idx)
        if layer_idx >= args.first_k_dense_replace:
            self.mlp = MoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, state)
        if bounded_prefill(h.shape[1], h.dtype):
            mx.eval(h)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, args: BaseModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.mtp_own_embeddings:
            self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """The nextn layer (checkpoint index `num_hidden_layers`): a full MoE decoder layer with a
    projection in front that joins a token's embedding to the main model's hidden state, and its
    own head. It predicts the token after the one it is given.

    Without `mtp_own_embeddings` (GLM-4.6 and later) it has no embedding or head of its own and
    reads the main model's through `main`, a weak reference that `Model` sets: not a child
    module, so those weights are neither listed nor stored twice, and it reaches whatever
    modules hold them at call time (after quantization or pipeline splitting)."""

    def __init__(self, args: BaseModelArgs, attention: type[nn.Module]):
        super().__init__(args, args.num_hidden_layers, attention)
        if args.mtp_own_embeddings:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.enorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def predict(
        self, tokens: mx.array, hidden: mx.array, cache: Any = None
    ) -> tuple[mx.array, mx.array]:
        """Logits for the token after each of `tokens`, given the main model's final (normed)
        hidden state at the position before each token. Returns (logits, hidden) where hidden is
        what a chained draft step feeds back in."""
        h = self.join(tokens, hidden)
        h = super().__call__(h, create_attention_mask(h, cache), cache, {})
        normed = self.shared_head.norm(h)
        own = "embed_tokens" in self
        return (self.shared_head.head(normed) if own else self.main().logits(normed)), h

    def join(self, tokens: mx.array, hidden: mx.array) -> mx.array:
        """The decoder layer's input: each token's embedding joined to the hidden state."""
        embed = self.embed_tokens if "embed_tokens" in self else self.main().model.embed_tokens
        x = mx.concatenate([self.enorm(embed(tokens)), self.hnorm(hidden)], axis=-1)
        return self.eh_proj(x)


class LanguageModel(nn.Module):
    def __init__(self, args: BaseModelArgs, attention: type[nn.Module]):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # The nextn layer sits at index num_hidden_layers, where the checkpoints keep it.
        self.layers = [DecoderLayer(args, i, attention) for i in range(args.num_hidden_layers)]
        self.layers += [
            MTPLayer(args, attention) for _ in range(min(args.num_nextn_predict_layers, 1))
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.activations = "auto"  # see ACTIVATIONS; the weights stay as stored either way

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        dtype = activation_dtype(self.activations)
        if dtype is not None:
            h = h.astype(dtype)
        layers = self.layers[: self.args.num_hidden_layers]
        cache = cache or [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        state: dict = {}
        for layer, c in zip(layers, cache, strict=True):
            h = layer(h, mask, c, state)
        return self.norm(h)


class Model(nn.Module):
    """The causal LM over an architecture's attention (`Attention`, set by each architecture's
    subclass): `model(ids, cache)` returns logits `(B, L, vocab)`."""

    Attention: type[nn.Module]

    def __init__(self, args: BaseModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LanguageModel(args, self.Attention)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if self.mtp is not None and not args.mtp_own_embeddings:
            self.mtp.main = weakref.ref(self)

    def logits(self, h: mx.array) -> mx.array:
        """The head on final normed hidden states."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(
        self, inputs: mx.array, cache: list | None = None, return_hidden: bool = False
    ) -> mx.array | tuple[mx.array, mx.array]:
        """With `return_hidden`, also return the final normed hidden states (what MTP reads),
        from the same pass."""
        h = self.model(inputs, cache)
        logits = self.logits(h)
        return (logits, h) if return_hidden else logits

    @property
    def layers(self) -> list[DecoderLayer]:
        """The main decoder layers (the ones with a KV cache in plain decoding)."""
        return self.model.layers[: self.args.num_hidden_layers]

    @property
    def mtp(self) -> MTPLayer | None:
        """The nextn layer, when the checkpoint has one."""
        extra = self.model.layers[self.args.num_hidden_layers :]
        return extra[0] if extra else None

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]
