"""GLM-4.7-Flash (`glm4_moe_lite`): a port of transformers' `Glm4MoeLiteForCausalLM`.
DeepSeek-V3's multi-head latent attention (`mla`) over the shared MoE stack (`base`)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import base, mla

MODEL_TYPE = "glm4_moe_lite"
FAMILY = "GLM-4.7-Flash"


@dataclass(kw_only=True)
class ModelArgs(mla.MLAArgs):
    model_type: str = MODEL_TYPE
    first_k_dense_replace: int = 1


Attention = mla.MultiLatentAttention


class Model(base.Model):
    """`Glm4MoeLiteForCausalLM`."""

    Attention = Attention


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """`kv_b_proj` split per head (`mla.sanitize`)."""
    return mla.sanitize(weights, args)
