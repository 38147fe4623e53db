"""One model over several machines with MLX's own distributed engine (`mx.distributed`, started
by `mlx.launch`): tensor parallelism (`shard`), pipeline parallelism (`pipeline`), and what a
launched run needs around them (`setup`: load only this rank's part; `agreeing_sampler`: one
token for all ranks; `Watchdog`: an error instead of a hang when a rank stops answering)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import Model, glm4_moe, glm4_moe_lite, glm_moe_dsa
from .models.base import MLP, MoE
from .models.mla import MultiLatentAttention

Group = mx.distributed.Group
MODES = ("tensor", "pipeline")


def _balanced(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of `n`, the first pieces one larger when it is uneven."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def _my_range(n: int, group: Group) -> tuple[int, int]:
    sizes = _balanced(n, group.size())
    start = sum(sizes[: group.rank()])
    return start, start + sizes[group.rank()]


def _keep(linear: nn.Module, start: int, stop: int, side: str) -> None:
    """Keep only outputs (`side="out"`) or inputs (`side="in"`) [start, stop) of a linear layer or
    a stack of expert linears, quantized or not. Copies, so the full tensor can be freed."""
    bits, group_size = getattr(linear, "bits", None), getattr(linear, "group_size", None)
    kept = {}
    for name in ("weight", "scales", "biases", "bias"):
        if name not in linear:
            continue
        w = linear[name]
        if side == "out":
            a, b, axis = start, stop, -1 if name == "bias" else -2
        elif name == "bias":
            raise ValueError("a linear layer split by its inputs cannot have a bias")
        elif group_size is None:
            a, b, axis = start, stop, -1
        elif name == "weight":  # packed: 32 // bits values per uint32
            a, b, axis = start * bits // 32, stop * bits // 32, -1
        else:
            a, b, axis = start // group_size, stop // group_size, -1
        index = (slice(None),) * (w.ndim + axis) + (slice(a, b),)
        kept[name] = mx.contiguous(w[index])
    linear.update(kept)


class AllSum(nn.Module):
    """A linear layer split by its inputs: each rank computes a partial product and `all_sum`
    adds them up, so every rank ends with the full output."""

    def __init__(self, linear: nn.Module, group: Group):
        super().__init__()
        self.linear = linear
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.linear(x), group=self.group)


def _split_ffn(gate: nn.Module, up: nn.Module, down: nn.Module, group: Group, what: str) -> None:
    """Split a SwiGLU block (dense, shared expert or every routed expert) along its intermediate
    dimension, at quantization-group boundaries of `down` so that each slice stays quantized."""
    unit = getattr(down, "group_size", 1)
    width = down["scales"].shape[-1] * unit if "scales" in down else down["weight"].shape[-1]
    if width // unit < group.size():
        groups = f" ({width // unit} quantization group(s) of {unit})" if unit > 1 else ""
        raise ValueError(
            f"{what}: an intermediate size of {width}{groups} cannot be split over "
            f"{group.size()} ranks; use --parallel pipeline or fewer ranks"
        )
    start, stop = (unit * i for i in _my_range(width // unit, group))
    _keep(gate, start, stop, "out")
    _keep(up, start, stop, "out")
    _keep(down, start, stop, "in")


def _shard_gqa(attn: glm4_moe.Attention, group: Group) -> None:
    """Whole key-value heads per rank, each with the query heads that read it (GQA)."""
    if attn.n_kv_heads < group.size():
        raise ValueError(
            f"{attn.n_kv_heads} key-value heads cannot be split over {group.size()} ranks; "
            "use --parallel pipeline or fewer ranks"
        )
    per_kv = attn.n_heads // attn.n_kv_heads
    head_dim = attn.k_proj["weight"].shape[0] // attn.n_kv_heads
    kv0, kv1 = _my_range(attn.n_kv_heads, group)
    q0, q1 = kv0 * per_kv * head_dim, kv1 * per_kv * head_dim
    _keep(attn.q_proj, q0, q1, "out")
    _keep(attn.k_proj, kv0 * head_dim, kv1 * head_dim, "out")
    _keep(attn.v_proj, kv0 * head_dim, kv1 * head_dim, "out")
    _split_output(attn, q0, q1, group)
    attn.n_heads, attn.n_kv_heads = (kv1 - kv0) * per_kv, kv1 - kv0


def _split_output(attn: nn.Module, start: int, stop: int, group: Group) -> None:
    """Keep inputs [start, stop) of `o_proj` (this rank's heads) and sum it over the ranks."""
    group_size = getattr(attn.o_proj, "group_size", 1)
    if start % group_size or stop % group_size:
        raise ValueError(
            f"o_proj is quantized in groups of {group_size}, which do not align with the heads "
            f"of {group.size()} ranks; use --parallel pipeline"
        )
    _keep(attn.o_proj, start, stop, "in")
    attn.o_proj = AllSum(attn.o_proj, group)


def _shard_mla(attn: MultiLatentAttention, group: Group) -> None:
    """Whole heads per rank (latent attention): each keeps its heads' query rows and their
    slices of the per-head up-projections; the down-projections to the latent, which all heads
    share, stay whole, so every rank computes and caches the whole latent."""
    if attn.n_heads < group.size():
        raise ValueError(
            f"{attn.n_heads} attention heads cannot be split over {group.size()} ranks; "
            "use --parallel pipeline or fewer ranks"
        )
    h0, h1 = _my_range(attn.n_heads, group)
    qk = attn.nope + attn.rope_dim
    _keep(attn.q_proj if "q_proj" in attn else attn.q_b_proj, h0 * qk, h1 * qk, "out")
    for per_head in (attn.embed_q, attn.unembed_out):
        per_head.update({k: mx.contiguous(per_head[k][h0:h1]) for k in _PARAMS if k in per_head})
    _split_output(attn, h0 * attn.v_dim, h1 * attn.v_dim, group)
    attn.n_heads = h1 - h0


_PARAMS = ("weight", "scales", "biases")
# How each architecture's attention is split over the ranks, by model_type.
# GLM-5's indexer is small and stays whole on every rank, as the latent projections do.
_SHARD_ATTENTION = {
    glm4_moe.MODEL_TYPE: _shard_gqa,
    glm4_moe_lite.MODEL_TYPE: _shard_mla,
    glm_moe_dsa.MODEL_TYPE: _shard_mla,
}


def shard(model: Model, group: Group | None = None) -> None:
    """Tensor parallelism, in place: each rank of `group` (default: the launched group) keeps
    whole key-value heads with their query heads (latent attention: whole heads, the shared
    latent projections whole on every rank), and a slice of the intermediate dimension of
    every MLP, shared expert and routed expert (cut at quantization-group boundaries); one
    `all_sum` joins attention and one the MLP/MoE of each layer. Uneven counts are split as
    evenly as they go; fewer key-value heads or groups than ranks is an error. The router,
    norms, embedding and heads stay whole on every rank; the MTP layer is split like a layer.
    Call it on a lazily loaded model, before its weights are read.

    Experts are split by intermediate dimension, not by expert: every rank then reads 1/N of each
    chosen expert and all ranks work on every token, where expert parallelism leaves each rank
    the tokens that happen to pick its experts and, with static shapes, computes the others
    anyway. Cuts fall on quantization-group boundaries and may be uneven (GLM-4.5-Air's
    10944-wide dense MLP is 171 groups of 64: 86 + 85), where equal splits would fail. A
    `ValueError` leaves the model part-split: load it again."""
    group = group or mx.distributed.init()
    if group.size() == 1:
        return
    shard_attention = _SHARD_ATTENTION[model.args.model_type]
    for i, layer in enumerate(model.model.layers):  # the MTP layer is sharded like the others
        shard_attention(layer.self_attn, group)
        mlp = layer.mlp
        if isinstance(mlp, MLP):
            _split_ffn(mlp.gate_proj, mlp.up_proj, mlp.down_proj, group, f"layer {i} MLP")
            mlp.down_proj = AllSum(mlp.down_proj, group)
            continue
        assert isinstance(mlp, MoE)
        experts, shared = mlp.switch_mlp, mlp.shared_experts
        _split_ffn(
            experts.gate_proj, experts.up_proj, experts.down_proj, group, f"layer {i} experts"
        )
        _split_ffn(
            shared.gate_proj, shared.up_proj, shared.down_proj, group, f"layer {i} shared expert"
        )
        # One all_sum for the routed and the shared experts together, in MoE.__call__.
        mlp.sharding_group = group


class Elsewhere(nn.Module):
    """A decoder layer that another pipeline stage runs: it passes the hidden state through and
    holds no weights, so this rank never reads them."""

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        return x


class ShapeOnlyEmbedding(nn.Module):
    """Later stages receive their input from the previous stage; the token embedding only has
    to give the shape and dtype of what arrives."""

    def __init__(self, dims: int, dtype: mx.Dtype):
        super().__init__()
        self.dims, self.dtype = dims, dtype

    def __call__(self, tokens: mx.array) -> mx.array:
        return mx.zeros((*tokens.shape, self.dims), self.dtype)


class Receive(nn.Module):
    """The first layer of a stage: takes its input from the previous rank."""

    def __init__(self, layer: nn.Module, group: Group):
        super().__init__()
        self.layer = layer
        self.group = group

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        x = mx.distributed.recv_like(x, self.group.rank() - 1, group=self.group)
        return self.layer(x, mask, cache, state)


class Send(nn.Module):
    """The last layer of a stage (but the final one): hands its output to the next rank."""

    def __init__(self, layer: nn.Module, group: Group):
        super().__init__()
        self.layer = layer
        self.group = group

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Any = None, state: dict | None = None
    ) -> mx.array:
        x = self.layer(x, mask, cache, state)
        x = mx.distributed.send(x, self.group.rank() + 1, group=self.group)
        if cache is not None:
            # Prefill evaluates only the caches: tie the send to them so that it happens then too.
            cache.keys = mx.depends(cache.keys, x)
        return x


