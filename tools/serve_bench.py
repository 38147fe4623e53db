"""Serving benchmark: aggregate completion tokens/s, median latency and generated tokens per
decode step for 1, 2, 4 and 8 concurrent clients on one server, in one run.

    python tools/serve_bench.py                  # builds the synthetic "bench" model in /tmp
    python tools/serve_bench.py --model DIR [--tokens 64] [--rounds 2] [--repeats 2]

Each client sends `--rounds` chat requests one after another (greedy, thinking off, a different
prompt each time, `--tokens` tokens each); the levels run in turn, the whole sequence
`--repeats` times, and each row reports the median over the repeats. Tokens per decode step
come from the server's /metrics.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from mlx_glm4moe.loading import load
from mlx_glm4moe.server import create_app

LEVELS = (1, 2, 4, 8)


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {ln.split()[0]: float(ln.split()[1]) for ln in lines if ln and ln[0] != "#"}


def level(url: str, clients: int, rounds: int, tokens: int, tag: str) -> dict:
    """One concurrency level: aggregate tokens/s, median latency, tokens per decode step."""

    def client(c: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for r in range(rounds):
                body = {
                    "messages": [
                        {"role": "user", "content": f"{tag} client {c} round {r}: tell a story"}
                    ],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "chat_template_kwargs": {"enable_thinking": False},
                }
                t = time.perf_counter()
                reply = http.post(f"{url}/v1/chat/completions", json=body).json()
                out.append((time.perf_counter() - t, reply["usage"]["completion_tokens"]))
        return out

    before = metrics(url)
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t
    after = metrics(url)
    generated = sum(n for _, n in results)
    steps = after["glm4moe_decode_steps_total"] - before["glm4moe_decode_steps_total"]
    return {
        "tps": generated / wall,
        "latency": statistics.median(s for s, _ in results),
        "per_step": generated / steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Model folder (default: build the synthetic bench model).")
    p.add_argument("--tokens", type=int, default=64, help="Tokens per request.")
    p.add_argument("--rounds", type=int, default=2, help="Requests per client per level.")
    p.add_argument("--repeats", type=int, default=2, help="Times the levels run, in turn.")
    p.add_argument("--decode-concurrency", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if path is None:
            from mlx_glm4moe.bench import bench_checkpoint

            path = bench_checkpoint(Path(tmp) / "bench")
        model, tokenizer = load(path)
        app = create_app(
            model, tokenizer, max_tokens=a.tokens, decode_concurrency=a.decode_concurrency
        )
        url, server, thread = serve(app)
        level(url, 1, 1, 8, "warm-up")
        runs: dict[int, list[dict]] = {n: [] for n in LEVELS}
        for r in range(a.repeats):
            for n in LEVELS:
                runs[n].append(level(url, n, a.rounds, a.tokens, f"repeat {r}"))
        server.should_exit = True
        thread.join(timeout=30)

    def med(n: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[n])

    print(f"model: {path}, {a.tokens} tokens per request, {a.rounds} requests per client")
    print("| clients | aggregate tokens/s | vs 1 | median latency (s) | tokens/decode step |")
    print("|--:|--:|--:|--:|--:|")
    for n in LEVELS:
        print(
            f"| {n} | {med(n, 'tps'):.1f} | {med(n, 'tps') / med(1, 'tps'):.2f}x "
            f"| {med(n, 'latency'):.2f} | {med(n, 'per_step'):.2f} |"
        )


if __name__ == "__main__":
    main()
