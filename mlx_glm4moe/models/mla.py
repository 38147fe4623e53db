"""DeepSeek-V3's multi-head latent attention, as GLM-4.7-Flash (`glm4_moe_lite`) and GLM-5
(`glm_moe_dsa`) use it: their shared config fields and the attention itself.

Keys and values are projected down to one latent per token (`kv_lora_rank` wide) plus one rotary
key shared by all heads; the KV cache holds those two, not per-head keys and values. A prompt
chunk expands the latent to per-head keys and values; a decoded token instead moves its query
into the latent space (the key up-projection absorbed into it, `embed_q`) and the attention
output back out (`unembed_out`), so decoding reads the small cache as is, as mlx-lm does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask, scaled_dot_product_attention
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.rope_utils import initialize_rope

from . import base

# transformers builds the two LoRA norms with its RMSNorm's default epsilon, not rms_norm_eps.
LORA_NORM_EPS = 1e-6


@dataclass(kw_only=True)
class MLAArgs(base.BaseModelArgs):
    """The latent attention's config fields."""

    kv_lora_rank: int
    q_lora_rank: int | None = None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    mlp_layer_types: list[str] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MLAArgs:
        args = super().from_dict(config)
        if args.mlp_layer_types is not None:
            # transformers' own key for which layers are dense: a dense prefix is what we build.
            dense = args.mlp_layer_types.count("dense")
            expected = ["dense"] * dense + ["sparse"] * (args.num_hidden_layers - dense)
            if args.mlp_layer_types != expected:
                raise ValueError("mlp_layer_types must be dense layers followed by sparse ones")
            args.first_k_dense_replace = dense
        return args


class MultiLatentAttention(nn.Module):
    """Multi-head latent attention (transformers' `Glm4MoeLiteAttention`). Subclasses reuse its
    parts: `project` (queries, the new latents and rotary keys) and `attend`."""

    def __init__(self, args: MLAArgs, layer_idx: int):
        super().__init__()
        H, heads = args.hidden_size, args.num_attention_heads
        self.n_heads = heads
        self.nope, self.rope_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.kv_rank, self.v_dim = args.kv_lora_rank, args.v_head_dim
        self.scale = (self.nope + self.rope_dim) ** -0.5
        scaling = args.rope_scaling or {}
        if scaling.get("mscale_all_dim") and scaling.get("factor", 1) > 1:  # YaRN
            self.scale *= (0.1 * scaling["mscale_all_dim"] * math.log(scaling["factor"]) + 1) ** 2
        q_dim = heads * (self.nope + self.rope_dim)
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(H, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            H, self.kv_rank + self.rope_dim, bias=args.attention_bias
        )
        self.kv_a_layernorm = nn.RMSNorm(self.kv_rank, eps=LORA_NORM_EPS)
        # The checkpoint's kv_b_proj, split per head (`sanitize`): the key half maps a head's
        # no-rope query into the latent space, the value half maps the latent to its value.
        self.embed_q = MultiLinear(self.nope, self.kv_rank, heads)
        self.unembed_out = MultiLinear(self.kv_rank, args.v_head_dim, heads)
        self.o_proj = nn.Linear(heads * args.v_head_dim, H, bias=args.attention_bias)
        self.rope = rope(args)

    def project(
        self, x: mx.array, offset: int, dtype: mx.Dtype
    ) -> tuple[mx.array, mx.array, mx.array | None, mx.array, mx.array]:
        """(no-rope queries, rotated queries [B, heads, L, ·], the query LoRA's normed output
        (None without one), this chunk's latents and rotated keys [B, 1, L, ·])."""
        B, L, _ = x.shape
        if "q_proj" in self:
            q_resid, q = None, self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = q.astype(dtype).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.nope], axis=-1)
        latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x).astype(dtype), [self.kv_rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # one "head" shared by all heads
        q_pe, k_pe = self.rope(q_pe, offset=offset), self.rope(k_pe[:, None], offset=offset)
        return q_nope, q_pe, q_resid, latent, k_pe

    def attend(
        self,
        q_nope: mx.array,
        q_pe: mx.array,
        latent: mx.array,
        k_pe: mx.array,
        mask: mx.array | None,
        absorbed: bool,
    ) -> mx.array:
        """The heads' outputs [B, heads, L, v] over the cached `latent` and `k_pe` under the
        boolean `mask`. `absorbed` attends in the latent space (no per-head keys or values of
        the context are made); otherwise the latent is expanded to them."""
        # The rotary half of the scores goes in as an additive mask over the no-rope half's.
        scores = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        if mask is not None:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        if absorbed:
            out = scaled_dot_product_attention(
                self.embed_q(q_nope), latent, latent, cache=None, scale=self.scale, mask=scores
            )
            return self.unembed_out(out)
        k, v = self.embed_q(latent, transpose=False), self.unembed_out(latent)
        return scaled_dot_product_attention(q_nope, k, v, cache=None, scale=self.scale, mask=scores)

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        """`state` is the pass's (see `base.DecoderLayer`): this attention reads none of it."""
        B, L, _ = x.shape
        refuse_quantized(cache)
        dtype = base.attention_dtype(x, self.kv_a_proj_with_mqa, cache)
        offset = cache.offset if cache is not None else 0
        q_nope, q_pe, _, latent, k_pe = self.project(x, offset, dtype)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)
        if isinstance(mask, str):
            mask = create_causal_mask(L, offset)
        out = self.attend(q_nope, q_pe, latent, k_pe, mask, absorbed=L == 1)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1).astype(x.dtype))


def rope(args: MLAArgs) -> nn.Module:
    """The rotary embedding of the `qk_rope_head_dim` dims that turn, in DeepSeek's interleaved
    pairs unless `rope_interleave` is off."""
    return initialize_rope(
        args.qk_rope_head_dim,
        args.rope_theta,
        traditional=args.rope_interleave,
        scaling_config=args.rope_scaling,
        max_position_embeddings=args.max_position_embeddings,
    )


def refuse_quantized(cache: Any) -> None:
    if isinstance(cache, QuantizedKVCache):
        raise ValueError("latent attention caches the latent, which is not quantized")


def sanitize(weights: dict[str, mx.array], args: MLAArgs) -> dict[str, mx.array]:
    """Split each layer's `kv_b_proj` [heads * (nope + v), kv_lora_rank] into the per-head key
    (`embed_q`, [heads, kv_lora_rank, nope]) and value (`unembed_out`, [heads, v, kv_lora_rank])
    up-projections, under mlx-lm's names."""
    out = {}
    for name, w in weights.items():
        if not name.endswith(".self_attn.kv_b_proj.weight"):
            out[name] = w
            continue
        prefix = name.removesuffix("kv_b_proj.weight")
        w = w.reshape(args.num_attention_heads, args.qk_nope_head_dim + args.v_head_dim, -1)
        out[f"{prefix}embed_q.weight"] = mx.contiguous(
            w[:, : args.qk_nope_head_dim].swapaxes(-1, -2)
        )
        out[f"{prefix}unembed_out.weight"] = mx.contiguous(w[:, args.qk_nope_head_dim :])
    return out
