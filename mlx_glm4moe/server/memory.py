"""MLX's memory budget for a server that shares the Mac: limits on what MLX may allocate and keep
in its buffer cache, how much it wires, and the figures `/health` and `/metrics` report.

Wired memory cannot be paged out or compressed. Wiring the whole model on a 16 GB Mac leaves
macOS, the app and the growing KV cache too little, and the machine stalls instead of slowing
down. So `auto` wires the model plus headroom, never more than leaves `FREE_SHARE` of RAM (and
at least `FREE_FLOOR`) unwired, and never more than Metal's recommended working set.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

log = logging.getLogger(__name__)
GB = 1 << 30
FREE_SHARE = 0.25  # of RAM never wired by `auto`
FREE_FLOOR = 4 * GB  # ... and never less than this
HEADROOM_SHARE = 0.1  # `auto` wires the model's bytes plus this share of them
HEADROOM = 1 * GB  # ... plus this, for activations and the first KV cache blocks


def figures() -> dict[str, int]:
    """MLX's memory in bytes: in use by arrays, kept in its buffer cache, and the peak."""
    return {
        "active": mx.get_active_memory(),
        "cache": mx.get_cache_memory(),
        "peak": mx.get_peak_memory(),
    }


def ram() -> int:
    """The machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def auto_wired(model_bytes: int, ram_bytes: int, recommended: int | None = None) -> int:
    """What `--wired-limit auto` wires (see the module docstring)."""
    wanted = int(model_bytes * (1 + HEADROOM_SHARE)) + HEADROOM
    ceiling = ram_bytes - max(int(ram_bytes * FREE_SHARE), FREE_FLOOR)
    if recommended is not None:
        ceiling = min(ceiling, recommended)
    return max(0, min(wanted, ceiling))


def set_limits(memory_gb: float | None = None, cache_gb: float | None = None) -> None:
    """MLX's memory limit (allocations past it wait for memory or fail) and buffer-cache limit
    (freed buffers past it go back to the system at once); None leaves MLX's default."""
    if memory_gb is not None:
        mx.set_memory_limit(int(memory_gb * GB))
    if cache_gb is not None:
        mx.set_cache_limit(int(cache_gb * GB))


def set_wired(limit: str, model_bytes: int) -> int:
    """Apply ``--wired-limit`` ("auto", "off" or a number of GB) for a model of `model_bytes`;
    returns the bytes wired. Only Metal wires memory: elsewhere this is a no-op (logged)."""
    if limit == "off":
        wired = 0
    elif not mx.metal.is_available():
        log.info("--wired-limit %s: no Metal device, nothing is wired", limit)
        return 0
    elif limit == "auto":
        info = mx.device_info()
        wired = auto_wired(model_bytes, ram(), info.get("max_recommended_working_set_size"))
    else:
        wired = int(float(limit) * GB)
    if mx.metal.is_available():
        mx.set_wired_limit(wired)
        log.info("wired limit: %.1f GB", wired / GB)
    return wired
