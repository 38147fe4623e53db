"""Soak the server: mixed concurrent requests on all four APIs (chat completions, completions,
responses, messages), streamed and whole, some dropped mid-stream, malformed bodies among them;
then print the figures: requests, concurrency, disconnects, bad inputs, 5xx, hangs, and the
p50/p99 time to the first token of the streams.

    PYTHONPATH=. python tools/soak.py [--seconds 120] [--concurrency 16] [--max-tokens 16]
        [--url http://127.0.0.1:8080]

Without --url it serves the bundled demo model in this process, on a free loopback port. Every
kept request must complete, a malformed one get a 4xx, none a 5xx, none hang (no answer within
--timeout); the exit status is 1 otherwise. tests/test_faults.py runs it briefly
(`BAD_BODIES`, `run`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

# -- malformed bodies ---------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"

_USER = [{"role": "user", "content": "hi"}]
_BASES = {
    CHAT: {"model": "m", "messages": _USER, "max_tokens": 4},
    COMPLETIONS: {"model": "m", "prompt": "hi", "max_tokens": 4},
    RESPONSES: {"model": "m", "input": "hi", "max_output_tokens": 4},
    MESSAGES: {"model": "m", "max_tokens": 4, "messages": _USER},
    COUNT: {"model": "m", "messages": _USER},
}
_DEEP = 5000  # levels: past Python's recursion limit


def _tool(schema: dict, strict: bool = True) -> dict:
    fn = {"name": "lookup", "parameters": schema, "strict": strict}
    return {"type": "function", "function": fn}


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _format(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}


def _with(path: str, **fields) -> tuple[str, bytes]:
    return path, json.dumps({**_BASES[path], **fields}).encode()


def _raw(path: str, text: str) -> tuple[str, bytes]:
    return path, text.encode()


def _nested(path: str, field: str) -> tuple[str, bytes]:
    """`field` (a list or an object) nested `_DEEP` levels deep, as raw JSON text."""
    base = json.dumps({k: v for k, v in _BASES[path].items() if k != field})
    return _raw(path, base[:-1] + f', "{field}": ' + "[" * _DEEP + "]" * _DEEP + "}")


SURROGATE = '"\\udcff\\u0000 hi"'  # JSON text of a string holding a lone surrogate
JSON_SCHEMA = "json_schema"

# (what, path, raw body): each must get a 4xx, never a 5xx.
BAD_BODIES: list[tuple[str, str, bytes]] = [
    (what, *request)
    for what, request in [
        ("empty body", _raw(CHAT, "")),
        ("not JSON", _raw(CHAT, "not json")),
        ("a JSON array", _raw(CHAT, "[1, 2]")),
        ("invalid UTF-8 bytes", (CHAT, b'{"model": "m", "messages": \xff\xfe}')),
        (
            "invalid UTF-8 in a string",
            (CHAT, b'{"messages": [{"role": "user", "content": "\xc3("}]}'),
        ),
        (
            "lone surrogate",
            _raw(CHAT, f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}'),
        ),
        ("messages a string", _with(CHAT, messages="hi")),
        ("no messages", _with(CHAT, messages=[])),
        ("unknown role", _with(CHAT, messages=[{"role": "robot", "content": "hi"}])),
        ("max_tokens 0", _with(CHAT, max_tokens=0)),
        ("max_tokens a string", _with(CHAT, max_tokens="5")),
        (
            "max_tokens 1e400",
            _raw(CHAT, '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}'),
        ),
        ("temperature 5", _with(CHAT, temperature=5)),
        ("temperature -1", _with(CHAT, temperature=-1)),
        (
            "temperature NaN",
            _raw(CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        ),
        ("top_p 0", _with(CHAT, top_p=0)),
        ("top_k -1", _with(CHAT, top_k=-1)),
        ("top_logprobs 100", _with(CHAT, logprobs=True, top_logprobs=100)),
        ("n 3", _with(CHAT, n=3)),
        ("empty stop string", _with(CHAT, stop=[""])),
        ("seed 1.5", _with(CHAT, seed=1.5)),
        ("strict tool, required 5", _with(CHAT, tools=[_tool({"type": "object", "required": 5})])),
        (
            "strict tool, properties a string",
            _with(CHAT, tools=[_tool({"type": "object", "properties": "x"})]),
        ),
        ("strict tool, type nonsense", _with(CHAT, tools=[_tool({"type": "nonsense"})])),
        ("strict tool nested deep", _with(CHAT, tools=[_tool(_deep_schema(100))])),
        (
            "forced tool, required 5",
            _with(CHAT, tools=[_tool({"required": 5}, False)], tool_choice="required"),
        ),
        (
            "tool_choice names no tool",
            _with(
                CHAT,
                tools=[_tool({}, False)],
                tool_choice={"type": "function", "function": {"name": "x"}},
            ),
        ),
        ("tool_choice required, no tools", _with(CHAT, tool_choice="required")),
        ("format schema type 5", _with(CHAT, response_format=_format({"type": 5}))),
        ("format schema a string", _with(CHAT, response_format=_format("x"))),
        ("format type yaml", _with(CHAT, response_format={"type": "yaml"})),
        ("format schema nested deep", _with(CHAT, response_format=_format(_deep_schema(100)))),
        ("messages nested deep", _nested(CHAT, "messages")),
        ("enable_thinking a string", _with(CHAT, chat_template_kwargs={"enable_thinking": "yes"})),
        (
            "image part",
            _with(
                CHAT,
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            ),
        ),
        ("token id past the vocabulary", _with(COMPLETIONS, prompt=[10**20])),
        ("prompt a number", _with(COMPLETIONS, prompt=5)),
        ("prompt a list of strings", _with(COMPLETIONS, prompt=["a", "b"])),
        ("echo with logprobs", _with(COMPLETIONS, echo=True, logprobs=2)),
        ("lone surrogate prompt", _raw(COMPLETIONS, f'{{"prompt": {SURROGATE}}}')),
        ("input a number", _with(RESPONSES, input=5)),
        ("previous_response_id", _with(RESPONSES, previous_response_id="resp_1")),
        (
            "text.format required 5",
            _with(
                RESPONSES,
                text={
                    "format": {
                        "type": JSON_SCHEMA,
                        "name": "a",
                        "schema": {"type": "object", "required": 5},
                    }
                },
            ),
        ),
        (
            "strict function, required 5",
            _with(
                RESPONSES,
                tools=[
                    {
                        "type": "function",
                        "name": "f",
                        "strict": True,
                        "parameters": {"type": "object", "required": 5},
                    }
                ],
            ),
        ),
        ("responses temperature 3", _with(RESPONSES, temperature=3)),
        ("unknown item type", _with(RESPONSES, input=[{"type": "bogus"}])),
        (
            "forged reasoning",
            _with(
                RESPONSES,
                input=[{"type": "reasoning", "summary": [], "encrypted_content": "AAAA.bad"}],
            ),
        ),
        ("input nested deep", _nested(RESPONSES, "input")),
        (
            "no max_tokens",
            _raw(MESSAGES, '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'),
        ),
        ("anthropic temperature 1.5", _with(MESSAGES, temperature=1.5)),
        (
            "strict tool input_schema required 5",
            _with(
                MESSAGES,
                tools=[
                    {"name": "f", "strict": True, "input_schema": {"type": "object", "required": 5}}
                ],
            ),
        ),
        (
            "output_config schema type 12",
            _with(
                MESSAGES, output_config={"format": {"type": JSON_SCHEMA, "schema": {"type": 12}}}
            ),
        ),
        (
            "image block",
            _with(
                MESSAGES, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]
            ),
        ),
        (
            "lone surrogate system",
            _raw(
                MESSAGES,
                '{"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], '
                f'"system": {SURROGATE}}}',
            ),
        ),
        (
            "tool_choice tool without a name",
            _with(
                MESSAGES, tools=[{"name": "f", "input_schema": {}}], tool_choice={"type": "tool"}
            ),
        ),
        ("mcp_servers", _with(MESSAGES, mcp_servers=[{}])),
        ("messages nested deep", _nested(MESSAGES, "messages")),
        ("count_tokens, no messages", _with(COUNT, messages=[])),
        ("count_tokens nested deep", _nested(COUNT, "messages")),
    ]
]


# -- kept requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kept:
    """A well-formed request: its API's path and body; `stream` asks for events."""

    path: str
    body: dict
    stream: bool


