"""Drive the real coding agents (Claude Code, Codex, opencode, the OpenAI Agents SDK) against
`glm4moe-server` on a copy of the demo model with a 64K context, and print one line per client.

    PYTHONPATH=. python tools/agents_check.py [--only claude codex opencode agents-sdk]
        [--max-tokens 256] [--timeout 600] [--record DIR] [--turns N] [--keep] [--mtp]
        [--fixtures tests/fixtures]

Not in CI: it needs the clients installed (`npm i -g @anthropic-ai/claude-code @openai/codex
opencode-ai`, `pip install openai-agents`). A recording proxy on 127.0.0.1 sits between the clients
and the server: it saves every request body as the client sent it (`DIR/<client>/NNN.json`, the
server's error bodies as `NNN.error.txt`, its other replies, streams included, with the
seconds each chunk arrived at as `NNN.reply.txt`) and caps the completion length at
`--max-tokens`, inserting a cap where the body has none, because the demo model on a CPU is slow.
Each client gets its own temporary home and config, with telemetry and update checks off, so
nothing but loopback traffic goes out.

A line says `worked` (exit 0 with an answer), `answered` (the server replied but the client gave
up, e.g. on a reply the demo model's nonsense made unusable), `timed out`, or the client's error;
then the HTTP statuses the server gave that were not 2xx, and the client's version.
`--fixtures` writes trimmed copies of the recordings (tests/test_agent_fixtures.py replays them).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "mlx_glm4moe" / "default_model"
CONTEXT = 65536
PROMPT = "say hi"
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# The field a capped request gets when it names none, by endpoint.
DEFAULT_LENGTH_FIELD = {"/responses": "max_output_tokens", "/messages": "max_tokens"}
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
QUIET_ENV = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cap(path: str, body: dict, most: int) -> dict:
    """`body` with its completion length at most `most` (set when it names none)."""
    body = dict(body)
    named = [f for f in LENGTH_FIELDS if body.get(f) is not None]
    for f in named:
        body[f] = min(body[f], most)
    if not named:
        field = next((f for s, f in DEFAULT_LENGTH_FIELD.items() if path.endswith(s)), None)
        body[field or "max_tokens"] = most
    return body


class Recorder:
    """A reverse proxy that records request bodies under the current client's name and caps
    their completion length; clients run one at a time, so one current name suffices."""

    def __init__(self, upstream: str, record: Path, max_tokens: int):
        self.record, self.max_tokens = record, max_tokens
        self.client = "none"
        self.counts: collections.Counter[str] = collections.Counter()
        self.statuses: dict[str, list[int]] = collections.defaultdict(list)
        self.http = httpx.AsyncClient(base_url=upstream, timeout=None)
        self.app = Starlette(routes=[Route("/{path:path}", self.forward, methods=_METHODS)])

    async def forward(self, request: Request) -> Response:
        self.counts[self.client] += 1  # numbered on arrival: clients send requests in parallel
        number = self.counts[self.client]
        raw = await request.body()
        folder = self.record / self.client
        folder.mkdir(parents=True, exist_ok=True)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        stem = folder / f"{number:03d}"
        meta = {"method": request.method, "path": request.url.path, "query": request.url.query}
        if isinstance(body, dict):
            (stem.with_suffix(".json")).write_text(json.dumps(meta | {"body": body}, indent=1))
            if request.method == "POST":
                raw = json.dumps(cap(request.url.path, body, self.max_tokens)).encode()
        else:
            (stem.with_suffix(".json")).write_text(json.dumps(meta | {"raw": raw.decode()}))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream = self.http.build_request(
            request.method, request.url.path, params=request.url.query, headers=headers, content=raw
        )
        reply = await self.http.send(upstream, stream=True)
        self.statuses[self.client].append(reply.status_code)
        # Decoded bodies go on, so the encoding header goes.
        out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        out.pop("content-encoding", None)
        if reply.status_code >= 400:
            text = await reply.aread()
            await reply.aclose()
            stem.with_suffix(".error.txt").write_text(
                f"{reply.status_code}\n{text.decode(errors='replace')}\n"
            )
            return Response(text, reply.status_code, out)
        return StreamingResponse(
            self.tee(reply, stem.with_suffix(".reply.txt")),
            reply.status_code,
            out,
            background=BackgroundTask(reply.aclose),
        )

    @staticmethod
    async def tee(reply: httpx.Response, path: Path):
        """The reply's bytes as they come, each chunk also appended to `path` with the seconds
        since the request (a stalled stream shows as a gap)."""
        start = time.monotonic()
        with path.open("w") as f:
            async for chunk in reply.aiter_bytes():
                f.write(f"[{time.monotonic() - start:7.1f} s] {chunk.decode(errors='replace')}")
                f.flush()
                yield chunk


_METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]


def serve_in_thread(app) -> str:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def start_glm_server(model: Path, log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m mlx_glm4moe.server` (with `args`) on a free port, once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_glm4moe.server", "--model", str(model), "--port", str(port)]
    cmd += args
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server was not ready after 300 s; see {log}")


def stop_glm_server(proc: subprocess.Popen) -> None:
    """A clean shutdown (which writes the prompt cache to its folder, when it has one)."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=600)


