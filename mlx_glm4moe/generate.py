"""Text generation: the decode loop (on mlx-lm's KV caches and samplers) and its command line."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import perf_counter

import mlx.core as mx
from mlx_lm.generate import generation_stream, maybe_quantize_kv_cache, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import distributed
from .model import ACTIVATIONS, Model
from .mtp import CLEAR_CACHE_EVERY
from .streaming import prefilling

Sampler = Callable[[mx.array], mx.array]
# The command line's MTP default for checkpoints that have the layer (see the MTP section of the
# README for the measurements behind it).
MTP_BY_DEFAULT = True


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: mlx-lm's fields.

    text: the new text segment; token: the token id; logprobs: the log-probabilities it was drawn
    from; from_draft: it was an accepted MTP draft; prompt_tps / generation_tps: tokens per
    second; peak_memory: GB; finish_reason: None while generating, then "stop", "length" or
    "cancelled".
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    # With MTP: accepted / drafted so far; on the last response, `MTPStats.as_dict()`.
    mtp_acceptance: float | None = None
    mtp_stats: dict | None = None


def generate_step(
    prompt: mx.array,
    model: Model,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 2048,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for each generated token. `prompt_cache` (updated in place) may
    already hold a prefix, in which case `prompt` is only the new part. With `kv_bits`, the KV
    cache is quantized (mlx-lm's QuantizedKVCache) once it holds `quantized_kv_start` tokens."""
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))

    def quantize_cache() -> None:
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)

    # Prefill all but the last token in chunks; only the cache is evaluated, so the logits of the
    # prefix are never computed. The work runs on mlx-lm's generation stream, off the default
    # one, which the caller's code between tokens may use.
    while prompt.size > 1:
        n = min(prefill_step_size, prompt.size - 1)
        with mx.stream(generation_stream), prefilling(model):
            model(prompt[None, :n], cache=cache)
            quantize_cache()
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
        mx.clear_cache()

    def step(y: mx.array) -> tuple[mx.array, mx.array]:
        with mx.stream(generation_stream):
            logits = model(y[None], cache=cache)[0, -1]
            quantize_cache()
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            return sampler(logprobs), logprobs

    y, logprobs = step(prompt)
    mx.async_eval(y, logprobs)
    for n in range(max_tokens):
        # Queue the next step before reading this one, so the device never waits on Python.
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y.reshape(1))
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        if n % CLEAR_CACHE_EVERY == CLEAR_CACHE_EVERY - 1:
            mx.clear_cache()
        if n + 1 < max_tokens:
            y, logprobs = next_y, next_logprobs


def encode(tokenizer: TokenizerWrapper, prompt: str | list[int]) -> list[int]:
    """Token ids for a prompt; a string gets GLM's `[gMASK]<sop>` prefix unless it has one (as
    chat-template output does)."""
    if not isinstance(prompt, str):
        return list(prompt)
    return tokenizer.encode(prompt, add_special_tokens=not prompt.startswith("[gMASK]"))


