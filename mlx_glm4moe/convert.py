"""Hugging Face checkpoint → MLX, one layer at a time, in bounded memory.

Each layer's tensors are read lazily from their source shards, renamed and stacked
(`weights.sanitize`), cast, quantized and appended to their output shard one tensor at a time,
whatever the shard size: every output tensor's shape is planned first, so each shard's header is
written before its data. Output goes into a temporary folder beside the destination, renamed
into place only when complete.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
from tqdm import tqdm

from . import models
from .progress import Progress
from .recipes import recipe
from .upload import model_card, publish
from .weights import (
    INDEX_FILE,
    QuantPredicate,
    fp8_format,
    layer_of,
    load_lazy,
    module_path,
    read_config,
    resolve,
    sanitize,
    stays_float32,
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


# safetensors' names for the dtypes a conversion writes.
_SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.uint16: "U16",
    mx.uint32: "U32",
    mx.int8: "I8",
    mx.int32: "I32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
}
Planned = tuple[str, tuple[int, ...], mx.Dtype]


class _ShardWriter:
    """Writes planned tensors, in plan order, into safetensors shards of at most `max_bytes`
    each (a larger tensor gets a shard of its own). Every tensor's shape and dtype is known
    before any is computed, so each file's header is written first and each tensor's bytes are
    appended as it arrives: no shard is ever held in memory."""

    def __init__(self, out: Path, plan: list[Planned], max_bytes: int):
        self.out = out
        self.shards: list[list[Planned]] = []
        size = 0
        for t in plan:
            nbytes = math.prod(t[1]) * t[2].size
            if not self.shards or (size + nbytes > max_bytes and self.shards[-1]):
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += nbytes
        n = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.pending = iter([(i, t) for i, shard in enumerate(self.shards) for t in shard])
        self.file: BinaryIO | None = None
        self.shard = -1

    def _open(self, i: int) -> None:
        self.close()
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for name, shape, dtype in self.shards[i]:
            end = offset + math.prod(shape) * dtype.size
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors writes it
        self.file = open(self.out / self.names[i], "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.shard = i

    def write(self, name: str, a: mx.array) -> None:
        """Append the next planned tensor (evaluated, row-contiguous)."""
        i, planned = next(self.pending)
        if planned != (name, tuple(a.shape), a.dtype):
            raise RuntimeError(f"Converted {name} {a.shape} {a.dtype}, planned {planned}")
        if i != self.shard:
            self._open(i)
        self.file.write(memoryview(a))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def finish(self) -> int:
        """Close the last shard and write the index. Returns the total bytes."""
        self.close()
        if next(self.pending, None) is not None:
            raise RuntimeError("Conversion ended before every planned tensor was written")
        weight_map = {
            t[0]: f for f, shard in zip(self.names, self.shards, strict=True) for t in shard
        }
        total = sum((self.out / f).stat().st_size for f in self.names)
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
        if stays_float32(name):
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
    progress: Progress | None = None,
) -> Path:
    """Convert `hf_path` (folder or hub repo) to an MLX checkpoint at `mlx_path`.

    Converts and writes one tensor at a time, so peak memory is about one source layer and its
    converted form, whatever `max_shard_bytes`.
    An existing `mlx_path` is only replaced with `force`, and only once the new one is complete.
    `quant_recipe` (a name in `recipes.RECIPES`) quantizes with per-module bits instead of the
    uniform `q_bits`. `upload_repo` names the model in its card and, once the folder is complete,
    receives it (`upload.publish`; its `UploadError` leaves the folder in place for a retry).
    `progress` hears of the download, each layer group converted ("convert") and the upload.
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

    src = resolve(hf_path, progress)
    config = read_config(src)
    args = models.model_args(config)
    fp8 = fp8_format(config)
    files = weight_files(src)
    weights = load_lazy(files)
    dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if dtype not in DTYPES:
        dtype = "bfloat16"
    default_q = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}

    def converted(names: list[str], take: Callable[[str], mx.array]) -> tuple[dict, dict]:
        group = sanitize(
            {n: take(n) for n in names}, args.n_routed_experts, fp8, getattr(mx, dtype)
        )
        group = models.sanitize(group, args)
        tensors, used = convert_tensors(group, getattr(mx, dtype), quant)
        return {k: mx.contiguous(a) for k, a in tensors.items()}, used

    # Every output tensor's name, shape and dtype, from lazy arrays (nothing is read yet), so
    # that the shards can be written front to back as the tensors are made.
    groups, plan, params = _groups(list(weights)), [], {}
    for names in groups:
        tensors, used = converted(names, weights.get)
        plan += [(k, tuple(a.shape), a.dtype) for k, a in tensors.items()]
        params.update(used)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the output folder's mode
    writer = _ShardWriter(tmp, plan, max_shard_bytes)
    try:
        for i, names in enumerate(tqdm(groups, desc="Converting", unit="layer")):
            tensors, _ = converted(names, weights.pop)
            for name in list(tensors):
                a = tensors.pop(name)
                mx.eval(a)
                writer.write(name, a)
                del a
            mx.clear_cache()
            if progress is not None:
                progress("convert", i + 1, len(groups))
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
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if upload_repo:
        publish(dst, upload_repo, progress)
    return dst
