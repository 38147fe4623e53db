"""Layer-major prefill: a prompt through one layer at a time, for models that stream experts.

A chunked prefill sends each chunk through every layer, and a chunk of a few hundred tokens routes
to nearly every expert: with streamed experts (`streaming.py`) every chunk reads the whole expert
set from disk again. Here all the prompt's tokens (up to `SPAN`) pass through a layer before the
next one starts: attention still goes chunk by chunk through the layer's KV cache, then the
layer's MoE runs once over every token, so each routed expert is read about once per layer per
prompt.

The KV cache is the one a chunked prefill with the same chunk size builds: attention sees the
same chunks against the same cache. What stays in flight is the activations of the span's tokens
for one layer (see `activation_bytes`), not the layers' weights.

Written against the mlx-lm layout every architecture here shares: `model.model.embed_tokens`,
`.layers` (each with `input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`) and
`.norm`; the MTP layer (`model.mtp`) through its `join`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, maybe_quantize_kv_cache
from mlx_lm.models.base import create_attention_mask

from .models import activation_dtype
from .streaming import prefilling

# Tokens in flight per layer pass: longer prompts go through the layers in spans of this many
# tokens, each span reading the experts once (a 40,000-token prompt: 5 reads, not 20 or 80).
SPAN = 8192


class PrefillCancelled(Exception):
    """`prefill` stopped at its `cancel` check: the cache holds part of the prompt in some
    layers only, and must be dropped."""


def activation_bytes(args: Any, tokens: int, step: int, context: int) -> int:
    """The bound on `prefill`'s working memory beyond the weights and the KV cache, for `tokens`
    in flight and `step`-token attention chunks over at most `context` positions (`args`: the
    model's `ModelArgs`). Per token in flight, in float32: the hidden states into, after the
    attention of and out of one layer and its normed copy, the router's scores and choices, the
    shared expert's activations, and each of its (token, expert) pairs' rows (the input's
    copy, gate, up, their product, the output); plus one chunk's attention scores and their
    softmax."""
    h, k, inter = args.hidden_size, args.num_experts_per_tok, args.moe_intermediate_size
    per_token = 4 * h + 2 * args.n_routed_experts + 3 * inter * args.n_shared_experts
    per_token += k * (2 * h + 3 * inter)
    return 4 * (tokens * per_token + 2 * step * args.num_attention_heads * context)


def _attend(
    layer: nn.Module,
    x: mx.array,
    cache: Any,
    step: int,
    quantize: dict | None,
    states: list[dict] | None = None,
) -> mx.array:
    """The layer's attention half (`x + attention(norm(x))`) over `x`, `step` tokens at a time
    through `cache`, each chunk evaluated before the next so that one chunk's attention working
    set is alive at a time. `quantize` (mlx-lm's `maybe_quantize_kv_cache` arguments) turns the
    cache quantized after the chunk that passes its start, as a chunked prefill does; the
    (possibly new) cache is the list's only entry on return. `states` holds each chunk's pass
    state (see `models.base.DecoderLayer`), handed on from the layer before."""
    out = []
    for j, i in enumerate(range(0, x.shape[1], step)):
        chunk = x[:, i : i + step]
        c = cache[0]
        h = chunk + layer.self_attn(
            layer.input_layernorm(chunk),
            create_attention_mask(chunk, c),
            c,
            None if states is None else states[j],
        )
        if quantize is not None:
            maybe_quantize_kv_cache(cache, **quantize)
        mx.eval(h, cache[0].state)
        out.append(h)
    return mx.concatenate(out, axis=1)


def _feed_forward(layer: nn.Module, h: mx.array) -> mx.array:
    out = h + layer.mlp(layer.post_attention_layernorm(h))
    mx.eval(out)
    return out


def prefill(
    model: nn.Module,
    prompt: mx.array,
    cache: list,
    step: int = 2048,
    *,
    hidden: bool = False,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    span: int = SPAN,
    cancel: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> mx.array | None:
    """Feed `prompt` (token ids `[L]`) into the main layers' caches `cache` (updated in place;
    it may hold a prefix), layer by layer, attention in chunks of `step` tokens. With `hidden`,
    returns the final normed hidden states `[1, L, hidden]` (what the MTP layer reads); without,
    the last layer's MoE, whose output only the logits would read, is skipped. `kv_bits` etc.
    quantize the cache as `generate.generate_step` does. `cancel` is asked before each layer
    (a long prompt takes seconds a layer when experts come from disk): when it answers True,
    `PrefillCancelled` is raised. `progress` is told after each layer how much of the prompt is
    in, in tokens: the spans before, and this span's share of the layers done."""
    quantize = None
    if kv_bits is not None:
        quantize = {
            "quantized_kv_start": quantized_kv_start,
            "kv_group_size": kv_group_size,
            "kv_bits": kv_bits,
        }
    lm, layers = model.model, model.layers
    dtype = activation_dtype(lm.activations)
    outs = []
    with mx.stream(generation_stream), prefilling(model):
        for start in range(0, prompt.size, span):
            h = lm.embed_tokens(prompt[None, start : start + span])
            h = h if dtype is None else h.astype(dtype)
            states = [{} for _ in range(0, h.shape[1], step)]
            for i, layer in enumerate(layers):
                if cancel is not None and cancel():
                    raise PrefillCancelled
                one = cache[i : i + 1]
                h = _attend(layer, h, one, step, quantize, states)
                cache[i] = one[0]
                if hidden or i + 1 < len(layers):
                    h = _feed_forward(layer, h)
                if progress is not None:
                    progress(start + h.shape[1] * (i + 1) // len(layers))
            if hidden:
                outs.append(lm.norm(h))
            mx.clear_cache()
    if not hidden:
        return None
    out = mx.concatenate(outs, axis=1)
    mx.eval(out)
    return out


def prefill_mtp(
    model: nn.Module, tokens: mx.array, hidden: mx.array, cache: Any, step: int
) -> None:
    """Feed the MTP layer's cache the pairs (token t_{p+1}, main hidden state h_p) of a prompt:
    `tokens` `[L]` and `hidden` `[1, L, hidden]` from `prefill(..., hidden=True)`. Only its
    attention half runs: its MoE's output feeds nothing but logits."""
    with mx.stream(generation_stream), prefilling(model):
        for start in range(0, tokens.size, SPAN):
            x = model.mtp.join(tokens[None, start : start + SPAN], hidden[:, start : start + SPAN])
            _attend(model.mtp, x, [cache], step, None)