def demo_copy(folder: Path) -> Path:
    """The demo model with a 64K context (the weights do not limit it: rope has no scaling)."""
    model = folder / "model"
    shutil.copytree(DEMO, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return model


# Each client: (command, extra environment) built in its own home folder against the proxy url.
def claude(home: Path, url: str) -> tuple[list[str], dict]:
    config = home / ".claude"
    config.mkdir()
    # Onboarding done and the project trusted, so nothing asks a question.
    trusted = {str(home): {"hasTrustDialogAccepted": True}}
    state = {"hasCompletedOnboarding": True, "projects": trusted}
    (home / ".claude.json").write_text(json.dumps(state))
    (config / ".claude.json").write_text(json.dumps(state))
    env = {
        "CLAUDE_CONFIG_DIR": str(config),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "dummy",
    }
    return ["claude", "-p", PROMPT], env


def codex(home: Path, url: str) -> tuple[list[str], dict]:
    codex_home = home / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        textwrap.dedent(f"""\
        model = "glm-4.5"
        model_provider = "glm4moe"
        check_for_update_on_startup = false

        [analytics]
        enabled = false

        [model_providers.glm4moe]
        name = "glm4moe"
        base_url = "{url}/v1"
        wire_api = "responses"
        env_key = "GLM4MOE_API_KEY"
        """)
    )
    cmd = ["codex", "exec", "--skip-git-repo-check", "--sandbox", "read-only", PROMPT]
    return cmd, {"CODEX_HOME": str(codex_home), "GLM4MOE_API_KEY": "dummy"}


def opencode(home: Path, url: str) -> tuple[list[str], dict]:
    config = {
        "$schema": "https://opencode.ai/config.json",
        "model": "glm4moe/glm-4.5",
        "autoupdate": False,
        "share": "disabled",
        "provider": {
            "glm4moe": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "glm4moe-server",
                "options": {"baseURL": f"{url}/v1", "apiKey": "dummy"},
                "models": {"glm-4.5": {"name": "GLM-4.5 (glm4moe-server)"}},
            }
        },
    }
    folder = home / ".config" / "opencode"
    folder.mkdir(parents=True)
    (folder / "opencode.json").write_text(json.dumps(config, indent=2))
    env = {
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        # opencode installs its plugin package with npm at start: reuse the user's npm cache.
        "npm_config_cache": str(Path.home() / ".npm"),
    }
    return ["opencode", "run", PROMPT], env


AGENTS_SDK_SCRIPT = """
import asyncio, os, sys
from pydantic import BaseModel
from openai import AsyncOpenAI
from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

set_tracing_disabled(True)

class Weather(BaseModel):
    city: str
    summary: str

@function_tool
def get_weather(city: str) -> str:
    \"\"\"Current weather in a city.\"\"\"
    return f"Sunny in {city}, 21 C."

client = AsyncOpenAI(base_url=os.environ["GLM4MOE_URL"] + "/v1", api_key="dummy")
agent = Agent(
    name="weather",
    instructions="Answer with the weather in the city the user names; use the tool.",
    model=OpenAIChatCompletionsModel(model="glm-4.5", openai_client=client),
    tools=[get_weather],
    output_type=Weather,
)
result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=3))
print(result.final_output)
"""


def agents_sdk(home: Path, url: str) -> tuple[list[str], dict]:
    return [sys.executable, "-c", AGENTS_SDK_SCRIPT], {"GLM4MOE_URL": url}


CLIENTS = {"claude": claude, "codex": codex, "opencode": opencode, "agents-sdk": agents_sdk}


def version(name: str) -> str | None:
    """The installed client's version, or None when it is not installed."""
    if name == "agents-sdk":
        try:
            return "openai-agents " + importlib.metadata.version("openai-agents")
        except importlib.metadata.PackageNotFoundError:
            return None
    if shutil.which(name) is None:
        return None
    done = subprocess.run([name, "--version"], capture_output=True, text=True, timeout=60)
    return (done.stdout.strip() or done.stderr.strip()).splitlines()[-1]


def trim(value, keep: int = 200):
    """Long texts cut to their first `keep` characters (the shape stays, the bulk goes)."""
    if isinstance(value, str) and len(value) > keep:
        return value[:keep] + f"…[{len(value)} chars]"
    if isinstance(value, list):
        return [trim(v, keep) for v in value]
    if isinstance(value, dict):
        return {k: trim(v, keep) for k, v in value.items()}
    return value


