"""The architectures, one module each over the shared `base`, and the registry from a config's
`model_type` to its module, which loading, conversion and distribution consult (expert streaming
reads only the MoE's config fields, which every architecture shares).

Each architecture module holds `MODEL_TYPE`, `FAMILY` (the checkpoints it runs), `ModelArgs`,
its `Attention`, `Model` and `sanitize(weights, args)` (its checkpoint names → ours, after the
shared `weights.sanitize`)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import mlx.core as mx

from . import glm4_moe, glm4_moe_lite, glm_moe_dsa
from .base import ACTIVATIONS, BaseModelArgs, Model, activation_dtype

ARCHITECTURES: dict[str, ModuleType] = {
    m.MODEL_TYPE: m for m in (glm4_moe, glm4_moe_lite, glm_moe_dsa)
}

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "BaseModelArgs",
    "Model",
    "activation_dtype",
    "architecture",
    "build",
    "model_args",
    "sanitize",
]


def architecture(config: dict[str, Any]) -> ModuleType:
    """The module for `config`'s `model_type`; a ValueError naming the supported ones if none."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = "; ".join(f"{t!r} ({m.FAMILY})" for t, m in ARCHITECTURES.items())
        raise ValueError(f"Unsupported model_type {model_type!r}: this package runs {supported}.")
    return ARCHITECTURES[model_type]


def model_args(config: dict[str, Any]) -> BaseModelArgs:
    """The `ModelArgs` of `config`'s architecture, read from it."""
    return architecture(config).ModelArgs.from_dict(config)


def build(args: BaseModelArgs) -> Model:
    """An (unloaded) model of `args`' architecture."""
    return ARCHITECTURES[args.model_type].Model(args)


def sanitize(weights: dict[str, mx.array], args: BaseModelArgs) -> dict[str, mx.array]:
    """The architecture's own renaming of tensors already through `weights.sanitize`."""
    return ARCHITECTURES[args.model_type].sanitize(weights, args)
