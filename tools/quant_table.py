"""Size vs KL vs perplexity of every quantization recipe, ours and mlx-lm's, on one checkpoint.

    python tools/quant_table.py --hf-path /tmp/glm-demo-hf --work /tmp/quant-table

Converts the Hugging Face checkpoint with our converter (bf16 reference, float32, each recipe)
and with `mlx_lm.convert` (`-q` and each `--quant-predicate mixed_*`), then evaluates each
against the bf16 conversion (`mlx_glm4moe.evaluate`). mlx-lm drops the MTP layer, so sizes are
given for the main model alone as well as for the whole folder. MTP acceptance is not in the
table: `python -m mlx_glm4moe.evaluate --model DIR` reports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.convert import QUANT_RECIPES
from mlx_lm.convert import convert as mlx_lm_convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_glm4moe.convert import convert  # noqa: E402
from mlx_glm4moe.evaluate import evaluate  # noqa: E402
from mlx_glm4moe.loading import load  # noqa: E402
from mlx_glm4moe.recipes import RECIPES  # noqa: E402
from mlx_glm4moe.weights import layer_of, read_config, weight_files  # noqa: E402


def sizes(path: Path) -> tuple[int, int]:
    """(bytes of the main model's tensors, bytes of all tensors)."""
    n_layers = read_config(path)["num_hidden_layers"]
    main = total = 0
    for f in sorted(set(weight_files(path).values())):
        for name, a in mx.load(str(f)).items():
            total += a.nbytes
            if (layer_of(name) or 0) < n_layers:
                main += a.nbytes
    return main, total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-path", required=True)
    p.add_argument("--work", required=True, help="Folder for the conversions.")
    p.add_argument("--num-samples", type=int, default=16)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    variants: dict[str, Path] = {}

    def ours(label: str, **kw) -> None:
        out = work / label.replace(" ", "_")
        if not out.exists():
            convert(a.hf_path, str(out), **kw)
        variants[f"ours {label}"] = out

    def theirs(label: str, **kw) -> None:
        out = work / f"mlx-lm_{label}"
        if not out.exists():
            mlx_lm_convert(a.hf_path, str(out), dtype="bfloat16", **kw)
        variants[f"mlx-lm {label}"] = out

    ours("bf16", dtype="bfloat16")
    ours("fp32", dtype="float32")
    for name in RECIPES:
        ours(name, dtype="bfloat16", quant_recipe=name)
    theirs("-q (4-bit)", quantize=True, q_bits=4, q_group_size=64)
    for name in QUANT_RECIPES:
        theirs(name, quantize=True, q_group_size=64, quant_predicate=name)

    reference, tokenizer = load(variants["ours bf16"])
    print("| model | main-model MB | folder MB | KL to bf16 (nats/token) | perplexity |")
    print("|---|---|---|---|---|")
    for label, path in variants.items():
        model, _ = load(path)
        r = evaluate(model, tokenizer, reference, num_samples=a.num_samples, draft_tokens=0)
        main_b, total_b = sizes(path)
        print(
            f"| {label} | {main_b / 1e6:.3f} | {total_b / 1e6:.3f} | {r.kl:.5f} | "
            f"{r.perplexity:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