def kept_requests(max_tokens: int) -> Iterator[Kept]:
    """Each API in turn, streamed and whole, each request's prompt its own."""
    for i in itertools.count():
        text = f"request {i}: tell me about soaking things"
        user = [{"role": "user", "content": text}]
        stream = i // 4 % 2 == 0  # each API streamed every other time
        yield [
            Kept(CHAT, {"model": "m", "messages": user, "max_tokens": max_tokens}, stream),
            Kept(COMPLETIONS, {"model": "m", "prompt": text, "max_tokens": max_tokens}, stream),
            Kept(RESPONSES, {"model": "m", "input": text, "max_output_tokens": max_tokens}, stream),
            Kept(MESSAGES, {"model": "m", "messages": user, "max_tokens": max_tokens}, stream),
        ][i % 4]


def is_token(path: str, event: dict) -> bool:
    """Whether a streamed event carries generated text (not a keep-alive, not a preamble)."""
    if path == CHAT:
        delta = (event.get("choices") or [{}])[0].get("delta") or {}
        return bool(
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        )
    if path == COMPLETIONS:
        return bool((event.get("choices") or [{}])[0].get("text"))
    if path == RESPONSES:
        return event.get("type", "").endswith(".delta")
    delta = event.get("delta") or {}
    return event.get("type") == "content_block_delta" and bool(
        delta.get("text") or delta.get("thinking") or delta.get("partial_json")
    )


