"""Benchmarks: speed against mlx-lm on the same weights with the memory-bandwidth roofline
(`python -m mlx_glm4moe.bench`), plain against MTP decoding (`bench mtp`), and expert streaming
against cache size (`bench streaming`).

Both implementations load the same converted folder in one process and run in alternation (the
order flips every repeat), so machine load drifts hit both alike. Each run prefills a fixed
random prompt and decodes greedily through the implementation's own `generate_step`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter, process_time

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models.cache import CacheList, KVCache

from . import streaming
from .convert import convert
from .generate import encode, generate_step, stream_generate
from .loading import load
from .models import ACTIVATIONS, activation_dtype
from .synthetic import make_agreeing_checkpoint, make_checkpoint
from .weights import read_config, resolve

METRICS = ("prefill_tps", "decode_tps", "ttft_s", "peak_memory_gb")
# The weights each decoded token reads, by where they sit in the model.
PARTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "router",
    "shared_experts",
    "routed_experts",
    "norms",
    "head",
)


# `--synthetic --preset NAME`: the synthetic preset with that model's proportions, scaled down.
BENCH_PRESETS = {"air": "bench", "lite": "lite-bench", "glm5": "glm5-bench"}
# `bench mtp --synthetic --preset NAME`: the tiny presets an agreeing MTP layer is built for.
MTP_PRESETS = ("air", "glm45", "lite", "glm5", "glm52")


def bench_checkpoint(out: str | Path, q_bits: int = 4, preset: str = "air") -> Path:
    """Build a synthetic bench checkpoint (`preset`: GLM-4.5-Air's, GLM-4.7-Flash's ("lite") or
    GLM-5's proportions, scaled down; see `BENCH_PRESETS` and `synthetic.PRESETS`) in bfloat16
    like the published weights, and convert it to `q_bits`."""
    out = Path(out)
    hf = make_checkpoint(out / "hf", BENCH_PRESETS[preset], dtype="bfloat16", num_shards=1)
    return convert(str(hf), str(out / f"q{q_bits}"), quantize=True, q_bits=q_bits)


def _part(name: str) -> str:
    if name.startswith("self_attn."):
        return "attention"
    if name.startswith("mlp.switch_mlp."):
        return "routed_experts"
    if name.startswith("mlp.gate."):
        return "router"
    if name.startswith("mlp.shared_experts."):
        return "shared_experts"
    if name.startswith("mlp."):
        return "dense_mlp"
    return "norms"


def decode_bytes(model) -> dict[str, int]:
    """Weight bytes one decoded token reads, from the model's arrays at their stored width
    (quantized weights with their scales and biases): the attention, dense and shared MLPs, the
    router, top-k of the routed experts per MoE layer, norms, one embedding row and the head.
    KV-cache reads are not counted. Works on ours and on mlx-lm's model (same names)."""
    args = model.args
    active = args.num_experts_per_tok / args.n_routed_experts
    parts = dict.fromkeys(PARTS, 0.0)
    for layer in model.layers:
        for name, a in tree_flatten(layer.parameters()):
            part = _part(name)
            parts[part] += a.nbytes * (active if part == "routed_experts" else 1)
    embed = model.model.embed_tokens
    parts["embedding"] = sum(a.nbytes for _, a in tree_flatten(embed.parameters())) / (
        args.vocab_size
    )
    parts["norms"] += model.model.norm.weight.nbytes
    head = embed if args.tie_word_embeddings else model.lm_head
    parts["head"] = sum(a.nbytes for _, a in tree_flatten(head.parameters()))
    out = {k: round(v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s from the best of `repeats` copies of an `nbytes` array (each
    copy reads and writes `nbytes`)."""
    a = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        tic = perf_counter()
        b = a * 1
        mx.eval(b)
        best = min(best, perf_counter() - tic)
        del b
    return 2 * nbytes / best / 1e9


def _decode_params(model) -> list:
    """What plain decoding reads; our MTP layer stays on disk until a drafter asks for it."""
    n = model.args.num_hidden_layers
    return [
        p for k, p in tree_flatten(model.parameters()) if not k.startswith(f"model.layers.{n}.")
    ]


def load_timed(name: str, path: Path, activations: str = "auto") -> tuple[object, float, float]:
    """Load one implementation; returns (model, seconds, resident GB of its weights).
    `activations` is ours (see `load`); mlx-lm's run in the weights' dtype ("native")."""
    before = mx.get_active_memory()
    tic = perf_counter()
    model, _ = load(path, activations=activations) if name == "ours" else mlx_lm.load(str(path))
    mx.eval(_decode_params(model))
    return model, perf_counter() - tic, (mx.get_active_memory() - before) / 1e9


def step_fn(name: str) -> Callable:
    return generate_step if name == "ours" else mlx_lm_generate_step


def run_once(
    name: str, model, prompt: mx.array, gen_tokens: int, resident_gb: float, **kwargs
) -> dict:
    """One prefill + greedy decode. Peak memory is the model's resident weights plus the peak
    above what was allocated before the run (the other implementation's weights are excluded)."""
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tokens = []
    tic = perf_counter()
    for token, _ in step_fn(name)(prompt, model, max_tokens=gen_tokens, sampler=greedy, **kwargs):
        if not tokens:
            ttft, tic = perf_counter() - tic, perf_counter()
        tokens.append(int(token))
    decode_s = perf_counter() - tic
    return {
        "prefill_tps": prompt.size / ttft,
        "decode_tps": (gen_tokens - 1) / decode_s if gen_tokens > 1 else float("nan"),
        "ttft_s": ttft,
        "peak_memory_gb": resident_gb + (mx.get_peak_memory() - base) / 1e9,
        "tokens": tokens,
    }


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        values = [r[m] for r in runs]
        out[m] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": values,
        }
    return out


def benchmark(
    path: Path,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repeats: int = 5,
    compare: bool = True,
    prefill_step_size: int = 2048,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    seed: int = 0,
    activations: str = "auto",
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Run the benchmark; returns the report (what `--json` writes)."""
    names = ["ours", "mlx-lm"] if compare else ["ours"]
    loaded = {}
    for name in names:
        model, seconds, resident = load_timed(name, path, activations)
        log(f"loaded {name} in {seconds:.2f} s ({resident:.3f} GB)")
        loaded[name] = (model, resident, seconds)
    args = loaded["ours"][0].args
    ids = np.random.default_rng(seed).integers(0, args.vocab_size, prompt_tokens)
    prompt = mx.array(ids, dtype=mx.uint32)
    kwargs = {"prefill_step_size": prefill_step_size}
    if kv_bits is not None:
        kwargs.update(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=0)

    for name in names:  # warm up (compiled functions, allocator) on a short prompt
        run_once(name, loaded[name][0], prompt[:64], 4, 0.0, **kwargs)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(1, repeats + 1):
        for name in names if r % 2 else names[::-1]:
            model, resident, _ = loaded[name]
            res = run_once(name, model, prompt, gen_tokens, resident, **kwargs)
            runs[name].append(res)
            log(
                f"[{r}/{repeats}] {name:6s} prefill {res['prefill_tps']:8.1f} tok/s  "
                f"decode {res['decode_tps']:7.2f} tok/s"
            )

    bandwidth = copy_bandwidth()
    per_token = decode_bytes(loaded["ours"][0])
    report = {
        "model": str(path),
        "device": str(mx.default_device()),
        "mlx_version": mx.__version__,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        "prefill_step_size": prefill_step_size,
        "kv_bits": kv_bits,
        "activations": activations,
        "decode_bytes_per_token": per_token,
        "copy_bandwidth_gbs": bandwidth,
        "results": {},
    }
    for name in names:
        model, resident, seconds = loaded[name]
        stats = summarize(runs[name])
        roofline = bandwidth * 1e9 / per_token["total"]
        stats.update(
            load_s=seconds,
            weights_gb=resident,
            roofline_decode_tps=roofline,
            roofline_fraction=stats["decode_tps"]["median"] / roofline,
        )
        report["results"][name] = stats
    if compare:
        ours, theirs = report["results"]["ours"], report["results"]["mlx-lm"]
        report["ratios"] = {m: ours[m]["median"] / theirs[m]["median"] for m in METRICS}
        report["ratios"]["load_s"] = ours["load_s"] / theirs["load_s"]
        report["same_tokens"] = runs["ours"][0]["tokens"] == runs["mlx-lm"][0]["tokens"]
    return report


def format_table(report: dict) -> str:
    names = list(report["results"])
    rows = [
        ("prefill tokens/s", "prefill_tps", "{:.1f}"),
        ("decode tokens/s", "decode_tps", "{:.2f}"),
        ("time to first token (s)", "ttft_s", "{:.3f}"),
        ("peak memory (GB)", "peak_memory_gb", "{:.3f}"),
    ]
    head = "| metric | " + " | ".join(names) + (" | ours / mlx-lm |" if len(names) > 1 else " |")
    lines = [head, "|---" * (len(names) + 1 + (len(names) > 1)) + "|"]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            s = report["results"][n][key]
            cells.append(
                f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"
            )
        ratio = [f"{report['ratios'][key]:.2f}×"] if len(names) > 1 else []
        lines.append(f"| {label} | " + " | ".join(cells + ratio) + " |")
    loads = [f"{report['results'][n]['load_s']:.2f}" for n in names]
    ratio = [f"{report['ratios']['load_s']:.2f}×"] if len(names) > 1 else []
    lines.append("| load time (s) | " + " | ".join(loads + ratio) + " |")
    fracs = [f"{report['results'][n]['roofline_fraction']:.1%}" for n in names]
    lines.append(
        "| share of bandwidth roofline | " + " | ".join(fracs) + (" | |" if ratio else " |")
    )
    b = report["decode_bytes_per_token"]
    lines.append("")
    lines.append(
        f"Weights read per decoded token: {b['total'] / 1e6:.2f} MB ("
        + ", ".join(f"{k} {b[k] / 1e6:.2f}" for k in PARTS)
        + f"); copy bandwidth {report['copy_bandwidth_gbs']:.1f} GB/s → roofline "
        f"{report['results'][names[0]]['roofline_decode_tps']:.1f} tokens/s."
    )
    lines.append(
        f"Medians (min–max) of {report['repeats']} runs, {report['prompt_tokens']}-token "
        f"prompt, {report['gen_tokens']} generated, on {report['device']}."
    )
    if "same_tokens" in report:
        lines.append(f"Greedy tokens identical: {report['same_tokens']}.")
    return "\n".join(lines)


def device_summary() -> dict:
    """What MLX runs on: the device's name and memory (the host's on the CPU), MLX's and
    mlx-lm's versions."""
    info = mx.device_info()
    memory = info.get("memory_size")
    if memory is None and hasattr(os, "sysconf"):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    backend = "cpu"
    if mx.default_device() == mx.gpu:
        backend = "metal" if mx.metal.is_available() else "cuda"
    return {
        "device": backend,
        "name": info.get("device_name") or platform.processor() or platform.machine(),
        "memory_gb": memory / 1e9 if memory else None,
        "recommended_working_set_gb": (info.get("max_recommended_working_set_size") or 0) / 1e9
        or None,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
    }


def agreement(ours, theirs, prompt: mx.array, steps: int) -> dict:
    """Ours against mlx-lm on one prompt: the largest logit difference over the prompt's
    positions (one forward pass each), and how many of `steps` greedy tokens are the same."""
    a, b = ours(prompt[None]), theirs(prompt[None])
    diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    tokens = [
        [int(t) for t, _ in step_fn(name)(prompt, model, max_tokens=steps, sampler=greedy)]
        for name, model in (("ours", ours), ("mlx-lm", theirs))
    ]
    same = next((i for i, (x, y) in enumerate(zip(*tokens, strict=True)) if x != y), steps)
    return {"max_logit_diff": diff, "greedy_tokens_equal": same, "greedy_steps": steps}


def mtp_comparison(model, tokenizer, prompt: list[int], tokens: int) -> dict:
    """Greedy decode with and without MTP (one draft) from the same prompt, after a short
    warm-up of each."""
    for mtp in (True, False):
        list(stream_generate(model, tokenizer, prompt, 4, mtp=mtp))
    runs = {}
    for mtp in (True, False):
        *_, last = stream_generate(model, tokenizer, prompt, tokens, mtp=mtp)
        runs[mtp] = last
    stats = runs[True].mtp_stats or {}
    return {
        "acceptance": stats.get("acceptance", 0.0),
        "tokens_per_pass": stats.get("tokens_per_pass", 1.0),
        "mtp_tps": runs[True].generation_tps,
        "plain_tps": runs[False].generation_tps,
        "speed_ratio": runs[True].generation_tps / runs[False].generation_tps,
    }


def context_depth(kv_bits: int | None) -> int:
    """The context depth the report decodes at: 16K tokens, 32K with a 4-bit KV cache; 4K on
    the CPU, where prefilling more would take most of an hour."""
    if mx.default_device() == mx.cpu:
        return 4096
    return 32768 if kv_bits == 4 else 16384


def in_mlx_lm_layout(model, cache: list) -> list:
    """A copy of our prompt cache as mlx-lm's model of the same folder takes it: ours as it is,
    but for GLM-5 (`glm_moe_dsa`), whose layers mlx-lm gives two caches (the latent with the
    rotary key, then the indexer keys) where ours keeps the indexer keys beside the latent."""
    if model.args.model_type != "glm_moe_dsa":
        return copy.deepcopy(cache)
    out = []
    for c in cache:
        keys, values = c.keys_and_values()
        latent, index = mx.split(keys, [model.args.kv_lora_rank], axis=-1)
        pair = CacheList(KVCache(), KVCache())
        pair[0].update_and_fetch(latent, values)
        pair[1].update_and_fetch(index, mx.zeros_like(index))
        out.append(pair)
    return out


def deep_decode(
    loaded: dict, depth: int, gen_tokens: int, kv_bits: int | None = None, kv_group_size: int = 64
) -> dict:
    """Decode tokens/s of each loaded implementation (`{name: (model, resident GB)}`) after
    `depth` tokens of context, where an agent session spends its turns. The context is prefilled
    once, by ours (mlx-lm's prefill on the CPU would take longer than the rest of the report),
    and each implementation decodes from a copy of that KV cache (the same layout in both); with
    `kv_bits`, each quantizes its copy first."""
    ours = loaded["ours"][0]
    rng = np.random.default_rng(1)
    ids = mx.array(rng.integers(0, ours.args.vocab_size, depth + 1), dtype=mx.uint32)
    cache = ours.make_cache()
    next(generate_step(ids[:depth], ours, max_tokens=1, prompt_cache=cache))
    kwargs = {} if kv_bits is None else {"kv_bits": kv_bits, "kv_group_size": kv_group_size}
    out = {"depth": depth, "kv_bits": kv_bits}
    for name, (model, resident) in loaded.items():
        run = run_once(
            name,
            model,
            ids[depth:],
            gen_tokens,
            resident,
            prompt_cache=in_mlx_lm_layout(ours, cache)
            if name == "mlx-lm"
            else copy.deepcopy(cache),
            quantized_kv_start=0,
            **kwargs,
        )
        out[name] = run["decode_tps"]
    return out


def device_report(
    path: Path,
    prompts: tuple[int, ...] = (128, 2048),
    gen_tokens: int = 32,
    agree_steps: int = 16,
    activations: str = "auto",
    kv_bits: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Everything a device's users need to judge the port on it, in one run (`--report`):
    agreement with mlx-lm, speed against it (prefill at each of `prompts`, decode and time to
    first token from the first, decode deep in a context of `context_depth(kv_bits)` tokens),
    MTP against plain decoding, expert streaming at two cache sizes, and the device with its
    bandwidth roofline. Returns what `--json` writes."""
    loaded = {}
    for name in ("ours", "mlx-lm"):
        model, seconds, resident = load_timed(name, path, activations)
        loaded[name] = (model, resident)
    ours, theirs = loaded["ours"][0], loaded["mlx-lm"][0]
    args = ours.args
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(0, args.vocab_size, max(prompts)), dtype=mx.uint32)
    out = {"model": str(path), "activations": activations, **device_summary()}
    out["decode_bytes_per_token"] = decode_bytes(ours)["total"]

    log("agreement with mlx-lm ...")
    # Like for like: mlx-lm runs the weights' dtype, so ours does too here (on the CPU "auto"
    # runs float32, which differs from it by half-precision rounding, not by a bug). 64 tokens
    # route 512 (token, expert) pairs on GLM's top-8: the sorted prefill path.
    native = ours if activation_dtype(activations) is None else load(path, activations="native")[0]
    out["agreement"] = agreement(native, theirs, ids[:64], agree_steps)
    del native

    log("speed ...")
    for name in loaded:  # warm up
        run_once(name, loaded[name][0], ids[:16], 2, 0.0)
    speed = {}
    for i, n in enumerate(prompts):
        decode = gen_tokens if i == 0 else 2  # long prompts measure prefill only
        for name in loaded if i % 2 == 0 else list(loaded)[::-1]:
            model, resident = loaded[name]
            res = run_once(name, model, ids[:n], decode, resident)
            del res["tokens"]
            speed.setdefault(name, {})[n] = res
            log(f"{name:6s} {n}-token prompt: prefill {res['prefill_tps']:.1f} tok/s")
    out["speed"] = speed
    depth = context_depth(kv_bits)
    log(f"decode at a {depth}-token context ...")
    out["deep_decode"] = deep_decode(loaded, depth, gen_tokens, kv_bits)
    del loaded, theirs

    _, tokenizer = load(path)  # for its tokenizer: loading is lazy
    prompt = ids[: min(prompts)].tolist()
    if ours.mtp is not None:
        log("MTP ...")
        out["mtp"] = mtp_comparison(ours, tokenizer, prompt, gen_tokens)
    del ours

    log("expert streaming ...")
    E, k = args.n_routed_experts, args.num_experts_per_tok
    out["streaming"] = [
        streaming_row(str(path), s, gen_tokens, 0.0, activations)
        for s in sorted({E // 2, max(E // 8, k)}, reverse=True)
    ]
    out["disk_read_gbs"] = streaming.disk_read_gbs(path)
    out["copy_bandwidth_gbs"] = copy_bandwidth()
    out["roofline_decode_tps"] = out["copy_bandwidth_gbs"] * 1e9 / out["decode_bytes_per_token"]
    return out


def format_device_report(r: dict) -> str:
    """The report as one markdown table: ours, mlx-lm and the ratio where both run."""
    rows = []

    def row(label: str, ours: str, theirs: str = "", ratio: str = "") -> None:
        rows.append(f"| {label} | {ours} | {theirs} | {ratio} |")

    def compare(label: str, key: str, n: int, fmt: str) -> None:
        a, b = r["speed"]["ours"][n][key], r["speed"]["mlx-lm"][n][key]
        row(label, fmt.format(a), fmt.format(b), f"{a / b:.2f}×")

    ag = r["agreement"]
    row("max logit difference vs mlx-lm (native activations)", f"{ag['max_logit_diff']:.3g}")
    row("greedy tokens equal", f"{ag['greedy_tokens_equal']} of {ag['greedy_steps']}")
    prompts = list(r["speed"]["ours"])
    for n in prompts:
        compare(f"prefill tokens/s, {n}-token prompt", "prefill_tps", n, "{:.1f}")
    first = prompts[0]
    compare("decode tokens/s", "decode_tps", first, "{:.2f}")
    compare(f"time to first token (s), {first}-token prompt", "ttft_s", first, "{:.3f}")
    d = r["deep_decode"]
    where = " (CPU: 4K, not 16K)" if r["device"] == "cpu" else ""
    kv = f", {d['kv_bits']}-bit KV cache" if d["kv_bits"] else ""
    row(
        f"decode tokens/s at a {d['depth'] // 1024}K-token context{kv}{where}",
        f"{d['ours']:.2f}",
        f"{d['mlx-lm']:.2f}",
        f"{d['ours'] / d['mlx-lm']:.2f}×",
    )
    for n in prompts:
        compare(f"peak memory (GB), {n}-token prompt", "peak_memory_gb", n, "{:.3f}")
    if "mtp" in r:
        m = r["mtp"]
        row(
            "MTP: acceptance, tokens per pass, tokens/s MTP / plain",
            f"{m['acceptance']:.1%}, {m['tokens_per_pass']:.2f}, "
            f"{m['mtp_tps']:.2f} / {m['plain_tps']:.2f}",
            "",
            f"{m['speed_ratio']:.2f}×",
        )
    for s in r["streaming"]:
        speed = f"{s['read_gbs']:.2f} GB/s" if s["read_gbs"] else "no reads"
        row(
            f"streaming, {s['slots']} slots: hit rate, MB/token prefill / decode, tokens/s, "
            "read speed",
            f"{s['hit_rate']:.1%}, {s['prefill_mb_per_token']:.2f} / "
            f"{s['mb_per_token']:.2f}, {s['tps']:.3g}, {speed}",
        )
    row("disk sequential read (GB/s)", f"{r['disk_read_gbs']:.2f}")
    memory = f"{r['memory_gb']:.1f} GB" if r["memory_gb"] else "memory unknown"
    row("device", f"{r['name']} ({r['device']}), {memory}")
    row("versions", f"MLX {r['mlx']}, mlx-lm {r['mlx_lm']}, activations {r['activations']}")
    row(
        "weights per token, copy bandwidth, roofline",
        f"{r['decode_bytes_per_token'] / 1e6:.2f} MB, {r['copy_bandwidth_gbs']:.1f} GB/s, "
        f"{r['roofline_decode_tps']:.1f} tokens/s",
    )
    head = ["| measure | ours | mlx-lm | ours / mlx-lm |", "|---|---|---|---|"]
    return "\n".join(head + rows)


# -- MTP: plain against speculative decoding ------------------------------------------------------


def _decode_run(model, tokenizer, prompt: list[int], n: int, **kwargs) -> tuple[list[int], float]:
    """(tokens, CPU seconds) of one generation. CPU time, summed over MLX's threads, measures the
    work done and shrugs off other processes on a shared machine, which wall time does not."""
    tic = process_time()
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, n, **kwargs)]
    return tokens, process_time() - tic


def mtp_main(argv: list[str] | None = None) -> None:
    """`bench mtp`: decode work with and without MTP in one run, with acceptance statistics."""
    p = argparse.ArgumentParser(
        prog="python -m mlx_glm4moe.bench mtp",
        description="Measure MTP speculative decoding against plain.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Model folder or Hugging Face repo.")
    src.add_argument(
        "--synthetic",
        type=float,
        metavar="AGREEMENT",
        help="Build a tiny model whose MTP layer is right on this share of tokens (0 to 1).",
    )
    p.add_argument("-q", "--quantize", action="store_true", help="4-bit synthetic model.")
    p.add_argument(
        "--preset", default="air", help="Synthetic model shape: air, glm45, lite, glm5 or glm52."
    )
    p.add_argument("--layers", type=int, help="Synthetic model's main layer count.")
    p.add_argument("--num-draft", type=int, default=1)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--prompt", "-p", default="The quick brown fox")
    p.add_argument("--repeats", type=int, default=7, help="Paired runs (the median counts).")
    a = p.parse_args(argv)
    if a.num_draft < 1 or a.gen_tokens < 2 or a.repeats < 1:
        p.error("need --num-draft >= 1, --gen-tokens >= 2, --repeats >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if a.synthetic is not None:
            if not 0 <= a.synthetic <= 1 or a.preset not in MTP_PRESETS:
                p.error(
                    "--synthetic takes a share between 0 and 1; --preset " + ", ".join(MTP_PRESETS)
                )
            layers = {"num_hidden_layers": a.layers} if a.layers else {}
            path = make_agreeing_checkpoint(Path(tmp) / "hf", a.synthetic, a.preset, **layers)
            path = convert(str(path), str(Path(tmp) / "mlx"), quantize=a.quantize)
        try:
            model, tokenizer = load(path, lazy=False)
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            sys.exit(f"error: {e}")
        if model.mtp is None:
            sys.exit("error: this checkpoint has no MTP layer")
        prompt = tokenizer.encode(a.prompt)
        kwargs = {"num_draft": a.num_draft}
        for mtp in (False, True):  # warm up
            _decode_run(model, tokenizer, prompt, 8, mtp=mtp, **kwargs)
        runs: dict[bool, list] = {False: [], True: []}
        for i in range(a.repeats):
            # Alternate the order so that drifting machine load hits both alike.
            for mtp in (False, True) if i % 2 == 0 else (True, False):
                tic = perf_counter()
                tokens, cpu = _decode_run(model, tokenizer, prompt, a.gen_tokens, mtp=mtp, **kwargs)
                runs[mtp].append((tokens, cpu, perf_counter() - tic))
        stats = None
        for r in stream_generate(model, tokenizer, prompt, a.gen_tokens, mtp=True, **kwargs):
            stats = r.mtp_stats
    (plain, *_), (spec, *_) = runs[False][-1], runs[True][-1]

    def median_ratio(i: int) -> tuple[float, float, float]:
        ratios = [p[i] / m[i] for p, m in zip(runs[False], runs[True], strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)

    per_pos = " ".join(f"{x:.3f}" for x in stats["acceptance_per_position"])
    print(f"model: {a.model or f'synthetic, agreement {a.synthetic}'}, {len(model.layers)} layers")
    print(f"tokens: {len(spec)} (MTP), {len(plain)} (plain); identical: {spec == plain}")
    print(f"acceptance per draft position: {per_pos}; overall {stats['acceptance']:.3f}")
    print(f"tokens per main-model pass: {stats['tokens_per_pass']:.3f}")
    for name, i in (("CPU time", 1), ("wall time", 2)):
        tps = {m: statistics.median(len(r[0]) / r[i] for r in runs[m]) for m in runs}
        med, lo, hi = median_ratio(i)
        print(
            f"tokens/s by {name}: plain {tps[False]:.1f}, MTP {tps[True]:.1f}; speed ratio "
            f"MTP/plain median {med:.3f} (range {lo:.3f}-{hi:.3f}, {a.repeats} paired runs)"
        )


# -- expert streaming against cache size ----------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss there carries the
    parent's peak across fork and exec."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def streaming_row(
    model_path: str,
    slots: int | None,
    max_tokens: int = 32,
    temp: float = 1.0,
    activations: str = "auto",
    prompt_tokens: int | None = None,
    chunked: int | None = None,
) -> dict[str, float]:
    """One benchmark row, in this process: generation from a fixed prompt (sampled at `temp`,
    seed 0) with `slots` expert slots per layer (None: all resident, no streaming). Hit rate and
    `mb_per_token` are for the decode steps after the first token; `prefill_mb_per_token` for
    the prompt; `read_gbs` the read speed achieved over the whole run.

    `prompt_tokens`: a prompt of that many random token ids (seed 0) instead of the text.
    `chunked`: prefill it in chunks of that many tokens, each through every layer (the prefill
    streamed models had before `prefill.py`), for comparison."""
    import transformers  # noqa: F401 (part of the baseline, not of the model's memory)

    base = peak_rss_bytes()
    model, tokenizer = load(model_path, expert_slots=slots, activations=activations)
    prompt = PROMPT
    if prompt_tokens:
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, model.args.vocab_size, prompt_tokens).tolist()
    cache, prefill_s = None, 0.0
    if chunked:
        ids, cache = mx.array(encode(tokenizer, prompt)), model.make_cache()
        tic = perf_counter()
        with streaming.prefilling(model):
            for i in range(0, ids.size - 1, chunked):
                model(ids[None, i : min(i + chunked, ids.size - 1)], cache=cache)
                mx.eval([c.state for c in cache])
        prefill_s, prompt = perf_counter() - tic, ids[-1:].tolist()
    responses = stream_generate(
        model, tokenizer, prompt, max_tokens, temp=temp, seed=0, prompt_cache=cache
    )
    r = next(responses)
    n = r.prompt_tokens + (ids.size - 1 if chunked else 0)
    prompt_tps = n / (prefill_s + r.prompt_tokens / r.prompt_tps)
    start, cpu = streaming.stats(model), process_time()
    for r in responses:  # noqa: B007 (the last response has the totals)
        pass
    cpu = process_time() - cpu
    total = streaming.stats(model)
    decode = total - start
    return {
        "slots": slots or 0,
        "prompt_tokens": n,
        "prompt_tps": prompt_tps,
        "tokens": r.generation_tokens,
        "tps": r.generation_tps,
        # Tokens per CPU-second (all threads): steadier than tokens/s on a shared machine.
        "tokens_per_cpu_s": (r.generation_tokens - 1) / cpu if cpu > 0 else 0.0,
        "hit_rate": decode.hit_rate if slots else 1.0,
        "mb_per_token": decode.bytes_read / max(r.generation_tokens - 1, 1) / 1e6,
        "prefill_mb_per_token": total.prefill_bytes_read / max(total.prefill_tokens, 1) / 1e6,
        "prefill_mb_read": total.prefill_bytes_read / 1e6,
        "read_gbs": total.bytes_read / total.read_s / 1e9 if total.read_s else None,
        "resident_gb": decode.resident_bytes / 1e9,
        "peak_rss_gb": peak_rss_bytes() / 1e9,
        "peak_growth_gb": (peak_rss_bytes() - base) / 1e9,
    }


def streaming_rows(
    model_path: str,
    slots: list[int | None],
    max_tokens: int = 32,
    temp: float = 1.0,
    prompt_tokens: int | None = None,
    chunked: int | None = None,
) -> list[dict]:
    """`streaming_row` for each cache size, each in a fresh process, so that each peak memory
    figure is its own."""
    rows = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for s in slots:
        cmd = [sys.executable, "-m", "mlx_glm4moe.bench", "streaming", "--model", model_path]
        cmd += ["--row"]
        cmd += ["--max-tokens", str(max_tokens), "--temp", str(temp)]
        cmd += ["--slots", str(s)] if s else []
        cmd += ["--prompt-tokens", str(prompt_tokens)] if prompt_tokens else []
        cmd += ["--chunked", str(chunked)] if chunked else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode:
            raise RuntimeError(f"benchmark row {s} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def streaming_main(argv: list[str] | None = None) -> None:
    """`bench streaming`: expert streaming at several cache sizes, each row in its own process."""
    p = argparse.ArgumentParser(
        prog="python -m mlx_glm4moe.bench streaming",
        description="Benchmark expert streaming against cache size.",
    )
    p.add_argument("--model", required=True, help="A converted model folder.")
    p.add_argument(
        "--slots",
        type=int,
        nargs="*",
        help="Expert slots per layer (default: all resident, then 100%%, 50%%, 25%%, minimum).",
    )
    p.add_argument("--max-tokens", "-m", type=int, default=32)
    p.add_argument("--temp", type=float, default=1.0, help="Sampling temperature (seed 0).")
    p.add_argument(
        "--prompt-tokens", type=int, help="A prompt of this many random tokens (default: a text)."
    )
    p.add_argument(
        "--chunked",
        type=int,
        metavar="STEP",
        help="Prefill in STEP-token chunks, each through every layer (the prefill before "
        "layer-major), for comparison.",
    )
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    extra = (a.prompt_tokens, a.chunked)
    if a.row:
        slots = a.slots[0] if a.slots else None
        print(json.dumps(streaming_row(a.model, slots, a.max_tokens, a.temp, "auto", *extra)))
        return
    path = resolve(a.model)
    config = read_config(path)
    E, k = config["n_routed_experts"], config["num_experts_per_tok"]
    if (
        a.max_tokens < 1
        or any(s < k for s in a.slots or [])
        or min((n for n in extra if n), default=2) < 2
    ):
        p.error(
            f"need --max-tokens >= 1, every --slots >= num_experts_per_tok ({k}), "
            "--prompt-tokens and --chunked >= 2"
        )
    slots = a.slots or [
        s for s in (None, E, E // 2, E // 4, k) if streaming.fits_in_memory(path, config, s)
    ]
    rows = streaming_rows(a.model, slots, a.max_tokens, a.temp, *extra)
    size, layers = streaming.expert_bytes(resolve(a.model), config)
    print(f"{a.model}: {E} experts x {layers} MoE layers, {size / 1e6:.2f} MB each, top-{k}")
    prefill = f"in {a.chunked}-token chunks" if a.chunked else "layer by layer"
    print(
        f"{rows[0]['prompt_tokens']}-token prompt prefilled {prefill}, {rows[0]['tokens']} "
        f"tokens at temp {a.temp}; all routed experts: {size * layers * E / 1e6:.1f} MB"
    )
    print(
        "| expert slots | hit rate | MB read/token | decode tok/s | tok/CPU-s | prefill tok/s "
        "| MB read/prompt token (x all experts) | resident weights GB | peak RSS GB (growth) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"{r['slots']} ({r['slots'] / E:.0%})" if r["slots"] else "all resident"
        reads = r["prefill_mb_read"] * 1e6 / (size * layers * E)
        print(
            f"| {name} | {r['hit_rate']:.1%} | {r['mb_per_token']:.2f} | {r['tps']:.2f} "
            f"| {r['tokens_per_cpu_s']:.2f} | {r['prompt_tps']:.1f} "
            f"| {r['prefill_mb_per_token']:.3f} ({reads:.2f}x) | {r['resident_gb']:.3f} "
            f"| {r['peak_rss_gb']:.3f} ({r['peak_growth_gb']:.3f}) |"
        )


# -- the command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("mtp", "streaming"):
        (mtp_main if argv[0] == "mtp" else streaming_main)(argv[1:])
        return
    p = argparse.ArgumentParser(
        description="Benchmark a glm4_moe, glm4_moe_lite or glm_moe_dsa model against mlx-lm.",
        epilog="Also: `bench mtp` (plain vs MTP decoding) and `bench streaming` (expert "
        "streaming against cache size); --help after either for its flags.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="A converted model folder.")
    src.add_argument(
        "--synthetic", action="store_true", help="Build a synthetic 4-bit checkpoint and use it."
    )
    p.add_argument(
        "--preset",
        choices=BENCH_PRESETS,
        default="air",
        help="--synthetic's proportions: GLM-4.5-Air's, GLM-4.7-Flash's (lite) or GLM-5's, "
        "scaled down.",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        help="512; with --report the long prompt (2048; 256 on the CPU).",
    )
    p.add_argument("--gen-tokens", type=int, help="Tokens to decode (128; 32 with --report).")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare", choices=["mlx-lm", "none"], default="mlx-lm")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument(
        "--kv-bits", type=int, choices=[2, 3, 4, 6, 8], help="Quantize the KV cache (both)."
    )
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--activations", choices=ACTIVATIONS, default="auto", help="Ours (see load).")
    p.add_argument("--json", help="Write the full report here.")
    p.add_argument(
        "--report",
        action="store_true",
        help="One table for this device: agreement with mlx-lm, speed at 128- and 2048-token "
        "prompts, decode at a 16K-token context (32K with --kv-bits 4, 4K on the CPU), MTP, "
        "expert streaming, bandwidth.",
    )
    a = p.parse_args(argv)
    a.gen_tokens = a.gen_tokens or (32 if a.report else 128)
    # mlx-lm prefills in bfloat16 at about 6 tokens/s on MLX's CPU backend: there the report's
    # long prompt is 256 tokens, so that it ends in about three minutes on the bench preset.
    long_prompt = 256 if mx.default_device() == mx.cpu else 2048
    a.prompt_tokens = a.prompt_tokens or (long_prompt if a.report else 512)
    if a.prompt_tokens < 2 or a.gen_tokens < 2 or a.repeats < 1 or a.prefill_step_size < 1:
        p.error(
            "need --prompt-tokens >= 2, --gen-tokens >= 2, --repeats >= 1, --prefill-step-size >= 1"
        )

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if a.synthetic:
            log(f"building the synthetic {a.preset} bench checkpoint ...")
            path = bench_checkpoint(tmp, preset=a.preset)
        else:
            path = Path(a.model)
            if not (path / "config.json").is_file():
                sys.exit(f"error: {path} is not a model folder (no config.json)")
        try:
            if a.report:
                prompts = tuple(sorted({min(128, a.prompt_tokens), a.prompt_tokens}))
                out = device_report(
                    path,
                    prompts,
                    a.gen_tokens,
                    activations=a.activations,
                    kv_bits=a.kv_bits,
                    log=log,
                )
            else:
                out = benchmark(
                    path,
                    a.prompt_tokens,
                    a.gen_tokens,
                    a.repeats,
                    compare=a.compare == "mlx-lm",
                    prefill_step_size=a.prefill_step_size,
                    kv_bits=a.kv_bits,
                    kv_group_size=a.kv_group_size,
                    activations=a.activations,
                    log=log,
                )
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    print(format_device_report(out) if a.report else format_table(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
