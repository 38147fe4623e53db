"""Expert streaming: run a model larger than memory by keeping the routed experts on disk.

Everything but the routed experts stays resident. Each MoE layer (the MTP layer included) gets a
`StreamingSwitchGLU` in place of its `SortedSwitchGLU`: a bounded set of expert slots holding the
experts in use, refilled straight from the safetensors files by byte offset (a converted
checkpoint stores each projection as one `[E, out, in]` tensor, so an expert is one contiguous
byte range per tensor). `gather_(q)mm` then runs on the slots with the routing indices remapped
to slot numbers. Also here: the check that resident weights fit in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from .models.base import SortedSwitchGLU, mix
from .weights import weight_files

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
# safetensors dtype → (numpy type of the same width to read it as, MLX dtype it holds).
DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "U8": (np.uint8, mx.uint8),
}
# Score decay per call: frequency counts that fade, so a burst of use does not pin an expert.
DECAY = 0.9


class ExpertReadError(OSError):
    """Expert bytes that are not on disk where the checkpoint header says they are."""


def read_header(f: Path) -> tuple[int, dict[str, dict]]:
    """A safetensors file's tensor table: (offset of the data section, {name: {dtype, shape,
    data_offsets}}). The format is an 8-byte little-endian header length, then JSON."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{f} is not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return 8 + n, header


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked expert tensor `[E, ...]` on disk: expert e is bytes
    `offset + e * row_bytes` to `offset + (e + 1) * row_bytes`."""

    file: Path
    offset: int
    row_bytes: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def locate(cls, name: str, file: Path, start: int, entry: dict, n_experts: int) -> ExpertTensor:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        # mx.load has checked the ranges against the shapes when the model was opened.
        if dtype not in DTYPES:
            raise ValueError(f"{name}: cannot stream experts of dtype {dtype}")
        if not shape or shape[0] != n_experts:
            raise ValueError(f"{name}: expected {n_experts} stacked experts, shape is {shape}")
        row = int(np.prod(shape[1:])) * np.dtype(DTYPES[dtype][0]).itemsize
        if start + end > file.stat().st_size:
            raise ValueError(
                f"{file} is truncated: {name} ends at byte {start + end} but the file has "
                f"{file.stat().st_size}. Download or convert the checkpoint again."
            )
        return cls(file, start + begin, row, shape[1:], dtype)

    def read_into(self, fd: int, expert: int, dest: np.ndarray) -> None:
        """Read expert `expert`'s row from `fd` (this tensor's file, open) into `dest`, a slot's
        row: straight into it when it has the stored width, else through a buffer and a cast
        (bfloat16 or float16 experts held in float32 on the CPU)."""
        np_type = DTYPES[self.dtype][0]
        direct = dest.dtype == np_type
        buf = dest if direct else np.empty(dest.shape, np_type)
        offset = self.offset + expert * self.row_bytes
        view = memoryview(buf).cast("B")
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view], offset)
        else:  # no preadv (older macOS): one copy from the returned bytes
            data = os.pread(fd, self.row_bytes, offset)
            got = len(data)
            view[:got] = data
        if got != self.row_bytes:
            raise ExpertReadError(
                f"{self.file}: expected {self.row_bytes} bytes of expert {expert} at offset "
                f"{offset}, got {got}. The file is truncated or changed since loading."
            )
        if direct:
            return
        if self.dtype == "BF16":  # bfloat16 is float32's top half
            dest[...] = (buf.astype(np.uint32) << 16).view(np.float32)
        else:
            dest[...] = buf.astype(dest.dtype)


# Positional reads in flight at once: an SSD reaches its speed only with several queued.
READERS = 8
_readers: ThreadPoolExecutor | None = None


def _reader_pool() -> ThreadPoolExecutor:
    global _readers
    if _readers is None:
        _readers = ThreadPoolExecutor(READERS, thread_name_prefix="expert-read")
    return _readers


def host_view(a: mx.array) -> np.ndarray:
    """A writable numpy view of an evaluated MLX array's memory (unified on Apple silicon);
    bfloat16, which numpy lacks, as uint16."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
        mx.eval(a)  # a view shares its source's buffer
    return np.asarray(a)


