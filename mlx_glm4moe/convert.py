"""Hugging Face checkpoint → MLX, one layer at a time, in bounded memory.

Each layer's tensors are read lazily from their source shards, renamed and stacked
(`weights.sanitize`), cast, quantized, written, and released before the next layer. Output goes
into a temporary folder beside the destination, renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .model import ModelArgs
from .recipes import recipe
from .upload import model_card, publish
from .weights import (
    INDEX_FILE,
    QuantPredicate,
    fp8_block,
    is_router,
    layer_of,
    load_lazy,
    module_path,
    read_config,
    resolve,
    sanitize,
    uniform_quant,
    weight_files,
)

DTYPES = ("bfloat16", "float16", "float32")
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
MAX_SHARD_BYTES = 5 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_WRITTEN = (INDEX_FILE, "config.json", "README.md")


def _groups(names: list[str]) -> list[list[str]]:
    """Tensor names grouped by decoder layer (embeddings first, final norm and head last), so
    that a layer's experts, wherever they are stored, are stacked together."""
    layers: dict[int, list[str]] = {}
    top, bottom = [], []
    for n in names:
        if (i := layer_of(n)) is not None:
            layers.setdefault(i, []).append(n)
        else:
            (top if "embed" in n else bottom).append(n)
    return [g for g in [top, *(layers[i] for i in sorted(layers)), bottom] if g]


class _ShardWriter:
    """Buffers converted tensors and writes a safetensors shard whenever the buffer is full."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, mx.array] = {}
        self.files: list[tuple[str, list[str]]] = []

    def add(self, tensors: dict[str, mx.array]) -> None:
        self.buffer.update(tensors)
        if sum(a.nbytes for a in self.buffer.values()) >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            name = f"part-{len(self.files)}.safetensors"
            mx.save_safetensors(str(self.out / name), self.buffer, metadata={"format": "mlx"})
            self.files.append((name, list(self.buffer)))
            self.buffer = {}

    def finish(self) -> int:
        """Rename parts to the HF shard names and write the index. Returns total bytes."""
        self.flush()
        n, weight_map, total = len(self.files), {}, 0
        for i, (part, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / part).rename(self.out / final)
            total += (self.out / final).stat().st_size
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return total


def convert_tensors(
    weights: dict[str, mx.array], dtype: mx.Dtype, quant: QuantPredicate | None
) -> tuple[dict[str, mx.array], dict[str, dict]]:
    """Cast and quantize one group of tensors (already in our names). Returns the tensors and
    the quantization parameters used for each module."""
    out, params = {}, {}
    for name, w in weights.items():
        if is_router(name):
            out[name] = w.astype(mx.float32)
            continue
        w = w.astype(dtype)
        q = quant(name, w.shape) if quant else None
        if q is None:
            out[name] = w
            continue
        path = module_path(name)
        wq, scales, *biases = mx.quantize(w, q["group_size"], q["bits"], mode=q["mode"])
        out[name], out[f"{path}.scales"] = wq, scales
        if biases:
            out[f"{path}.biases"] = biases[0]
        params[path] = q
    return out, params


def _quant_config(params: dict[str, dict], default: dict) -> dict:
    """mlx-lm's format: the default, plus an entry for every module that differs from it."""
    config = dict(default)
    config.update({p: q for p, q in params.items() if q != default})
    return config


def convert(
    hf_path: str,
    mlx_path: str,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    upload_repo: str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    quant_recipe: str | None = None,
) -> Path:
    """Convert `hf_path` (folder or hub repo) to an MLX checkpoint at `mlx_path`.

    Reads one layer's tensors at a time, so peak memory is about one layer plus one output shard.
    An existing `mlx_path` is only replaced with `force`, and only once the new one is complete.
    `quant_recipe` (a name in `recipes.RECIPES`) quantizes with per-module bits instead of the
    uniform `q_bits`. `upload_repo` names the model in its card and, once the folder is complete,
    receives it (`upload.publish`; its `UploadError` leaves the folder in place for a retry).
    """
    dst = Path(mlx_path).expanduser()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if quantize and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise ValueError(f"--q-bits must be in {Q_BITS} and --q-group-size in {Q_GROUP_SIZES}")

    quant = uniform_quant(q_bits, q_group_size) if quantize else None
    if quant_recipe is not None:
        quantize, quant = True, recipe(quant_recipe)

    src = resolve(hf_path)
    config = read_config(src)
    args = ModelArgs.from_dict(config)
    files = weight_files(src)
    weights = load_lazy(files)
    dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if dtype not in DTYPES:
        dtype = "bfloat16"
    default_q = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the output folder's mode
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        params: dict[str, dict] = {}
        for names in tqdm(_groups(list(weights)), desc="Converting", unit="layer"):
            group = sanitize(
                {n: weights.pop(n) for n in names}, args.n_routed_experts, fp8_block(config)
            )
            tensors, used = convert_tensors(group, getattr(mx, dtype), quant)
            mx.eval(tensors)
            writer.add(tensors)
            params.update(used)
            del group, tensors
        writer.finish()

        config.pop("quantization_config", None)
        config["torch_dtype"] = dtype
        if quantize:
            config["quantization"] = _quant_config(params, default_q)
            config["quantization_config"] = config["quantization"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WRITTEN:
                shutil.copy2(f, tmp / f.name)
        card = model_card(tmp, upload_repo or dst.name, hf_path, src, quant_recipe)
        (tmp / "README.md").write_text(card)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if upload_repo:
        publish(dst, upload_repo)
    return dst