def is_end(path: str, event: dict | str) -> bool:
    """Whether a streamed event is the last of a complete answer."""
    if path in (CHAT, COMPLETIONS):
        return event == "[DONE]"
    if path == RESPONSES:
        return event.get("type") in ("response.completed", "response.incomplete")
    return event.get("type") == "message_stop"


def is_error(event: dict | str) -> bool:
    return isinstance(event, dict) and ("error" in event or event.get("type") == "error")


# -- the soak -----------------------------------------------------------------------------------


@dataclass
class Figures:
    requests: int = 0
    completed: int = 0
    disconnects: int = 0
    bad_inputs: int = 0
    refused: int = 0  # bad inputs answered with a 4xx
    server_errors: int = 0  # 5xx, or a stream that ended with an error event
    hangs: int = 0
    failures: list[str] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, what: str, hang: bool = False) -> None:
        with self.lock:
            self.failures.append(what)
            if hang:
                self.hangs += 1
            else:
                self.server_errors += 1

    def ok(self) -> bool:
        return not self.failures and self.refused == self.bad_inputs

    def percentile(self, q: float) -> float | None:
        times = sorted(self.first_token)
        if not times:
            return None
        return times[min(len(times) - 1, int(q * len(times)))]

    def summary(self, concurrency: int) -> str:
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        ttft = "n/a" if p50 is None else f"{p50:.3f} s / {p99:.3f} s"
        return (
            f"requests {self.requests}, concurrency {concurrency}, completed {self.completed}, "
            f"disconnects {self.disconnects}, bad inputs {self.bad_inputs} "
            f"(4xx {self.refused}), 5xx {self.server_errors}, hangs {self.hangs}, "
            f"time to first token p50/p99 {ttft}"
        )


def _bad(client: httpx.Client, url: str, figures: Figures, what: str, path: str, body: bytes):
    r = client.post(url + path, content=body, headers={"content-type": "application/json"})
    with figures.lock:
        figures.bad_inputs += 1
        figures.refused += 400 <= r.status_code < 500
    if r.status_code >= 500:
        figures.fail(f"{what}: {r.status_code} {r.text[:200]}")
    elif r.status_code < 400:
        with figures.lock:
            figures.failures.append(f"{what}: accepted ({r.status_code})")


Check = Callable[[str, bool, dict], None]


