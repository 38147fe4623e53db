"""The prompt cache: token sequences → KV caches, reused across turns and requests, kept in
memory and, with a folder, on disk across restarts.

On disk an entry is one ``.safetensors`` file written by mlx-lm's `save_prompt_cache`, named by
a digest of its tokens, in a subfolder named by the model's key (`model_key`): what changes a
cache's meaning (the weight files, the config, the activation dtype and device, the KV bits, the
MTP layer) changes the key, so a cache only ever loads into the model that made it. The token
sequence travels in the file's metadata; the index of sequences is rebuilt from the file headers
at start.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import (
    KVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from .models import Model
from .mtp import MTPCache, make_cache

log = logging.getLogger("mlx_glm4moe.prompt_cache")

FORMAT = 1
# save_prompt_cache stores [metadata, classes, scalars] flattened: our metadata's keys get "0.".
META = "0."


@dataclass
class _Entry:
    tokens: np.ndarray
    cache: list
    pinned: bool = False


class PromptCache:
    """An LRU of token sequences → KV caches, for reuse across turns and requests.

    `fetch(tokens)` hands out a private copy of the cache sharing the longest common prefix
    with `tokens`, trimmed to that prefix, and the tokens still to feed. `store(tokens, cache)`
    takes ownership of a cache after generation. Holds at most `max_entries` caches and
    `max_bytes` bytes of cache state; eviction takes the least recently used entry not
    `pinned` first (a pinned entry holds a prefix the client said it will send again), then the
    least recently used pinned one. Copies in use count against `max_bytes` too, between
    `lend(copy)` and `release`. Thread-safe. With `mtp`, its caches carry the MTP layer's part,
    for `stream_generate(..., mtp=True)`.

    With `directory`, evicted entries (and all of them at `flush()`) are written there, at most
    `max_disk_bytes` in all (least recently used files go first), and a fetch whose longest
    common prefix is on disk loads it back, across restarts. The writes run on a thread of
    their own (an entry can be gigabytes); until written, an evicted entry is still served from
    memory. `kv_bits` names the KV quantization the caches are made with (part of the disk
    key). A folder that cannot be used is a warning, and the cache runs in memory only.
    """

    def __init__(
        self,
        model: Model,
        max_bytes: int = 8 << 30,
        max_entries: int = 8,
        mtp: bool = False,
        *,
        directory: str | Path | None = None,
        max_disk_bytes: int = 32 << 30,
        kv_bits: int | None = None,
    ) -> None:
        self.model = model
        self.mtp = mtp
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self._lent = 0
        self._lock = threading.Lock()
        self.disk: DiskCache | None = None
        self._writing: list[_Entry] = []  # queued for the folder, not written yet
        self._writes: queue.Queue[_Entry] = queue.Queue()
        if directory is not None:
            key = model_key(model, mtp, kv_bits)
            self.disk = DiskCache.open(Path(directory), key, max_disk_bytes, self._expected())
        if self.disk is not None:
            threading.Thread(target=self._writer, name="prompt-cache-writer", daemon=True).start()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of cache state held in memory as entries."""
        return sum(_nbytes(e.cache) for e in self._entries.values())

    @property
    def lent(self) -> int:
        """Bytes of the copies in use (between `lend` and `release`)."""
        return self._lent

    def fetch(self, tokens: list[int]) -> tuple[list, list[int], int]:
        """(cache, remaining_tokens, cached_count): feed `remaining_tokens` to `cache`.

        At least one token always remains (generation needs a new token to produce logits), so
        a fully cached prompt gives back its last token.
        """
        if not tokens:
            raise ValueError("fetch() needs at least one token")
        query = np.asarray(tokens)
        with self._lock:
            best, entry, n = None, None, 0
            for key, e in self._entries.items():
                if (common := _usable(e.tokens, e.cache, query)) > n:
                    best, entry, n = key, e, common
            for e in self._writing:
                if (common := _usable(e.tokens, e.cache, query)) > n:
                    best, entry, n = None, e, common
            if self.disk is not None and (found := self.disk.best(query, n)) is not None:
                seq, cache, path = found
                if (common := _usable(seq, cache, query)) > n:
                    entry, n = _Entry(seq, cache), common
                    best = self._insert(entry)
                    self.disk.touch(path)  # after the eviction it caused: the most recent
            if entry is None:
                return make_cache(self.model, self.mtp), list(tokens), 0
            if best in self._entries:
                self._entries.move_to_end(best)
            cache = copy.deepcopy(entry.cache)
        trim_prompt_cache(cache, len(entry.tokens) - n)
        return cache, list(tokens[n:]), n

    def lend(self, cache: list) -> int:
        """Count `cache`, a copy from `fetch` now in use, against `max_bytes` (entries are
        evicted to make room); the bytes to `release` when its user is done with it."""
        nbytes = _nbytes(cache)
        with self._lock:
            self._lent += nbytes
            self._evict()
        return nbytes

    def release(self, nbytes: int) -> None:
        """A lent copy (`lend`'s count) is no longer in use."""
        with self._lock:
            self._lent -= nbytes

    def store(self, tokens: list[int], cache: list, pinned: bool = False) -> bool:
        """Keep `cache`, which holds `tokens` (or a prefix of them: anything past the cache's
        length is ignored; cache entries past `len(tokens)` are trimmed). The caller must not
        use `cache` afterwards. Returns whether it was kept as a new entry (False when an entry
        already held these tokens, or the cache could not be trimmed to them)."""
        length = min(len(tokens), _offset(cache))
        if length == 0 or (length < _offset(cache) and not can_trim_prompt_cache(cache)):
            return False
        trim_prompt_cache(cache, _offset(cache) - length)
        seq = np.asarray(tokens[:length])
        with self._lock:
            for key, old in list(self._entries.items()):
                n = _common_prefix(old.tokens, seq)
                if n == len(seq):  # already covered by a longer (or equal) entry
                    self._entries.move_to_end(key)
                    old.pinned |= pinned
                    return False
                if n == len(old.tokens):  # the new entry covers the old one
                    pinned |= old.pinned
                    del self._entries[key]
            self._insert(_Entry(seq, cache, pinned))
        return True

    def flush(self) -> None:
        """Write every entry held in memory to the folder (when there is one), and wait for
        the writes; at shutdown."""
        if self.disk is None:
            return
        with self._lock:
            for e in self._entries.values():
                self._write(e)
        self.wait_for_writes()

    def wait_for_writes(self) -> None:
        """Return when every entry queued for the folder is written."""
        self._writes.join()

    def _insert(self, entry: _Entry) -> int:
        """Add an entry, evict down to the caps (to disk, when there is one); its key."""
        key = self._next_key
        self._entries[key] = entry
        self._next_key += 1
        self._evict()
        return key

    def _evict(self) -> None:
        sizes = {k: _nbytes(e.cache) for k, e in self._entries.items()}
        total = sum(sizes.values()) + self._lent
        while self._entries and (total > self.max_bytes or len(self._entries) > self.max_entries):
            victim = next((k for k, e in self._entries.items() if not e.pinned), None)
            if victim is None:
                victim = next(iter(self._entries))
            evicted = self._entries.pop(victim)
            total -= sizes[victim]
            if self.disk is not None:
                self._write(evicted)

    def _write(self, entry: _Entry) -> None:
        """Queue `entry` for the writer thread."""
        # Evaluated here: pending work on this thread's MLX stream cannot run on another's.
        mx.eval([c.state for c in entry.cache])
        self._writing.append(entry)
        self._writes.put(entry)

    def _writer(self) -> None:
        while True:
            entry = self._writes.get()
            try:
                self.disk.save(entry.tokens, entry.cache)
            except Exception:
                log.exception("prompt cache: an entry could not be written")
            finally:
                with self._lock:
                    self._writing.remove(entry)
                self._writes.task_done()

    def _expected(self) -> int:
        """Caches per entry: the main layers, and the MTP layer's when it has one."""
        return len(make_cache(self.model, self.mtp))


