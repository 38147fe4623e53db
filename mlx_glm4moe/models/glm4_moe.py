"""GLM-4.5, GLM-4.5-Air, GLM-4.6 and GLM-4.7 (`glm4_moe`): a port of transformers'
`Glm4MoeForCausalLM`. Grouped-query attention with partial rotary embeddings and optional
QK-norm over the shared MoE stack (`base`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.rope_utils import initialize_rope

from . import base

MODEL_TYPE = "glm4_moe"
FAMILY = "GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7"


@dataclass(kw_only=True)
class ModelArgs(base.BaseModelArgs):
    model_type: str = MODEL_TYPE
    num_key_value_heads: int
    head_dim: int | None = None
    partial_rotary_factor: float = 0.5
    use_qk_norm: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        args = super().from_dict(config)
        if args.head_dim is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.num_attention_heads % args.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return args


class Attention(nn.Module):
    """Grouped-query attention; the same in every layer, and it passes nothing between layers
    (`layer_idx` and the pass's `state` are unused)."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        if args.use_qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        # Partial NeoX rotation: only the first head_dim * partial_rotary_factor dims turn, in
        # half-split (not interleaved) pairs; the rest pass through unchanged.
        self.rope = initialize_rope(
            int(head_dim * args.partial_rotary_factor),
            args.rope_theta,
            traditional=False,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        B, L, _ = x.shape
        dtype = base.attention_dtype(x, self.k_proj, cache)
        q = self.q_proj(x).astype(dtype).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).astype(dtype).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).astype(dtype).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1).astype(x.dtype))


class Model(base.Model):
    """`Glm4MoeForCausalLM`."""

    Attention = Attention


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """The checkpoint's attention tensors are ours as they are."""
    return weights