def _from_last(x: mx.array, group: Group) -> mx.array:
    """The last rank's `x` on every rank (all shapes alike), kept in the graph."""
    return mx.distributed.all_gather(x, group=group)[-x.shape[0] :]


class FromLastStage(nn.Module):
    """The final norm, run on every rank on the last stage's hidden state, so every rank has the
    logits (the head is kept on every rank) and samples the same token."""

    def __init__(self, norm: nn.Module, group: Group):
        super().__init__()
        self.norm = norm
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(_from_last(x, self.group))


class PipelinedMTP(nn.Module):
    """The MTP layer, held by the last rank; every rank's `predict` returns its result (through
    a collective, so every rank must evaluate the same outputs, as for the main model)."""

    def __init__(self, mtp: nn.Module | None, group: Group, vocab_size: int):
        super().__init__()
        self.mtp = mtp
        self.group = group
        self.vocab_size = vocab_size

    def predict(
        self, tokens: mx.array, hidden: mx.array, cache: Any = None
    ) -> tuple[mx.array, mx.array]:
        if self.mtp is not None:
            logits, h = self.mtp.predict(tokens, hidden, cache)
        else:
            # Tied to `hidden`, so that the collectives behind it run here as on the last rank.
            logits, h = mx.depends(
                [mx.zeros((*tokens.shape, self.vocab_size), hidden.dtype), mx.zeros_like(hidden)],
                [hidden],
            )
        return (
            _from_last(logits.astype(hidden.dtype), self.group),
            _from_last(h.astype(hidden.dtype), self.group),
        )


