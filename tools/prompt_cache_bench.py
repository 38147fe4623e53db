"""Prompt cache measurements (issue 21) against a server on a copy of the demo model with a
64K context (made in a temporary folder; `--model` to use another).

    PYTHONPATH=. python tools/prompt_cache_bench.py replay RECORDING/claude
    PYTHONPATH=. python tools/prompt_cache_bench.py restart [--tokens 8000]

`replay DIR` sends the request bodies that `tools/agents_check.py --record` saved for one
client (``NNN.json`` holding ``{path, body}``; `--turns` records a session over several turns) to
one server in order, their completion lengths capped, and prints per request the prompt tokens,
the cached tokens and the share cached, from each API's usage fields.

`restart` times the first token of one N-token prompt (token ids, through /v1/completions) on a
fresh server with an empty `--prompt-cache-dir`, then on a new server process on the same folder
after a clean shutdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agents_check import cap, demo_copy, start_glm_server, stop_glm_server  # noqa: E402


def recorded(folder: Path) -> list[tuple[str, dict]]:
    """(path, body) of each recorded request with a JSON body, in order."""
    turns = []
    for f in sorted(folder.glob("[0-9][0-9][0-9].json")):
        data = json.loads(f.read_text())
        if isinstance(data.get("body"), dict):
            turns.append((data["path"], data["body"]))
    return turns


def cached_share(path: str, usage: dict) -> tuple[int, int]:
    """(prompt tokens, cached tokens) from an Anthropic or OpenAI usage object."""
    if path.startswith("/v1/messages"):
        read = usage.get("cache_read_input_tokens") or 0
        total = usage["input_tokens"] + read + (usage.get("cache_creation_input_tokens") or 0)
        return total, read
    details = usage.get("prompt_tokens_details") or {}
    return usage["prompt_tokens"], details.get("cached_tokens") or 0


def replay(a: argparse.Namespace, model: Path, folder: Path) -> None:
    turns = recorded(a.folder)
    if not turns:
        raise SystemExit(f"no recorded requests in {a.folder}")
    server, url = start_glm_server(model, folder / "server.log")
    print("| turn | path | prompt tokens | cached tokens | % cached | seconds |")
    print("|---|---|---|---|---|---|")
    try:
        with httpx.Client(timeout=3600) as http:
            for i, (path, body) in enumerate(turns, 1):
                if not path.startswith(("/v1/messages", "/v1/chat/completions")):
                    continue
                if path.startswith("/v1/messages/count_tokens"):
                    continue
                body = cap(path, body, a.max_tokens)
                body["stream"] = False
                body.pop("stream_options", None)
                start = time.perf_counter()
                r = http.post(url + path.split("?")[0], json=body)
                seconds = time.perf_counter() - start
                if r.status_code != 200:
                    print(f"| {i} | {path} | error {r.status_code}: {r.text[:80]} | | | |")
                    continue
                total, cached = cached_share(path, r.json()["usage"])
                share = 100 * cached / total if total else 0.0
                row = [i, path.split("?")[0], total, cached, f"{share:.1f}", f"{seconds:.1f}"]
                print("| " + " | ".join(map(str, row)) + " |")
    finally:
        stop_glm_server(server)


def restart(a: argparse.Namespace, model: Path, folder: Path) -> None:
    # Token ids through /v1/completions: exactly `--tokens` of them, whatever the tokenizer.
    ids = [100 + (i * 7919) % 2000 for i in range(a.tokens)]
    body = {"model": "demo", "prompt": ids, "max_tokens": 1}
    cache_dir = folder / "prompt-cache"
    rows = []
    for label in ("cold", "after restart"):
        log = folder / f"server-{label.replace(' ', '-')}.log"
        server, url = start_glm_server(model, log, "--prompt-cache-dir", str(cache_dir))
        try:
            start = time.perf_counter()
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=3600)
            seconds = time.perf_counter() - start
            r.raise_for_status()
            usage = r.json()["usage"]
            rows.append((label, usage["prompt_tokens"], cached_share("", usage)[1], seconds))
        finally:
            stop_glm_server(server)
    print("| run | prompt tokens | cached tokens | time to first token (s) |")
    print("|---|---|---|---|")
    for label, n, cached, seconds in rows:
        print(f"| {label} | {n} | {cached} | {seconds:.2f} |")
    print(f"after restart / cold: {100 * rows[1][3] / rows[0][3]:.1f}%")
    size = sum(f.stat().st_size for f in cache_dir.rglob("*.safetensors"))
    print(f"prompt cache folder: {size / 1e6:.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="Model folder (default: the demo model at 64K).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="Replay recorded turns; per-turn cache reuse.")
    r.add_argument("folder", type=Path)
    r.add_argument("--max-tokens", type=int, default=16)
    s = sub.add_parser("restart", help="Time to first token cold and after a restart.")
    s.add_argument("--tokens", type=int, default=8000, help="Prompt tokens.")
    a = p.parse_args()
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or demo_copy(Path(tmp))
        if a.command == "replay":
            replay(a, model, Path(tmp))
        else:
            restart(a, model, Path(tmp))


if __name__ == "__main__":
    main()