def fewer_tools(tools: list[dict], most: int = 3) -> list[dict]:
    """The first tool of each type, then the next ones up to `most`, in the client's order; a
    namespace keeps two of its functions."""
    chosen = list({t.get("type"): t for t in reversed(tools)}.values())
    chosen += [t for t in tools if t not in chosen][: max(0, most - len(chosen))]
    chosen.sort(key=tools.index)
    return [t | {"tools": t["tools"][:2]} if t.get("type") == "namespace" else t for t in chosen]


FIXTURES = {
    "claude": "agents_claude_code.json",
    "codex": "agents_codex.json",
    "opencode": "agents_opencode.json",
    "agents-sdk": "agents_sdk.json",
}


def write_fixture(record: Path, name: str, client_version: str, out: Path) -> Path:
    """The client's distinct JSON requests from `record`, trimmed, as a test fixture."""
    requests = []
    for path in sorted((record / name).glob("[0-9][0-9][0-9].json")):
        request = json.loads(path.read_text())
        if "body" not in request:
            continue
        body = request["body"]
        if "tools" in body:
            body = body | {"tools": fewer_tools(body["tools"])}
        request["body"] = trim(body)
        if request not in requests:  # retries repeat the same body
            requests.append(request)
    fixture = {"client": client_version, "requests": requests}
    out.mkdir(parents=True, exist_ok=True)
    target = out / FIXTURES[name]
    target.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    return target


def error_line(output: str) -> str:
    """The last line that names an error, else the last line (terminal colours taken out)."""
    output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def statuses_text(statuses: list[int]) -> str:
    bad = collections.Counter(s for s in statuses if s >= 300)
    if not bad:
        return f"HTTP errors: none ({len(statuses)} requests)"
    return "HTTP errors: " + ", ".join(f"{s}×{n}" for s, n in sorted(bad.items()))


# How a client goes on with its last session, for `--turns` (the others start afresh).
CONTINUE = {"claude": ["-p", "--continue"], "opencode": ["run", "--continue"]}


def run_client(
    name: str, recorder: Recorder, proxy: str, folder: Path, timeout: float, turns: int = 1
) -> str:
    """Run one client `turns` times (a session it goes on with, where it can) and judge the last
    run."""
    home = folder / name
    home.mkdir()
    cmd, env = CLIENTS[name](home, proxy)
    env = os.environ | QUIET_ENV | {"HOME": str(home)} | env
    recorder.client = name
    for turn in range(turns):
        if turn and name in CONTINUE:
            cmd = [cmd[0], *CONTINUE[name], PROMPT]
        line = _run(name, cmd, env, home, recorder, timeout)
    return line


def _run(
    name: str, cmd: list[str], env: dict, home: Path, recorder: Recorder, timeout: float
) -> str:
    # A session of its own, so that a timeout ends the client's helpers too (codex.js runs a
    # native binary, for one).
    proc = subprocess.Popen(
        cmd,
        cwd=home,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    (recorder.record / name).mkdir(parents=True, exist_ok=True)
    with (recorder.record / name / "client.log").open("a") as log:
        log.write(f"$ {' '.join(cmd)}\nexit {code}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    statuses, both = recorder.statuses[name], out + "\n" + err
    replied = any(200 <= s < 300 for s in statuses)
    if code == 0 and out.strip():
        verdict = "worked"
    elif code is None:
        verdict = f"timed out after {timeout:.0f} s (last: {error_line(both)})"
    elif replied:
        verdict = f"answered (exit {code}: {error_line(both)})"
    else:
        verdict = error_line(both)
    return f"{name:<11} {verdict} | {statuses_text(statuses)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CLIENTS), default=list(CLIENTS))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600, help="Seconds per client.")
    parser.add_argument("--record", type=Path, help="Save request bodies here (default: temp).")
    parser.add_argument("--keep", action="store_true", help="Leave the temporary folder.")
    parser.add_argument("--mtp", action="store_true", help="Serve with --mtp.")
    parser.add_argument(
        "--turns", type=int, default=1, help="Runs per client; Claude Code and opencode continue."
    )
    parser.add_argument(
        "--fixtures", type=Path, help="Write trimmed recordings here (tests/fixtures)."
    )
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="agents_check_"))
    record = (args.record or folder / "record").resolve()
    server = None
    try:
        model = demo_copy(folder)
        server, url = start_glm_server(model, folder / "server.log", *["--mtp"] * args.mtp)
        recorder = Recorder(url, record, args.max_tokens)
        proxy = serve_in_thread(recorder.app)
        print(f"server {url}, proxy {proxy}, recordings {record}", flush=True)
        for name in args.only:
            client_version = version(name)
            if client_version is None:
                print(f"{name:<11} not installed", flush=True)
                continue
            line = run_client(name, recorder, proxy, folder, args.timeout, args.turns)
            print(f"{line} | {client_version}", flush=True)
            if args.fixtures:
                write_fixture(record, name, client_version, args.fixtures)
    finally:
        if server is not None:
            stop_glm_server(server)
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
