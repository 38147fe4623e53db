"""Speed benchmark against mlx-lm on the same weights, and the memory-bandwidth roofline.

Both implementations load the same converted folder in one process and run in alternation (the
order flips every repeat), so machine load drifts hit both alike. Each run prefills a fixed
random prompt and decodes greedily through the implementation's own `generate_step`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .convert import convert
from .model import ACTIVATIONS
from .synthetic import make_checkpoint

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


def bench_checkpoint(out: str | Path, q_bits: int = 4) -> Path:
    """Build the synthetic "bench" checkpoint (GLM-4.5-Air's proportions, scaled down; see
    `synthetic.PRESETS`) in bfloat16 like the published weights, and convert it to `q_bits`."""
    out = Path(out)
    hf = make_checkpoint(out / "hf", "bench", dtype="bfloat16", num_shards=1)
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
    if name == "ours":
        from .loading import load

        model, _ = load(path, activations=activations)
    else:
        import mlx_lm

        model, _ = mlx_lm.load(str(path))
    mx.eval(_decode_params(model))
    return model, perf_counter() - tic, (mx.get_active_memory() - before) / 1e9


def step_fn(name: str) -> Callable:
    if name == "ours":
        from .generate import generate_step
    else:
        from mlx_lm.generate import generate_step
    return generate_step


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Benchmark a glm4_moe model against mlx-lm.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="A converted model folder.")
    src.add_argument(
        "--synthetic", action="store_true", help='Build the "bench" checkpoint (4-bit) and use it.'
    )
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare", choices=["mlx-lm", "none"], default="mlx-lm")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument(
        "--kv-bits", type=int, choices=[2, 3, 4, 6, 8], help="Quantize the KV cache (both)."
    )
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--activations", choices=ACTIVATIONS, default="auto", help="Ours (see load).")
    p.add_argument("--json", help="Write the full report here.")
    a = p.parse_args(argv)
    if a.prompt_tokens < 2 or a.gen_tokens < 2 or a.repeats < 1 or a.prefill_step_size < 1:
        p.error(
            "need --prompt-tokens >= 2, --gen-tokens >= 2, --repeats >= 1, --prefill-step-size >= 1"
        )

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if a.synthetic:
            log("building the synthetic bench checkpoint ...")
            path = bench_checkpoint(tmp)
        else:
            path = Path(a.model)
            if not (path / "config.json").is_file():
                sys.exit(f"error: {path} is not a model folder (no config.json)")
        try:
            report = benchmark(
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
    print(format_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
