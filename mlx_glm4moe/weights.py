"""Checkpoint files and names: finding a checkpoint (local or on the Hub) and its config, the
Hugging Face layout → ours, FP8 dequantization, expert stacking.

Shared by the converter (one layer at a time) and by `load()` (whole HF folders, lazily).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .progress import Progress, progress_bar

DEFAULT_MODEL = Path(__file__).parent / "default_model"
# Enough to load and convert: weights, configs, tokenizer, chat template, and the model card
# (its license goes into the converted model's card).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "*.model", "README.md"]
INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def resolve(path_or_repo: str | Path | None, progress: Progress | None = None) -> Path:
    """A local folder as is; anything else is a Hugging Face repo id, downloaded (or found in the
    local hub cache) with huggingface_hub, reporting ("download", files, files) to `progress`."""
    if path_or_repo is None:
        return DEFAULT_MODEL
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a model folder")
        return path
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise FileNotFoundError(f"No model folder at {path_or_repo}")
    from huggingface_hub import snapshot_download

    bar = {} if progress is None else {"tqdm_class": progress_bar("download", progress)}
    return Path(snapshot_download(str(path_or_repo), allow_patterns=HUB_PATTERNS, **bar))


def read_config(path: Path) -> dict[str, Any]:
    """config.json, with the stop ids of generation_config.json when it has them."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"No config.json in {path}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    gen_file = path / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it: the index's map when there is
    one, plus the tensors of files it does not list (GLM-4.6 and 4.7 keep their nextn layer in
    `mtp.safetensors`, which their index may leave out)."""
    files: dict[str, Path] = {}
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise FileNotFoundError(f"Missing weight shard {f.name} (listed in {INDEX_FILE})")
    listed = set(files.values())
    for f in sorted(path.glob("*.safetensors")):
        if f not in listed:
            for name in open_file(f):
                files.setdefault(name, f)
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {path}")
    return files


def open_file(f: Path) -> dict[str, mx.array]:
    """Lazily open one safetensors file: arrays are read from disk only when evaluated."""
    try:
        return mx.load(str(f))
    except Exception as e:
        raise ValueError(f"Cannot read {f}: corrupt or not a safetensors file ({e})") from None


def load_lazy(files: dict[str, Path]) -> dict[str, mx.array]:
    """All tensors of a checkpoint as lazy arrays, each file opened once."""
    weights = {}
    for f in sorted(set(files.values())):
        weights.update(open_file(f))
    missing = set(files) - set(weights)
    if missing:
        raise ValueError(
            f"Tensors listed in the index are not in their files: {sorted(missing)[:5]}"
        )
    return weights


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class FP8Format:
    """How a checkpoint's FP8 (E4M3) weights are scaled: weight `X.weight` has its scale in
    `X.weight{suffix}`, one per `block` (rows, columns) of the weight, or (`block` None) one per
    output channel or per tensor."""

    suffix: str
    block: tuple[int, int] | None


def fp8_format(config: dict[str, Any]) -> FP8Format | None:
    """The FP8 format that config.json's `quantization_config` declares; None when it declares
    none (MLX's own quantization, also written there for mlx-lm, is not FP8).

    `quant_method: fp8` with `weight_block_size` is DeepSeek-style block FP8 (scales in
    `weight_scale_inv`); without it, per-tensor `weight_scale`. compressed-tensors (GLM-4.5-FP8
    and later zai-org FP8 repos) keeps `weight_scale` per channel, or per block with strategy
    "block" and its `block_structure`."""
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method is None:
        return None
    if method == "fp8":
        block = q.get("weight_block_size")
        return FP8Format("_scale_inv", tuple(block)) if block else FP8Format("_scale", None)
    if method == "compressed-tensors":
        schemes = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]
        if q.get("format", "float-quantized") != "float-quantized" or any(
            (w.get("type"), w.get("num_bits")) != ("float", 8) for w in schemes
        ):
            raise ValueError(
                "Unsupported compressed-tensors checkpoint: only FP8 weights (format "
                "float-quantized, 8-bit float) can be converted"
            )
        blocks = {tuple(w["block_structure"]) for w in schemes if w.get("strategy") == "block"}
        if len(blocks) > 1:
            raise ValueError(f"compressed-tensors with several block sizes: {sorted(blocks)}")
        return FP8Format("_scale", blocks.pop() if blocks else None)
    raise ValueError(
        f"Unsupported quantization_config quant_method {method!r}: this converter reads "
        "bfloat16, float16, float32 and FP8 (fp8, compressed-tensors) checkpoints"
    )


def dequantize_fp8(name: str, weight: mx.array, scale: mx.array, fp8: FP8Format) -> mx.array:
    """FP8 E4M3 `weight` [out, in] (as MLX reads it: uint8) times its scales, in float32."""
    w = mx.from_fp8(weight, dtype=mx.float32)
    scale = scale.astype(mx.float32)
    rows, cols = w.shape
    if fp8.block is not None:
        b0, b1 = fp8.block
        grid = (-(-rows // b0), -(-cols // b1))
        if tuple(scale.shape) != grid:
            raise ValueError(
                f"{name}{fp8.suffix} has shape {tuple(scale.shape)}; a {rows}x{cols} weight in "
                f"blocks of {b0}x{b1} needs {grid}"
            )
        # Each scale covers its block; edge blocks may be partial (GLM-4.5-Air's 10944 columns
        # are 85.5 blocks of 128), so the repeated grid is cut to the weight's shape.
        scale = mx.repeat(mx.repeat(scale, b0, axis=0), b1, axis=1)[:rows, :cols]
    elif scale.size in (1, rows):
        scale = scale.reshape(-1, 1)
    else:
        raise ValueError(
            f"{name}{fp8.suffix} has shape {tuple(scale.shape)}: neither one scale per output "
            f"channel ({rows}) nor one for the tensor"
        )
    return w * scale


def sanitize(
    weights: dict[str, mx.array],
    n_routed_experts: int,
    fp8: FP8Format | None = None,
    dtype: mx.Dtype = mx.float32,
) -> dict[str, mx.array]:
    """HF names → ours. Dequantizes FP8 weights (scaled as `fp8` says) to `dtype` (those of
    `FLOAT32` to float32), stacks per-expert tensors into
    `mlp.switch_mlp.{gate,up,down}_proj.weight` of shape [E, out, in], and drops what the model
    does not use. Works on any subset of whole layers; the MTP layer is kept."""
    out = {}
    for name, w in weights.items():
        if name.endswith(
            ("weight_scale", "weight_scale_inv", "input_scale", "rotary_emb.inv_freq")
        ):
            continue
        if name.endswith(".weight") and w.dtype == mx.uint8:  # FP8 E4M3, as MLX reads it
            scale = weights.get(name + fp8.suffix) if fp8 else None
            if scale is None:
                how = f"no {name}{fp8.suffix}" if fp8 else "no FP8 quantization_config"
                raise ValueError(f"{name} is FP8 but the checkpoint has {how} to scale it")
            w = dequantize_fp8(name, w, scale, fp8)
            # Cast before experts are stacked: a float32 stack would double the converter's peak.
            w = w if stays_float32(name) else w.astype(dtype)
        out[name] = w

    experts: dict[tuple[str, str], dict[int, mx.array]] = {}
    for name in [n for n in out if _EXPERT.match(n)]:
        prefix, e, proj = _EXPERT.match(name).groups()
        experts.setdefault((prefix, proj), {})[int(e)] = out.pop(name)
    for (prefix, proj), per_expert in experts.items():
        if len(per_expert) != n_routed_experts:
            raise ValueError(
                f"{prefix}.experts.*.{proj}: found {len(per_expert)} of {n_routed_experts} experts"
            )
        out[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack(
            [per_expert[e] for e in range(n_routed_experts)]
        )
    return out


# Tensors kept float32 and unquantized. The router's weight and correction bias: bf16 collapses
# the closely spaced biases and changes which experts win. The DSA indexer's per-head weights
# (GLM-5; transformers keeps them float32 too): they scale the heads' scores, whose top-k picks
# the positions attention sees, and quantizing a [heads, hidden] matrix saves next to nothing.
FLOAT32 = (
    "mlp.gate.weight",
    "mlp.gate.e_score_correction_bias",
    "self_attn.indexer.weights_proj.weight",
)


def stays_float32(name: str) -> bool:
    """Whether the tensor `name` (ours or HF's) is kept float32 and unquantized (`FLOAT32`)."""
    return name.endswith(FLOAT32)


QuantPredicate = Callable[[str, tuple], "dict | None"]


def uniform_quant(bits: int, group_size: int, mode: str = "affine") -> QuantPredicate:
    """Quantize every matrix (linear, embedding, stacked experts) but those kept float32."""

    def predicate(name: str, shape: tuple) -> dict | None:
        if not name.endswith(".weight") or len(shape) < 2 or stays_float32(name):
            return None
        if shape[-1] % group_size:
            return None
        return {"bits": bits, "group_size": group_size, "mode": mode}

    return predicate


def module_path(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]
