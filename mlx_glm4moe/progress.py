"""Progress an app can draw: long steps (download, convert, upload, load) report
``(stage, done, total)`` to a callback, and `--progress json` prints each report as one NDJSON
line, ``{"event": "progress", "stage": ..., "done": n, "total": m}``, on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; `done` grows to `total` within a stage."""


def ndjson(out: TextIO | None = None) -> Progress:
    """A `Progress` that writes each report as a JSON line to `out` (stdout)."""

    def report(stage: str, done: int, total: int) -> None:
        event = {"event": "progress", "stage": stage, "done": done, "total": total}
        print(json.dumps(event), file=out or sys.stdout, flush=True)

    return report


def progress_bar(stage: str, progress: Progress) -> type[tqdm]:
    """A tqdm class (for libraries that take one) that also reports its count to `progress`."""

    class Bar(tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            progress(stage, int(self.n), int(self.total or 0))
            return shown

    return Bar
