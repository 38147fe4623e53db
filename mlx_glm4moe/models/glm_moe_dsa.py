"""GLM-5, GLM-5.1 and GLM-5.2 (`glm_moe_dsa`): a port of transformers' `GlmMoeDsaForCausalLM`,
with the nextn layer it drops. GLM-4.7-Flash's latent attention (`mla`) made sparse by
DeepSeek's sparse attention (DSA): a small "lightning indexer" scores every cached position for
each query, and the attention sees only the `index_topk` best.

IndexShare (GLM-5.2): `indexer_types` marks each layer "full" (it has an indexer) or "shared"
(no indexer weights; it reuses the selection of the last full layer before it, which the pass's
`state` carries, see `base.DecoderLayer`). The nextn layer always has its own indexer.

A full layer caches its indexer keys beside the latent, in the same mlx-lm `KVCache` (keys:
[latent | indexer key], values: the rotary key), so prompt caches, trimming, batching and the MTP
cache hold them with no new cache type.

Cost: every query row, decoded or in a prompt, gathers the latents of its selected positions,
so attention reads `index_topk` positions whatever the context; only the indexer's scoring is
linear in it. A prompt is scored in blocks of query rows so that no score tensor exceeds
`SCORE_BUDGET` elements (see `block_rows`), where a whole-prompt pass would hold heads x L x T
of them. `head_dim` in config.json is ignored, as
transformers overwrites it (the rotary dims are `qk_rope_head_dim`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask

from . import base, mla

MODEL_TYPE = "glm_moe_dsa"
FAMILY = "GLM-5, GLM-5.1, GLM-5.2"
# transformers' indexer key norm: a LayerNorm with bias, at this epsilon whatever the config says.
INDEXER_NORM_EPS = 1e-6
# The most (query, key) scores of all heads one block of prompt rows may hold at once: the rotary
# scores, the attention's scores and their softmax, and the indexer's per-head scores are each
# at most this many float32 elements (256 MiB).
SCORE_BUDGET = 1 << 26
INDEXER_TYPES = ("full", "shared")


@dataclass(kw_only=True)
class ModelArgs(mla.MLAArgs):
    model_type: str = MODEL_TYPE
    first_k_dense_replace: int = 3
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    indexer_types: list[str] | None = None
    # How transformers derives `indexer_types` when config.json has none.
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    index_topk_pattern: str | list[str] | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        args = super().from_dict(config)
        n = args.num_hidden_layers
        if args.indexer_types is None:
            pattern = args.index_topk_pattern
            if isinstance(pattern, str):
                args.indexer_types = [{"F": "full", "S": "shared"}[c] for c in pattern]
            elif pattern is not None:
                args.indexer_types = list(pattern)
            else:
                freq, skip = max(args.index_topk_freq, 1), args.index_skip_topk_offset
                args.indexer_types = [
                    "full" if max(i - skip + 1, 0) % freq == 0 else "shared" for i in range(n)
                ]
        types = args.indexer_types
        if len(types) != n or set(types) - set(INDEXER_TYPES) or types[0] != "full":
            raise ValueError(
                f"indexer_types must give 'full' or 'shared' for each of the {n} layers, "
                "the first 'full'"
            )
        return args


class Indexer(nn.Module):
    """DSA's lightning indexer (transformers' `GlmMoeDsaIndexer`). Query heads come from the
    query LoRA's normed output, one key per token from the layer's input; interleaved RoPE turns
    the first `qk_rope_head_dim` dims of each (the main attention turns its last ones). A key's
    score for a query is sum_h w_h(x) heads^-1/2 ReLU(q_h . k dim^-1/2), in float32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.index_n_heads, args.index_head_dim
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        # Kept float32 by transformers and by our converter (see weights.stays_float32).
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.rope = mla.rope(args)

    def keys(self, x: mx.array, offset: Any) -> mx.array:
        """This chunk's keys [B, 1, L, dim]."""
        return self.rope(self.k_norm(self.wk(x))[:, None], offset=offset)

    def queries(self, x: mx.array, q_resid: mx.array, offset: Any) -> tuple[mx.array, mx.array]:
        """The query heads [B, heads, L, dim] and their weights [B, heads, L, 1], both float32,
        the weights carrying both scales."""
        B, L, _ = x.shape
        q = self.wq_b(q_resid).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset).astype(mx.float32)
        w = x.astype(mx.float32) @ self.weights_proj.weight.astype(mx.float32).T
        w = w * (self.n_heads * self.head_dim) ** -0.5
        return q, w.transpose(0, 2, 1)[..., None]


def index_scores(q: mx.array, w: mx.array, keys: mx.array, mask: mx.array | None) -> mx.array:
    """The indexer's scores [B, 1, L, T] of the cached `keys` [B, 1, T, dim] (float32) for
    queries `q` with weights `w` (`Indexer.queries`); -inf where `mask` is False."""
    scores = (mx.maximum(q @ keys.swapaxes(-1, -2), 0) * w).sum(axis=1, keepdims=True)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    return scores


