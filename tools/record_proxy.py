"""A logging proxy for recording what agent clients send across turns (issue 21).

    python tools/record_proxy.py --upstream http://127.0.0.1:8080 --port 8090 --out DIR

Every POST is forwarded to `--upstream` and its body saved, as the client sent it, to
``DIR/turnN.json`` (N counts from 1), with ``DIR/turnN.meta.json`` holding the path, the
client's headers (keys masked) and what the proxy changed. What it changes in the forwarded
copy only, so that a slow CPU demo model can take part in a real session:

- ``max_tokens`` / ``max_completion_tokens`` capped at ``--max-tokens`` (default 64);
- Anthropic requests: ``thinking: {"type": "adaptive"}`` (newer Claude Code) becomes
  ``{"type": "enabled"}``, and messages with role "system" are dropped from ``messages`` and
  their text appended to ``system``: the server rejected both when this tool was written.

Replies pass through unchanged (streamed); while a streamed reply is silent for 10 s between
events (a long prefill), the proxy sends the client an Anthropic ``ping`` event (an SSE comment
on other APIs). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

SECRET_HEADERS = {"authorization", "x-api-key"}
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
COMMENT = b": keepalive\n\n"


def rewrite(path: str, body: dict, cap: int) -> list[str]:
    """Change `body` in place for the upstream; returns what changed."""
    changes = []
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(key), int) and body[key] > cap:
            changes.append(f"{key} {body[key]} -> {cap}")
            body[key] = cap
    if path.startswith("/v1/messages"):
        if isinstance(body.get("thinking"), dict) and body["thinking"].get("type") == "adaptive":
            body["thinking"] = {"type": "enabled"}
            changes.append("thinking adaptive -> enabled")
        system = [m for m in body.get("messages", []) if m.get("role") == "system"]
        if system:
            body["messages"] = [m for m in body["messages"] if m.get("role") != "system"]
            blocks = body.get("system") or []
            if isinstance(blocks, str):
                blocks = [{"type": "text", "text": blocks}]
            for m in system:
                text = m["content"]
                blocks += [{"type": "text", "text": text}] if isinstance(text, str) else text
            body["system"] = blocks
            changes.append(f"{len(system)} role=system message(s) moved to system")
    return changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, help="The server, e.g. http://127.0.0.1:8080")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--out", type=Path, required=True, help="Folder for turnN.json")
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    upstream = urlsplit(a.upstream)
    lock = threading.Lock()
    counter = [len(list(a.out.glob("turn*.meta.json")))]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self, method: str) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            body_out = raw
            if method == "POST":
                with lock:
                    counter[0] += 1
                    n = counter[0]
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                changes = []
                if isinstance(body, dict):
                    (a.out / f"turn{n}.json").write_text(json.dumps(body, indent=1))
                    changes = rewrite(self.path, body, a.max_tokens)
                    body_out = json.dumps(body).encode()
                headers = {
                    k: ("***" if k.lower() in SECRET_HEADERS else v)
                    for k, v in self.headers.items()
                }
                meta = {"path": self.path, "headers": headers, "changes": changes}
                (a.out / f"turn{n}.meta.json").write_text(json.dumps(meta, indent=1))
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=3600)
            skip = {"host", "content-length", "connection", "accept-encoding"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            conn.request(
                method,
                self.path,
                body=body_out if method == "POST" else None,
                headers={**headers, "content-length": str(len(body_out))}
                if method == "POST"
                else headers,
            )
            resp = conn.getresponse()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("connection", "close")
            self.end_headers()
            chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()

            def read() -> None:
                while chunk := resp.read1(65536):
                    chunks.put(chunk)
                chunks.put(b"")

            threading.Thread(target=read, daemon=True).start()
            sse = "text/event-stream" in (resp.getheader("content-type") or "")
            last = b"\n\n"
            while True:
                try:
                    chunk = chunks.get(timeout=10)
                except queue.Empty:
                    # A long prefill on the CPU is silence a client may time out on.
                    if not (sse and last.endswith(b"\n\n")):
                        continue
                    chunk = PING if self.path.startswith("/v1/messages") else COMMENT
                else:
                    if not chunk:
                        break
                    last = chunk
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            conn.close()

        def do_POST(self) -> None:
            self._forward("POST")

        def do_GET(self) -> None:
            self._forward("GET")

    ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