def stream_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    sampler: Sampler | None = None,
    prompt_cache: list | None = None,
    cancel: threading.Event | None = None,
    prefill_step_size: int = 2048,
    mtp: bool = False,
    num_draft: int = 1,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or token ids), yielding a `GenerationResponse` per token.

    Stops on every id of the tokenizer's `eos_token_ids` (GLM has three), after `max_tokens`, or
    when `cancel` (a `threading.Event`, settable from another thread) is set. Closing the
    generator also stops it. `prompt_cache` (from `model.make_cache()`) is updated in place.

    `mtp` drafts `num_draft` tokens per step with the checkpoint's MTP layer and verifies them
    in one pass (see `mtp.py`): the same tokens when greedy, the same distribution when
    sampling. Its prompt cache comes from `mtp.make_cache(model)`.
    """
    if seed is not None:
        mx.random.seed(seed)
    tokens = encode(tokenizer, prompt)
    if not tokens:
        raise ValueError("The prompt is empty")
    stats = None
    if mtp:
        from .mtp import MTPStats, mtp_generate_step, sampling_for

        stats = MTPStats(num_draft)
        steps = mtp_generate_step(
            tokens,
            model,
            max_tokens=max_tokens,
            num_draft=num_draft,
            sampling=sampling_for(sampler, temp, top_p, top_k, min_p),
            prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size,
            stats=stats,
        )
    else:
        if prompt_cache is not None and len(prompt_cache) != len(model.layers):
            raise ValueError(
                "The prompt cache does not fit the model (one with an MTP part needs mtp=True)"
            )
        plain = generate_step(
            mx.array(tokens),
            model,
            max_tokens=max_tokens,
            sampler=sampler or make_sampler(temp, top_p, min_p, top_k=top_k),
            prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size,
        )
        steps = ((token, logprobs, False) for token, logprobs in plain)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = tokenizer.eos_token_ids
    mx.reset_peak_memory()

    # On Metal, the weights stay wired while this generates (mlx-lm's wired_limit), then the
    # old limit comes back: a server that drops a model leaves no memory pinned.
    with wired_limit(model, [generation_stream]):
        tic = perf_counter()
        prompt_tps = 0.0
        for n, (token, logprobs, from_draft) in enumerate(steps):
            if n == 0:
                prompt_tps = len(tokens) / (perf_counter() - tic)
                tic = perf_counter()
            finish = None
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
            elif token in eos:
                finish = "stop"
            else:
                detokenizer.add_token(token)
                if n + 1 == max_tokens:
                    finish = "length"
            if finish:
                detokenizer.finalize()
            elapsed = perf_counter() - tic
            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=logprobs,
                from_draft=from_draft,
                prompt_tokens=len(tokens),
                prompt_tps=prompt_tps,
                generation_tokens=n + 1,
                generation_tps=(n + 1) / elapsed if elapsed > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
                mtp_acceptance=stats.acceptance if stats is not None else None,
                mtp_stats=stats.as_dict() if stats is not None and finish else None,
            )
            if finish:
                return


def generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate and return the text (keyword arguments as for `stream_generate`)."""
    text = ""
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += r.text
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return text