def select(scores: mx.array, k: int) -> mx.array:
    """The positions of the `k` best scores of each row (in no particular order)."""
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]


def block_rows(batch: int, context: int, heads: int) -> int:
    """Query rows per prompt block: the most that keep `heads` x rows x `context` scores per
    batch row within `SCORE_BUDGET`."""
    return max(1, SCORE_BUDGET // (batch * context * heads))


class Attention(mla.MultiLatentAttention):
    """`GlmMoeDsaAttention`: latent attention over the positions the indexer selects. A layer
    with an indexer ("full") selects and leaves its selection in the pass's `state`; a "shared"
    one takes it from there."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__(args, layer_idx)
        self.topk = args.index_topk
        self.score_heads = max(args.num_attention_heads, args.index_n_heads)
        if layer_idx >= args.num_hidden_layers or args.indexer_types[layer_idx] == "full":
            self.indexer = Indexer(args)

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        B, L, _ = x.shape
        mla.refuse_quantized(cache)
        dtype = base.attention_dtype(x, self.kv_a_proj_with_mqa, cache)
        offset = cache.offset if cache is not None else 0
        q_nope, q_pe, q_resid, latent, k_pe = self.project(x, offset, dtype)
        full = "indexer" in self
        if full:
            keys = self.indexer.keys(x, offset).astype(dtype)
            latent = mx.concatenate([latent, keys], axis=-1)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)
        latent, keys = mx.split(latent, [self.kv_rank], axis=-1)
        T = latent.shape[2]
        if isinstance(mask, str):
            mask = create_causal_mask(L, offset)
        sparse = T > self.topk
        if sparse and full:
            q_idx, w_idx = self.indexer.queries(x, q_resid, offset)
            keys = keys.astype(mx.float32)
        elif sparse:
            if state is None or "selection" not in state:
                raise ValueError("a shared-indexer layer needs a full layer's selection before it")
            chosen = state["selection"]

        rows = min(L, block_rows(B, T, self.score_heads))
        outs, picks = [], []
        for i in range(0, L, rows):
            part = slice(i, i + rows)
            m = None if mask is None else mask[..., part, :]
            pick = None
            if sparse:
                if full:
                    scores = index_scores(q_idx[:, :, part], w_idx[:, :, part], keys, m)
                    pick = select(scores, self.topk)
                    picks.append(pick)
                else:
                    pick = chosen[:, :, part]
            out = self.attend_selected(q_nope[:, :, part], q_pe[:, :, part], latent, k_pe, m, pick)
            if L > rows:
                # One block in flight at a time: left lazy, the backend queues the next blocks'
                # ops (and allocates their outputs) while this one runs, and the peak grew with
                # the number of blocks (a 64-head layer at an 8K context: 5 GiB, not ~1.2).
                mx.eval(out, picks)
            outs.append(out)
        if full and state is not None:
            state["selection"] = mx.concatenate(picks, axis=2) if sparse else None
        out = mx.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1).astype(x.dtype))

    def attend_selected(
        self,
        q_nope: mx.array,
        q_pe: mx.array,
        latent: mx.array,
        k_pe: mx.array,
        mask: mx.array | None,
        pick: mx.array | None,
    ) -> mx.array:
        """Attention over the positions `pick` [B, 1, rows, k] (None: all of them) under the
        boolean `mask`. Each query row gathers its own positions' latents and rotary keys and
        attends in the latent space: its cost is k positions, not the context."""
        if pick is None:
            return self.attend(q_nope, q_pe, latent, k_pe, mask, absorbed=q_nope.shape[2] == 1)
        B, H, L, _ = q_nope.shape
        T, k = latent.shape[2], pick.shape[-1]
        where = pick.reshape(B, L * k, 1)

        def gathered(x: mx.array) -> mx.array:  # [B, 1, T, d] -> [B * L, 1, k, d]
            d = x.shape[-1]
            rows = mx.take_along_axis(x[:, 0], mx.broadcast_to(where, (B, L * k, d)), axis=1)
            return rows.reshape(B * L, 1, k, d)

        def per_row(q: mx.array) -> mx.array:  # [B, H, L, d] -> [B * L, H, 1, d]
            return q.transpose(0, 2, 1, 3).reshape(B * L, H, 1, -1)

        if mask is not None:
            mask = mx.take_along_axis(mx.broadcast_to(mask, (B, 1, L, T)), pick, axis=-1)
            mask = mask.reshape(B * L, 1, 1, k)
        out = self.attend(
            per_row(q_nope), per_row(q_pe), gathered(latent), gathered(k_pe), mask, absorbed=True
        )
        return out.reshape(B, L, H, -1).transpose(0, 2, 1, 3)


class Model(base.Model):
    """`GlmMoeDsaForCausalLM`, with the nextn layer."""

    Attention = Attention


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """`kv_b_proj` split per head (`mla.sanitize`); the indexer's tensors are ours as they are."""
    return mla.sanitize(weights, args)
