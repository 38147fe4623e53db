"""Serving benchmark: aggregate completion tokens/s, median latency and generated tokens per
decode step for 1, 2, 4 and 8 concurrent clients on one server, in one run.

    python tools/serve_bench.py                  # builds the synthetic "bench" model in /tmp
    python tools/serve_bench.py --model DIR [--tokens 64] [--rounds 2] [--repeats 2]
    python tools/serve_bench.py --mtp [--synthetic 0.5 [--layers 12] | --model DIR]
        [--expert-slots N]

With `--mtp`, two servers on the same weights, without and with MTP, take the levels in turn
(so drifting machine load hits both alike); the table gives tokens/s by wall time and by the
process's CPU time (steadier on a shared machine: the clients run in the process too, alike for
both) and MTP's acceptance (drafts accepted / drafted, from /metrics). `--synthetic A` builds
a model whose MTP layer is right on a share A of tokens (`bench mtp --synthetic`). With
`--expert-slots`, experts stream from disk and each row also gives the expert bytes read per
generated token (decode only).

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

from mlx_glm4moe import streaming
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


def level(url: str, clients: int, rounds: int, tokens: int, tag: str, model=None) -> dict:
    """One concurrency level: aggregate tokens/s, median latency, tokens per decode step, MTP's
    acceptance and, when `model` streams its experts, MB read per generated token."""

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

    streams = model is not None and streaming.streams_experts(model)
    before, read = metrics(url), streaming.stats(model) if streams else None
    t, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    after = metrics(url)
    generated = sum(n for _, n in results)

    def delta(name: str) -> float:
        return after[f"glm4moe_{name}"] - before[f"glm4moe_{name}"]

    out = {
        "tps": generated / wall,
        "cpu_tps": generated / cpu,
        "latency": statistics.median(s for s, _ in results),
        "per_step": generated / delta("decode_steps_total"),
        "acceptance": delta("draft_accepted_total") / max(delta("draft_tokens_total"), 1),
    }
    if streams:
        d = streaming.stats(model) - read
        out["mb_per_token"] = (d.bytes_read - d.prefill_bytes_read) / generated / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="Model folder (default: build the synthetic bench model).")
    src.add_argument(
        "--synthetic", type=float, metavar="A", help="A model whose MTP layer is right on share A."
    )
    p.add_argument("--layers", type=int, help="--synthetic: main layers (default: the preset's).")
    p.add_argument("--tokens", type=int, default=64, help="Tokens per request.")
    p.add_argument("--rounds", type=int, default=2, help="Requests per client per level.")
    p.add_argument("--repeats", type=int, default=2, help="Times the levels run, in turn.")
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="Client counts.")
    p.add_argument("--decode-concurrency", type=int, default=8)
    p.add_argument("--mtp", action="store_true", help="Compare plain and MTP decoding.")
    p.add_argument("--num-draft", type=int, default=1)
    p.add_argument("--expert-slots", type=int, help="Stream experts, N slots per layer.")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model
        if a.synthetic is not None:
            from mlx_glm4moe.convert import convert
            from mlx_glm4moe.synthetic import make_agreeing_checkpoint

            layers = {"num_hidden_layers": a.layers} if a.layers else {}
            hf = make_agreeing_checkpoint(Path(tmp) / "hf", a.synthetic, **layers)
            path = convert(str(hf), str(Path(tmp) / "mlx"), quantize=True)
        elif path is None:
            from mlx_glm4moe.bench import bench_checkpoint

            path = bench_checkpoint(Path(tmp) / "bench")
        model, tokenizer = load(path, expert_slots=a.expert_slots)
        modes = (False, True) if a.mtp else (False,)
        servers = {}
        for mtp in modes:
            app = create_app(
                model,
                tokenizer,
                max_tokens=a.tokens,
                decode_concurrency=a.decode_concurrency,
                mtp=mtp,
                num_draft=a.num_draft,
            )
            servers[mtp] = serve(app)
            level(servers[mtp][0], 1, 1, 8, "warm-up")
        runs = {(mtp, n): [] for mtp in modes for n in a.levels}
        for r in range(a.repeats):
            for n in a.levels:
                for mtp in modes if r % 2 == 0 else modes[::-1]:
                    url = servers[mtp][0]
                    runs[mtp, n].append(level(url, n, a.rounds, a.tokens, f"repeat {r}", model))
        for _, server, thread in servers.values():
            server.should_exit = True
            thread.join(timeout=30)

    def med(mtp: bool, n: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[mtp, n])

    name = path if a.synthetic is None else f"synthetic, agreement {a.synthetic}"
    print(f"model: {name}, {a.tokens} tokens per request, {a.rounds} requests per client")
    if not a.mtp:
        print("| clients | aggregate tokens/s | vs 1 | median latency (s) | tokens/decode step |")
        print("|--:|--:|--:|--:|--:|")
        for n in a.levels:
            tps = med(False, n, "tps")
            print(
                f"| {n} | {tps:.1f} | {tps / med(False, a.levels[0], 'tps'):.2f}x "
                f"| {med(False, n, 'latency'):.2f} | {med(False, n, 'per_step'):.2f} |"
            )
        return
    streams = streaming.streams_experts(model)
    columns = ["clients", "tokens/s plain", "MTP", "MTP/plain", "by CPU time: plain", "MTP"]
    columns += ["MTP/plain", "tokens/step plain", "MTP"]
    columns += ["MTP acceptance"] + (["MB read/token plain", "MTP"] if streams else [])
    print("| " + " | ".join(columns) + " |")
    print("|" + "--:|" * len(columns))
    for n in a.levels:
        plain, spec = med(False, n, "tps"), med(True, n, "tps")
        cells = [str(n), f"{plain:.1f}", f"{spec:.1f}", f"{spec / plain:.2f}x"]
        plain, spec = med(False, n, "cpu_tps"), med(True, n, "cpu_tps")
        cells += [f"{plain:.1f}", f"{spec:.1f}", f"{spec / plain:.2f}x"]
        cells += [f"{med(m, n, 'per_step'):.2f}" for m in (False, True)]
        cells.append(f"{med(True, n, 'acceptance'):.2f}")
        if streams:
            cells += [f"{med(m, n, 'mb_per_token'):.2f}" for m in (False, True)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