def main(argv: list[str] | None = None) -> None:
    from . import streaming
    from .chat import interactive, load_tools, print_reply, stream_chat
    from .loading import load, read_config, resolve

    p = argparse.ArgumentParser(description="Generate text with a GLM-4.5 (glm4_moe) model.")
    p.add_argument("--model", help="Model folder or Hugging Face repo (default: bundled demo).")
    p.add_argument("--prompt", "-p", default="Hello! Who are you?")
    p.add_argument("--system", help="System message.")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-think", action="store_true", help="Turn thinking off.")
    p.add_argument("--tools", help="JSON file with an OpenAI tools list to offer the model.")
    p.add_argument("--chat", action="store_true", help="Interactive multi-turn chat.")
    p.add_argument(
        "--mtp",
        action=argparse.BooleanOptionalAction,
        help="Speculative decoding with the checkpoint's MTP layer (default: "
        + ("on when it has one)." if MTP_BY_DEFAULT else "off)."),
    )
    p.add_argument(
        "--num-draft", "--num-draft-tokens", type=int, default=1, help="Tokens drafted per step."
    )
    experts = p.add_mutually_exclusive_group()
    experts.add_argument(
        "--expert-slots",
        type=int,
        help="Keep the routed experts on disk, at most N per MoE layer in memory.",
    )
    experts.add_argument(
        "--expert-cache-gb", type=float, help="As --expert-slots, with as many as fit in G GB."
    )
    p.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default="auto",
        help="Activation dtype: auto (float32 on the CPU, the weights' elsewhere), native (the "
        "weights' everywhere: the GPU code path) or float32. For debugging.",
    )
    p.add_argument(
        "--parallel",
        choices=distributed.MODES,
        default="tensor",
        help="How to split the model when started by mlx.launch over several ranks.",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="Seconds a rank waits on the others before exiting with an error (mlx.launch).",
    )
    a = p.parse_args(argv)
    if a.max_tokens < 1 or a.num_draft < 1:
        p.error("--max-tokens and --num-draft must be at least 1")
    if a.temp < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or not 0 <= a.min_p <= 1:
        p.error("need --temp >= 0, 0 < --top-p <= 1, --top-k >= 0, 0 <= --min-p <= 1")

    group = mx.distributed.init()
    ranks = group.size()
    if ranks > 1 and (a.chat or a.mtp or a.expert_slots or a.expert_cache_gb):
        p.error("--chat, --mtp and expert streaming run in a single process, not under mlx.launch")
    show = group.rank() == 0  # rank 0 prints; the others compute the same tokens
    try:
        tools = load_tools(a.tools) if a.tools else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    if a.model is None and show:
        print(
            "[Using the bundled demo model: a 4M-parameter GLM-4.5-shaped MoE trained for about "
            "20 minutes on one CPU core (Python docs, synthetic chats); expect simple answers. "
            "Pass --model for a real one.]",
            file=sys.stderr,
        )
    try:
        slots = a.expert_slots
        if a.expert_cache_gb is not None:
            path = resolve(a.model)
            slots = streaming.slots_for_budget(path, read_config(path), a.expert_cache_gb)
        # Under mlx.launch each rank keeps only its share: the whole need not fit in one.
        model, tokenizer = load(
            a.model, expert_slots=slots, activations=a.activations, force=ranks > 1
        )
        if ranks > 1:
            distributed.setup(model, group, a.parallel)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        sys.exit(f"error: {e}")
    if a.mtp and model.mtp is None:
        sys.exit("error: --mtp: this checkpoint has no MTP layer")
    mtp = a.mtp if a.mtp is not None else MTP_BY_DEFAULT and model.mtp is not None and ranks == 1
    sampling = dict(max_tokens=a.max_tokens, seed=a.seed, mtp=mtp, num_draft=a.num_draft)
    watchdog = None
    if ranks > 1:
        watchdog = distributed.Watchdog(a.dist_timeout, group.rank())
        distributed.barrier(group)
        agreeing = distributed.agreeing_sampler(
            make_sampler(a.temp, a.top_p, a.min_p, top_k=a.top_k), group
        )

        def sampler(logprobs: mx.array) -> mx.array:
            watchdog.beat()  # one draw per decode step: progress
            return agreeing(logprobs)

        sampling["sampler"] = sampler
    else:
        sampling.update(temp=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p)
    if a.chat:
        interactive(
            model,
            tokenizer,
            system=a.system,
            tools=tools,
            enable_thinking=not a.no_think,
            **sampling,
        )
        return
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
        {"role": "user", "content": a.prompt}
    ]
    events = stream_chat(
        model, tokenizer, messages, tools, enable_thinking=not a.no_think, **sampling
    )
    try:
        done = print_reply(events) if show else [e for e in events if e["type"] == "done"][-1]
    except RuntimeError as e:
        if ranks == 1:
            raise
        # The ring backend raises this way when a peer's connection drops (a rank died).
        sys.exit(f"error: rank {group.rank()} lost the other ranks: {e}")
    if watchdog:
        watchdog.stop()
    if not show:
        return
    u, stats = done["usage"], done["stats"]
    print(
        f"Prompt: {u['prompt_tokens']} tokens, {stats['prompt_tps']:.3g} tokens/s\n"
        f"Generation: {u['completion_tokens']} tokens, {stats['generation_tps']:.3g} tokens/s\n"
        f"Peak memory: {stats['peak_memory']:.3f} GB",
        file=sys.stderr,
    )
    if stats["mtp"]:
        rates = ", ".join(f"{x:.0%}" for x in stats["mtp"]["acceptance_per_position"])
        print(
            f"MTP: acceptance {rates} per draft position, "
            f"{stats['mtp']['tokens_per_pass']:.2f} tokens per forward pass",
            file=sys.stderr,
        )
    if slots is not None:  # prompt reads included
        print(streaming.summary(streaming.stats(model), u["completion_tokens"]), file=sys.stderr)


if __name__ == "__main__":
    main()
