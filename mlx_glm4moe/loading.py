"""`load()`: a converted (or raw Hugging Face) checkpoint → model and tokenizer, lazily."""

from __future__ import annotations

from collections.abc import Callable
from itertools import groupby
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import infer_quant_config, load_tokenizer

from . import models
from .models import Model, activation_dtype
from .models.base import MoE
from .progress import Progress
from .streaming import check_fits, routed_experts
from .weights import fp8_format, layer_of, load_lazy, read_config, resolve, sanitize, weight_files


def eos_ids(config: dict[str, Any]) -> list[int]:
    eos = config.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def build_model(
    config: dict[str, Any],
    weights: dict[str, mx.array],
    switch_mlp: Callable[[str], nn.Module] | None = None,
) -> Model:
    """Instantiate the model for `weights` (already in our names) and load them, quantizing the
    modules whose weights come with scales. `switch_mlp(path)`, when given, supplies each MoE
    layer's routed experts instead of `weights` (expert streaming)."""
    args = models.model_args(config)
    mtp_prefix = f"model.layers.{args.num_hidden_layers}."
    if not any(k.startswith(mtp_prefix) for k in weights):
        args.num_nextn_predict_layers = 0  # e.g. a checkpoint converted by mlx-lm
    args.mtp_own_embeddings = f"{mtp_prefix}embed_tokens.weight" in weights
    model = models.build(args)
    mode = (config.get("quantization") or {}).get("mode", "affine")

    def quantized(path: str, module: nn.Module) -> dict | bool:
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        return {**infer_quant_config(path, module, weights), "mode": mode}

    nn.quantize(model, class_predicate=quantized)
    if switch_mlp is not None:
        for path, module in model.named_modules():
            if isinstance(module, MoE):
                module.switch_mlp = switch_mlp(f"{path}.switch_mlp")
    if mx.default_device() == mx.cpu:
        # gather_mm on the CPU backend supports float32 only.
        for path, module in model.named_modules():
            if isinstance(module, SwitchLinear) and f"{path}.weight" in weights:
                weights[f"{path}.weight"] = weights[f"{path}.weight"].astype(mx.float32)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(
            f"The weights do not match a {args.model_type} model of this config: {e}"
        ) from None
    model.eval()
    return model


def read_weights(model: nn.Module, progress: Progress) -> None:
    """Read `model`'s weights one layer at a time, reporting ("load", bytes read, bytes)."""
    params = nn.utils.tree_flatten(model.parameters())
    total, done = sum(a.nbytes for _, a in params), 0
    progress("load", 0, total)
    for _, group in groupby(params, key=lambda p: layer_of(p[0])):
        arrays = [a for _, a in group]
        mx.eval(arrays)
        done += sum(a.nbytes for a in arrays)
        progress("load", done, total)


def load(
    path_or_repo: str | Path | None = None,
    lazy: bool = True,
    expert_slots: int | None = None,
    activations: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> tuple[Model, TokenizerWrapper]:
    """Load a model and its tokenizer.

    Args:
        path_or_repo: a local folder or a Hugging Face repo id, converted by `convert.py` or a
            raw HF checkpoint (bf16 or FP8). None loads the small bundled default model.
        lazy: leave weights on disk until first used (the default); False reads them all now.
        expert_slots: keep the routed experts on disk and at most this many per MoE layer in
            memory (at least `num_experts_per_tok`); None keeps them all resident. Needs a
            checkpoint converted by `convert.py`. See `mlx_glm4moe.streaming`.
        activations: "auto" (float32 on the CPU, where MLX's quantized matmuls are fastest on
            it; the weights' dtype elsewhere), "native" (the weights' dtype everywhere: what a
            GPU runs, testable on the CPU) or "float32". On the CPU an unquantized model's
            routed experts are held in float32 whatever this says (MLX's CPU `gather_mm` takes
            nothing else); half-precision activations are widened inside it.
        force: load even when the resident weights exceed the memory available (by default
            that is a ValueError pointing to `expert_slots`).
        progress: called as ``progress(stage, done, total)``: "download" (files, when the
            repo is fetched from the Hub) and "load" (bytes of weights read). Reading the
            weights is what takes the time, so with `progress` they are read now, one layer at
            a time, whatever `lazy` says.

    Returns:
        (model, tokenizer): `model(mx.array(ids))` gives logits; the tokenizer is mlx-lm's
        wrapper, stopping on every id of the config's `eos_token_id` list.
    """
    activation_dtype(activations)  # a bad value fails before anything is read
    path = resolve(path_or_repo, progress)
    config = read_config(path)
    args = models.model_args(config)  # fail on a wrong model type before touching weights
    weights = load_lazy(weight_files(path))
    weights = sanitize(weights, config["n_routed_experts"], fp8_format(config))
    weights = models.sanitize(weights, args)
    experts = None if expert_slots is None else routed_experts(path, config, weights, expert_slots)
    model = build_model(config, weights, experts)
    model.model.activations = activations
    model.source = path  # what a prompt cache on disk is keyed by
    check_fits(model, force)
    if progress is not None:
        read_weights(model, progress)
    elif not lazy:
        mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, eos_token_ids=eos_ids(config))
    return model, tokenizer
