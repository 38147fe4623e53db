"""Checkpoint files and names: finding a checkpoint (local or on the Hub) and its config, the
Hugging Face layout → ours, FP8 dequantization, expert stacking.

Shared by the converter (one layer at a time) and by `load()` (whole HF folders, lazily).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

DEFAULT_MODEL = Path(__file__).parent / "default_model"
# Enough to load and convert: weights, configs, tokenizer, chat template, and the model card
# (its license goes into the converted model's card).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "*.model", "README.md"]
INDEX_FILE = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def resolve(path_or_repo: str | Path | None) -> Path:
    """A local folder as is; anything else is a Hugging Face repo id, downloaded (or found in the
    local hub cache) with huggingface_hub."""
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

    return Path(snapshot_download(str(path_or_repo), allow_patterns=HUB_PATTERNS))


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


def fp8_block(config: dict[str, Any]) -> list[int] | None:
    return (config.get("quantization_config") or {}).get("weight_block_size")


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (index when present)."""
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
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"No .safetensors weights in {path}")
    return {name: f for f in shards for name in open_file(f)}


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


def _dequantize_fp8(weight: mx.array, scale: mx.array, block: list[int] | None) -> mx.array:
    w = mx.from_fp8(weight, dtype=mx.float32)
    scale = scale.astype(mx.float32)
    if scale.ndim == 2 and scale.shape[-1] > 1 and block:
        # Block FP8 (weight_scale_inv): one scale per block of the weight.
        b0, b1 = block
        scale = mx.repeat(mx.repeat(scale, b0, axis=0), b1, axis=1)
        scale = scale[: w.shape[0], : w.shape[1]]
    else:
        # compressed-tensors: one scale per output channel, shape [out, 1] or [out].
        scale = scale.reshape(w.shape[0], -1)
    return w * scale


def sanitize(
    weights: dict[str, mx.array], n_routed_experts: int, fp8_block: list[int] | None = None
) -> dict[str, mx.array]:
    """HF names → ours. Dequantizes FP8 weights, stacks per-expert tensors into
    `mlp.switch_mlp.{gate,up,down}_proj.weight` of shape [E, out, in], and drops what the model
    does not use. Works on any subset of whole layers; the MTP layer is kept."""
    out = {}
    for name, w in weights.items():
        if name.endswith(
            ("weight_scale", "weight_scale_inv", "input_scale", "rotary_emb.inv_freq")
        ):
            continue
        for suffix in ("_scale", "_scale_inv"):
            if (scale := weights.get(name + suffix)) is not None:
                w = _dequantize_fp8(w, scale, fp8_block)
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


def is_router(name: str) -> bool:
    """The router weight and its correction bias stay float32 and unquantized: bf16 collapses the
    closely spaced biases and changes which experts win."""
    return name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))


QuantPredicate = Callable[[str, tuple], "dict | None"]


def uniform_quant(bits: int, group_size: int, mode: str = "affine") -> QuantPredicate:
    """Quantize every matrix (linear, embedding, stacked experts) but the router."""

    def predicate(name: str, shape: tuple) -> dict | None:
        if not name.endswith(".weight") or len(shape) < 2 or is_router(name):
            return None
        if shape[-1] % group_size:
            return None
        return {"bits": bits, "group_size": group_size, "mode": mode}

    return predicate


def module_path(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]