def _quant_params(tensors: dict[str, ExpertTensor], in_dims: int, mode: str) -> dict | None:
    """bits and group size of a quantized projection, from its packed shapes."""
    if "scales" not in tensors:
        return None
    packed, groups = tensors["weight"].shape[-1], tensors["scales"].shape[-1]
    return {"bits": packed * 32 // in_dims, "group_size": in_dims // groups, "mode": mode}


class StreamingSwitchGLU(nn.Module):
    """The model's `SortedSwitchGLU` over a bounded cache of expert slots, filled from disk on
    demand.

    Called as `switch_mlp(x, indices, weights)` like the model's `SortedSwitchGLU`. The slot
    arrays are private (not parameters): they are a cache, not weights to load or save.
    """

    def __init__(
        self,
        tensors: dict[str, dict[str, ExpertTensor]],
        num_experts: int,
        slots: int,
        hidden_size: int,
        intermediate_size: int,
        mode: str = "affine",
    ):
        super().__init__()
        self._slots = slots
        glu = SortedSwitchGLU(hidden_size, intermediate_size, slots)
        for proj in PROJECTIONS:
            parts = tensors[proj]
            in_dims = intermediate_size if proj == "down_proj" else hidden_size
            q = _quant_params(parts, in_dims, mode)
            if q is not None:
                setattr(glu, proj, getattr(glu, proj).to_quantized(**q))
            module = getattr(glu, proj)
            for part, t in parts.items():
                dtype = self._slot_dtype(t, q)
                module[part] = mx.zeros((slots, *t.shape), dtype)
        mx.eval(glu.parameters())
        # Misses are read from disk into the slots' own memory through these views: the slot
        # arrays are never replaced, and no op is pending on a slot when it is refilled (the
        # routing that asks for the read has waited on every earlier use).
        self._views = [
            (t, host_view(getattr(glu, proj)[part]))
            for proj, parts in tensors.items()
            for part, t in parts.items()
        ]
        self._glu = glu
        self._slot_of = np.full(num_experts, -1)  # expert → slot
        self._expert_in = np.full(slots, -1)  # slot → expert
        self._score = np.zeros(num_experts)
        self._last_used = np.zeros(num_experts)
        self._calls = 0
        self._stats = dict.fromkeys(("hits", "misses", "bytes_read", "tokens"), 0)
        self._stats.update(read_s=0.0, prefill_bytes_read=0, prefill_tokens=0)
        self.prefill = False  # set by `prefilling`: reads are the prompt's

    @staticmethod
    def _slot_dtype(t: ExpertTensor, quant: dict | None) -> mx.Dtype:
        dtype = DTYPES[t.dtype][1]
        # gather_mm on the CPU backend supports float32 only (as in loading.build_model).
        if quant is None and mx.default_device() == mx.cpu:
            return mx.float32
        return dtype

    @property
    def slot_bytes(self) -> int:
        return sum(a.nbytes for _, a in nn.utils.tree_flatten(self._glu.parameters()))

    def _evict_for(self, needed: np.ndarray, count: int) -> np.ndarray:
        """`count` slots to refill: free ones first, then those whose experts score lowest
        (decayed use counts, least recently used on ties), never one that `needed` uses."""
        holders = self._expert_in
        free = np.flatnonzero(holders < 0)
        taken = np.flatnonzero((holders >= 0) & ~np.isin(holders, needed))
        e = holders[taken]
        victims = taken[np.lexsort((self._last_used[e], self._score[e]))]
        return np.concatenate([free, victims])[:count]

    def _ensure(self, needed: np.ndarray) -> None:
        """Make every expert of `needed` (sorted, at most `slots`) resident, reading each missing
        one once."""
        missing = needed[self._slot_of[needed] < 0]
        self._stats["hits"] += len(needed) - len(missing)
        self._stats["misses"] += len(missing)
        if not len(missing):
            return
        slots = self._evict_for(needed, len(missing))
        self._slot_of[self._expert_in[slots][self._expert_in[slots] >= 0]] = -1
        # Empty until every read is in: a failed read leaves them to be read again later.
        self._expert_in[slots] = -1
        tic = perf_counter()
        fds = {f: os.open(f, os.O_RDONLY) for f in {t.file for t, _ in self._views}}
        try:
            reads = [
                _reader_pool().submit(t.read_into, fds[t.file], int(e), view[s])
                for t, view in self._views
                for e, s in zip(missing, slots, strict=True)
            ]
            wait(reads)  # every read ends before its file is closed
            for r in reads:
                r.result()  # re-raises a failed read
        finally:
            for fd in fds.values():
                os.close(fd)
        self._slot_of[missing], self._expert_in[slots] = slots, missing
        nbytes = sum(len(missing) * t.row_bytes for t, _ in self._views)
        self._stats["bytes_read"] += nbytes
        self._stats["prefill_bytes_read"] += nbytes if self.prefill else 0
        self._stats["read_s"] += perf_counter() - tic

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        inds = np.array(indices)  # the routing decides what to read: this waits for it
        flat = inds.reshape(-1)
        counts = np.bincount(flat, minlength=len(self._score))
        self._calls += 1
        self._score = self._score * DECAY + counts
        self._last_used[counts > 0] = self._calls
        self._stats["tokens"] += flat.size // inds.shape[-1]
        self._stats["prefill_tokens"] += flat.size // inds.shape[-1] if self.prefill else 0
        needed = np.flatnonzero(counts)
        if len(needed) <= self._slots:
            self._ensure(needed)
            return self._glu(x, indices, weights, remap=mx.array(self._slot_of.astype(np.uint32)))
        return self._grouped(x, flat, needed, inds.shape, weights)

    def _grouped(
        self, x: mx.array, flat: np.ndarray, needed: np.ndarray, shape: tuple, weights: mx.array
    ) -> mx.array:
        """A chunk that routes to more experts than there are slots: take its (token, expert)
        pairs in expert order, `slots` experts at a time, so each expert is still read once per
        layer and memory stays within the slots."""
        k = shape[-1]
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], needed[:: self._slots])
        x = x.reshape(-1, 1, x.shape[-1])
        accumulate = x.dtype == mx.float32  # the model's arithmetic there, to the bit
        out, outs = mx.zeros((x.shape[0], x.shape[-1]), x.dtype), []
        for i, (a, b) in enumerate(zip(bounds, [*bounds[1:], len(order)], strict=True)):
            self._ensure(needed[i * self._slots : (i + 1) * self._slots])
            pairs = order[a:b]
            tokens = mx.array(pairs // k)
            slots = mx.array(self._slot_of[flat[pairs]].astype(np.uint32))
            if accumulate:
                w = weights.flatten()[mx.array(pairs)]
                out = self._glu.accumulate(out, x, tokens, slots, w)
            else:
                outs.append(SwitchGLU.__call__(self._glu, x[tokens, 0], slots[:, None])[:, 0])
            mx.eval(out, outs)  # before the next group's experts overwrite these slots
        if accumulate:
            return out.reshape(*shape[:-1], -1)
        y = mx.concatenate(outs)[mx.array(np.argsort(order))]
        return mix(y.reshape(*shape, -1), weights)


def _expert_tensors(
    files: dict[str, Path], headers: dict[Path, tuple], prefix: str, n_experts: int
) -> dict[str, dict[str, ExpertTensor]]:
    """The stacked expert tensors of one layer, located in their files (`headers` caches the
    files' tensor tables)."""
    out: dict[str, dict[str, ExpertTensor]] = {}
    for proj in PROJECTIONS:
        out[proj] = {}
        for part in PARTS:
            name = f"{prefix}.{proj}.{part}"
            if name not in files:
                continue
            f = files[name]
            if f not in headers:
                headers[f] = read_header(f)
            start, header = headers[f]
            if name not in header:
                raise ValueError(f"{name} is listed in the index but not in {f}")
            out[proj][part] = ExpertTensor.locate(name, f, start, header[name], n_experts)
        if "weight" not in out[proj]:
            raise ValueError(
                f"{prefix}.{proj}.weight not found: expert streaming needs a checkpoint converted "
                "by convert.py or mlx_lm.convert (experts stacked per layer)"
            )
    return out


def routed_experts(
    path: Path, config: dict[str, Any], weights: dict[str, mx.array], slots: int
) -> Callable[[str], StreamingSwitchGLU]:
    """For `loading.build_model`: removes the routed experts from `weights` (so they are never
    read whole) and returns the factory of each MoE layer's streaming `switch_mlp`."""
    n, k = config["n_routed_experts"], config["num_experts_per_tok"]
    if slots < k:
        raise ValueError(f"expert_slots must be at least num_experts_per_tok ({k}), got {slots}")
    for name in [name for name in weights if ".switch_mlp." in name]:
        del weights[name]
    mode = (config.get("quantization") or {}).get("mode", "affine")
    files, headers = weight_files(path), {}

    def make(prefix: str) -> StreamingSwitchGLU:
        tensors = _expert_tensors(files, headers, prefix, n)
        return StreamingSwitchGLU(
            tensors,
            n,
            min(slots, n),
            config["hidden_size"],
            config["moe_intermediate_size"],
            mode,
        )

    return make


def expert_bytes(path: Path, config: dict[str, Any]) -> tuple[int, int]:
    """(bytes of one expert as stored, number of MoE layers with streamed experts)."""
    files = weight_files(path)
    prefixes = sorted({n.rsplit(".", 2)[0] for n in files if ".switch_mlp." in n})
    if not prefixes:
        raise ValueError(
            f"No stacked experts in {path}: expert streaming needs a checkpoint "
            "converted by convert.py or mlx_lm.convert"
        )
    tensors = _expert_tensors(files, {}, prefixes[0], config["n_routed_experts"])
    return sum(t.row_bytes for p in tensors.values() for t in p.values()), len(prefixes)


def slots_for_budget(path: Path, config: dict[str, Any], gb: float) -> int:
    """The number of expert slots per layer that fit in `gb` gigabytes."""
    size, layers = expert_bytes(path, config)
    slots = min(int(gb * 1e9 // (size * layers)), config["n_routed_experts"])
    k = config["num_experts_per_tok"]
    if slots < k:
        need = k * size * layers / 1e9
        raise ValueError(
            f"--expert-cache-gb {gb} is too small: the minimum ({k} slots) needs {need:.3g} GB"
        )
    return slots


def fits_in_memory(path: Path, config: dict[str, Any], slots: int | None) -> bool:
    """Whether the checkpoint's weights, with `slots` expert slots per layer (None: every
    expert resident), fit in the memory available, from the files' sizes alone."""
    size, layers = expert_bytes(path, config)
    total = sum(f.stat().st_size for f in set(weight_files(path).values()))
    n = config["n_routed_experts"]
    return total - (n - min(slots or n, n)) * size * layers <= available_memory()


@dataclass
class StreamStats:
    """Expert-streaming figures, summed over the MoE layers (the MTP layer included).

    hits / misses: expert lookups found in / read into the slots; bytes_read: expert bytes read
    from the safetensors files; read_s: seconds spent reading; tokens: tokens through the first
    MoE layer; prefill_bytes_read / prefill_tokens: those of prompt chunks (see `prefilling`);
    resident_bytes: non-expert weights plus all slots; slots: per layer.
    """

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    tokens: int = 0
    prefill_bytes_read: int = 0
    prefill_tokens: int = 0
    resident_bytes: int = 0
    slots: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    def __sub__(self, other: StreamStats) -> StreamStats:
        d = {k: v - getattr(other, k) for k, v in asdict(self).items()}
        return StreamStats(**{**d, "resident_bytes": self.resident_bytes, "slots": self.slots})


def _streamers(model: nn.Module) -> list[StreamingSwitchGLU]:
    return [m for _, m in model.named_modules() if isinstance(m, StreamingSwitchGLU)]


def streams_experts(model: nn.Module) -> bool:
    """Whether the model keeps its routed experts on disk."""
    return bool(_streamers(model))


@contextmanager
def prefilling(model: nn.Module) -> Iterator[None]:
    """Count the expert reads inside as the prompt's (`StreamStats.prefill_bytes_read`)."""
    streamers = _streamers(model)
    for m in streamers:
        m.prefill = True
    try:
        yield
    finally:
        for m in streamers:
            m.prefill = False


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the weights held in memory: parameters plus expert slots."""
    params = sum(a.nbytes for _, a in nn.utils.tree_flatten(model.parameters()))
    return params + sum(s.slot_bytes for s in _streamers(model))


def stats(model: nn.Module) -> StreamStats:
    """The model's streaming figures so far (all zero but `resident_bytes` when not streaming)."""
    streamers = _streamers(model)
    s = StreamStats(resident_bytes=resident_bytes(model))
    for m in streamers:
        for key, value in m._stats.items():
            if not key.endswith("tokens"):
                setattr(s, key, getattr(s, key) + value)
    if streamers:  # tokens: the MTP layer may see none
        s.tokens = max(m._stats["tokens"] for m in streamers)
        s.prefill_tokens = max(m._stats["prefill_tokens"] for m in streamers)
        s.slots = streamers[0]._slots
    return s


def disk_read_gbs(path: Path, limit: int = 1 << 30) -> float:
    """Sequential read speed of the checkpoint's largest weight file (up to `limit` bytes, in
    16 MiB reads), after asking the OS to drop the file from its page cache (Linux); where it
    cannot, a cached file reads at memory speed and this overstates the disk."""
    f = max(set(weight_files(path).values()), key=lambda f: f.stat().st_size)
    fd = os.open(f, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size, chunk, done = min(f.stat().st_size, limit), 1 << 24, 0
        tic = perf_counter()
        while done < size:
            done += len(os.pread(fd, min(chunk, size - done), done)) or size
        return done / (perf_counter() - tic) / 1e9
    finally:
        os.close(fd)


def summary(delta: StreamStats, tokens: int, disk_gbs: float | None = None) -> str:
    """One line for the command line: hit rate, bytes read per prompt token and per generated
    token (`tokens` of them), and the read speed achieved, beside the disk's sequential read
    speed (`disk_read_gbs`) when given."""
    decode = delta.bytes_read - delta.prefill_bytes_read
    speed = delta.bytes_read / delta.read_s / 1e9 if delta.read_s else 0.0
    return (
        f"Expert streaming: {delta.slots} slots/layer, hit rate {delta.hit_rate:.1%}, read "
        f"{delta.prefill_bytes_read / max(delta.prefill_tokens, 1) / 1e6:.3g} MB/prompt token "
        f"and {decode / max(tokens, 1) / 1e6:.3g} MB/generated token at {speed:.3g} GB/s"
        + (f" (disk sequential read: {disk_gbs:.3g} GB/s)" if disk_gbs is not None else "")
        + f", resident weights {delta.resident_bytes / 1e9:.3g} GB"
    )


def available_memory() -> int:
    """Bytes the weights may take: Metal's recommended working set; elsewhere what the OS
    reports available (Linux's MemAvailable), or all physical memory where it reports nothing."""
    if mx.metal.is_available():
        return mx.device_info()["max_recommended_working_set_size"]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(model: nn.Module, force: bool = False) -> None:
    """Refuse a model whose resident weights (expert slots included) exceed the memory
    available, before any is read: it would page without end or be killed. `force` loads it
    anyway."""
    size, limit = resident_bytes(model), available_memory()
    if size > limit and not force:
        raise ValueError(
            f"The model's resident weights ({size / 1e9:.1f} GB) exceed the memory available "
            f"({limit / 1e9:.1f} GB). Keep the routed experts on disk: --expert-cache-gb G or "
            "--expert-slots N (load(path, expert_slots=N)); load(..., force=True) loads it anyway."
        )