class DiskCache:
    """Prompt caches in `root/key/<digest of tokens>.safetensors` (see the module docstring).
    Thread-safe: its lock guards the index, not the reading and writing of files."""

    def __init__(self, root: Path, key: str, max_bytes: int, expected: int) -> None:
        self.root, self.key, self.max_bytes, self.expected = root, key, max_bytes, expected
        self.folder = root / key
        self.index: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        probe = self.folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith("."):  # a write that never finished
                _remove(path)
            elif path.suffix == ".safetensors":
                if (tokens := _read_tokens(path, key)) is None:
                    self._drop(path, "is truncated or not a prompt cache of this model")
                else:
                    self.index[path] = tokens

    @classmethod
    def open(cls, root: Path, key: str, max_bytes: int, expected: int) -> DiskCache | None:
        """The disk cache in `root`, or None (with a warning) when the folder is unusable."""
        try:
            return cls(root, key, max_bytes, expected)
        except OSError as e:
            log.warning("prompt cache folder %s is not usable (%s): running without it", root, e)
            return None

    def best(self, query: np.ndarray, longer_than: int) -> tuple[np.ndarray, list, Path] | None:
        """The entry with the longest common prefix with `query`, if longer than
        `longer_than`, loaded: (tokens, cache, file). A file that does not load is removed."""
        with self._lock:
            scored = [(_common_prefix(seq, query), path, seq) for path, seq in self.index.items()]
        n, path, seq = max(scored, default=(0, None, None), key=lambda s: s[0])
        if path is None or min(n, len(query) - 1) <= longer_than:
            return None
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
            cache = self._restore(cache, meta, len(seq))
        except FileNotFoundError:  # removed by another server sharing the folder
            with self._lock:
                self.index.pop(path, None)
            return None
        except Exception as e:
            self._drop(path, f"does not load ({type(e).__name__}: {e})")
            return None
        return seq, cache, path

    def touch(self, path: Path) -> None:
        """Mark a file used now (least recently used files go first)."""
        try:
            os.utime(path)
        except OSError:
            pass

    def save(self, tokens: np.ndarray, cache: list) -> None:
        """Write an entry (atomically: a temporary file, then a rename), unless one holding
        these tokens or more is there; entries it covers go. Then trim to the size bound."""
        with self._lock:
            for path, seq in list(self.index.items()):
                n = _common_prefix(seq, tokens)
                if n == len(tokens):
                    self.touch(path)
                    return
                if n == len(seq):
                    self.index.pop(path)
                    _remove(path)
        path = self.folder / f"{hashlib.sha256(tokens.astype(np.int64).tobytes()).hexdigest()}"
        path = path.with_suffix(".safetensors")
        temp = self.folder / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.safetensors"
        meta = {"key": self.key, "tokens": json.dumps(tokens.tolist())}
        if isinstance(cache[-1], MTPCache):
            meta["mtp_tokens"] = json.dumps(cache[-1].tokens)
        try:
            save_prompt_cache(str(temp), [_compact(c) for c in cache], meta)
            os.replace(temp, path)
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("prompt cache: could not write %s (%s)", path, e)
            _remove(temp)
            return
        with self._lock:
            self.index[path] = tokens
            self._trim()

    def _restore(self, cache: list, meta: dict, length: int) -> list:
        """The loaded cache of `length` tokens with its MTP part rebuilt; raises ValueError
        when it does not fit."""
        if meta.get("key") != self.key or len(cache) != self.expected:
            raise ValueError("not a prompt cache of this model")
        if "mtp_tokens" in meta:
            mtp = MTPCache()
            mtp.state = cache[-1].state
            mtp.tokens = json.loads(meta["mtp_tokens"])
            cache[-1] = mtp
        if cache[0].offset != length:
            raise ValueError("its cache and its tokens differ in length")
        mx.eval([c.state for c in cache])
        return cache

    def _trim(self) -> None:
        """Remove the least recently used files of the whole folder (every model's) until they
        fit the bound. Under the lock."""
        files = []
        for path in self.root.glob("*/*.safetensors"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            self.index.pop(path, None)
            _remove(path)
            total -= size

    def _drop(self, path: Path, why: str) -> None:
        log.warning("prompt cache: %s %s: removed", path, why)
        with self._lock:
            self.index.pop(path, None)
        _remove(path)


def model_key(model: Model, mtp: bool, kv_bits: int | None) -> str:
    """A digest of what changes a prompt cache's meaning: the weight files (names, sizes,
    modification times), config.json, the activation dtype and the device, the KV bits, and
    whether the caches carry the MTP layer's part. Needs a model from `loading.load`."""
    source = getattr(model, "source", None)
    if source is None:
        raise ValueError("a prompt cache on disk needs a model made by load()")
    source = Path(source)
    weights = []
    for path in sorted(source.glob("*.safetensors")):
        st = path.stat()
        weights.append([path.name, st.st_size, st.st_mtime_ns])
    ident = {
        "format": FORMAT,
        "config": (source / "config.json").read_text(),
        "weights": weights,
        "activations": model.model.activations,
        "device": str(mx.default_device()),
        "kv_bits": kv_bits,
        "mtp": mtp and model.mtp is not None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _read_tokens(path: Path, key: str) -> np.ndarray | None:
    """The token sequence in a cache file's header; None when the file is truncated or is not
    a prompt cache for `key` (the data is read only when the entry is used)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return None
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__")
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if meta.get(META + "key") != key or size != 8 + n + end:
            return None
        return np.asarray(json.loads(meta[META + "tokens"]), dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _compact(cache: Any) -> Any:
    """A KV cache (an MTP cache as a plain one: mlx-lm's loader knows only its own classes)
    without the unused room past its offset; other caches as they are."""
    if not isinstance(cache, KVCache):
        return cache
    plain = KVCache()
    if cache.keys is not None:
        n = cache.offset
        plain.state = (cache.keys[..., :n, :], cache.values[..., :n, :], n)
    return plain


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _usable(seq: np.ndarray, cache: list, query: np.ndarray) -> int:
    """How many tokens of `query` an entry can give: its common prefix, leaving at least one
    token to feed, and only the whole entry when its cache cannot be trimmed."""
    common = min(_common_prefix(seq, query), len(query) - 1)
    # trim_prompt_cache silently does nothing on caches that cannot be trimmed.
    return common if common == len(seq) or can_trim_prompt_cache(cache) else 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _offset(cache: list) -> int:
    """Tokens in the main layers' caches (an MTP cache after them holds one entry fewer, and
    is trimmed by the same count)."""
    return cache[0].offset if cache else 0


def _nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