def pipeline(model: Model, group: Group | None = None) -> None:
    """Pipeline parallelism, in place: rank r of `group` (default: the launched group) keeps the
    r-th of contiguous, even ranges of the main layers (rank 0 the first layers and the
    embedding, the last rank the last layers and the MTP layer), takes its input from rank r - 1
    and sends its output to rank r + 1. The last rank's hidden state goes to every rank, which
    all keep the final norm and head, so every rank gets the logits. Call it on a lazily loaded
    model: the other ranks' layers are dropped unread."""
    group = group or mx.distributed.init()
    n, size, rank = model.args.num_hidden_layers, group.size(), group.rank()
    if size == 1:
        return
    if n < size:
        raise ValueError(f"{n} layers cannot be split over {size} pipeline ranks")
    # The MTP layer counts as one of the last rank's layers, so that each rank holds as many.
    has_mtp = model.mtp is not None
    sizes = _balanced(n + has_mtp, size)
    sizes[-1] -= has_mtp
    if sizes[-1] == 0:
        sizes = _balanced(n, size)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    layers = model.model.layers
    for i in range(n):
        if not start <= i < stop:
            layers[i] = Elsewhere()
    if rank > 0:
        layers[start] = Receive(layers[start], group)
        embed = model.model.embed_tokens
        # The last rank keeps it when its MTP layer reads the main embedding (GLM-4.6 layout).
        mtp_reads_it = rank == size - 1 and has_mtp and not model.args.mtp_own_embeddings
        if not model.args.tie_word_embeddings and not mtp_reads_it:
            dtype = (embed["scales"] if "scales" in embed else embed["weight"]).dtype
            model.model.embed_tokens = ShapeOnlyEmbedding(model.args.hidden_size, dtype)
    if rank < size - 1:
        layers[stop - 1] = Send(layers[stop - 1], group)
    model.model.norm = FromLastStage(model.model.norm, group)
    if model.mtp is not None:
        mtp = model.mtp if rank == size - 1 else None
        layers[n] = PipelinedMTP(mtp, group, model.args.vocab_size)


def materialize(model: nn.Module) -> None:
    """Read this rank's weights now, one tensor at a time: a split tensor is read whole, so
    evaluating them one by one keeps the peak near this rank's share plus one tensor."""
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    mx.clear_cache()


def setup(model: Model, group: Group, mode: str = "tensor") -> None:
    """Split a lazily loaded model over `group` (`mode` "tensor" or "pipeline"), then read this
    rank's weights and wait for the other ranks."""
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {', '.join(MODES)}, not {mode!r}")
    (shard if mode == "tensor" else pipeline)(model, group)
    materialize(model)


def barrier(group: Group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def agreeing_sampler(
    sampler: Callable[[mx.array], mx.array], group: Group
) -> Callable[[mx.array], mx.array]:
    """Rank 0's draw for every rank. The logits agree, but each rank's random state need not, and
    the ranks must feed the same next token."""
    if group.size() == 1:
        return sampler

    def sample(logprobs: mx.array) -> mx.array:
        token = sampler(logprobs)
        mine = token if group.rank() == 0 else mx.zeros_like(token)
        return mx.distributed.all_sum(mine, group=group)

    return sample


class Watchdog:
    """Ends the process with an error when `beat()` has not been called for `timeout` seconds.

    A rank that exits closes its sockets and the ring backend raises at once; one that hangs (or
    a backend that waits forever on a dead peer) would leave the others blocked in a collective.
    Collectives release the GIL while they wait, so this thread can still act."""

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.last = time.monotonic()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                sys.stderr.write(
                    f"error: rank {self.rank}: no progress for {self.timeout:g} s; another rank "
                    "has probably died or hung. Exiting.\n"
                )
                sys.stderr.flush()
                os._exit(1)