def _kept(
    client: httpx.Client, url: str, figures: Figures, kept: Kept, drop: bool, check: Check
) -> None:
    if not kept.stream:
        r = client.post(url + kept.path, json=kept.body)
        if r.status_code != 200:
            figures.fail(f"{kept.path}: {r.status_code} {r.text[:200]}")
            return
        check(kept.path, False, r.json())
        with figures.lock:
            figures.completed += 1
        return
    start = time.monotonic()
    got_token = False
    with client.stream("POST", url + kept.path, json={**kept.body, "stream": True}) as r:
        if r.status_code != 200:
            figures.fail(f"{kept.path} stream: {r.status_code} {r.read()[:200]!r}")
            return
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            text = line.removeprefix("data: ")
            event = text if text == "[DONE]" else json.loads(text)
            if is_error(event):
                figures.fail(f"{kept.path} stream: {text[:200]}")
                return
            if isinstance(event, dict):
                check(kept.path, True, event)
            if not got_token and isinstance(event, dict) and is_token(kept.path, event):
                got_token = True
                with figures.lock:
                    figures.first_token.append(time.monotonic() - start)
                if drop:  # hang up mid-stream
                    with figures.lock:
                        figures.disconnects += 1
                    return
            if is_end(kept.path, event):
                with figures.lock:
                    figures.completed += 1
                return
    figures.fail(f"{kept.path} stream: ended without its last event")


def run(
    url: str,
    *,
    concurrency: int,
    seconds: float | None = None,
    requests: int | None = None,
    max_tokens: int = 16,
    drop_every: int = 3,
    bad_every: int = 4,
    timeout: float = 60.0,
    check: Check = lambda path, streamed, data: None,
) -> Figures:
    """Fire requests at `url` from `concurrency` threads until `seconds` passed or `requests`
    were sent: every `bad_every`-th a malformed body (`BAD_BODIES` in turn), the others kept
    requests (`kept_requests`), every `drop_every`-th stream hung up at its first token.
    `check(path, streamed, data)` sees every answer and streamed event of the kept requests."""
    figures = Figures()
    deadline = time.monotonic() + seconds if seconds is not None else None
    counter = itertools.count()
    kept = kept_requests(max_tokens)
    bad = itertools.cycle(BAD_BODIES)
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    i = next(counter)
                    if (requests is not None and i >= requests) or (
                        deadline is not None and time.monotonic() > deadline
                    ):
                        return
                    job = next(bad) if i % bad_every == bad_every - 1 else next(kept)
                with figures.lock:
                    figures.requests += 1
                try:
                    if isinstance(job, Kept):
                        _kept(client, url, figures, job, i % drop_every == 0, check)
                    else:
                        _bad(client, url, figures, *job)
                except httpx.TimeoutException:
                    figures.fail(f"request {i}: no answer within {timeout} s", hang=True)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return figures


def _serve_demo(max_queue: int) -> str:
    import uvicorn

    from mlx_glm4moe.loading import load
    from mlx_glm4moe.server import create_app

    model, tokenizer = load(None)
    app = create_app(model, tokenizer, model_id="demo", max_queue=max_queue)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="A running server (default: the demo model, served here).")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--drop-every", type=int, default=3, help="Hang up every Nth stream.")
    p.add_argument("--bad-every", type=int, default=4, help="Every Nth request is malformed.")
    p.add_argument("--timeout", type=float, default=120.0, help="Seconds that make a hang.")
    a = p.parse_args(argv)
    url = a.url or _serve_demo(max_queue=max(64, a.concurrency))
    start = time.monotonic()
    figures = run(
        url,
        concurrency=a.concurrency,
        seconds=a.seconds,
        max_tokens=a.max_tokens,
        drop_every=a.drop_every,
        bad_every=a.bad_every,
        timeout=a.timeout,
    )
    health = httpx.get(f"{url}/health", timeout=10)
    print(figures.summary(a.concurrency))
    print(
        f"{time.monotonic() - start:.0f} s; /health afterwards: {health.status_code} {health.text}"
    )
    for failure in figures.failures[:20]:
        print("  failed:", failure)
    if not figures.ok() or health.status_code != 200:
        sys.exit(1)


if __name__ == "__main__":
    main()
