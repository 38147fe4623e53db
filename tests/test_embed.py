"""The server as an app's helper (`server.lifecycle`, `server.residency`, `server.embedded`): the
ready line, dying with its parent, stopping cleanly on SIGTERM, unloading and loading again,
memory limits, progress events. Servers run on loopback ports or Unix sockets in tmp folders,
on the bundled demo model; every child process is killed in a `finally`."""

import contextlib
import importlib.util
import json
import os
import plistlib
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from mlx_glm4moe import Server, load, upload
from mlx_glm4moe.cli import convert_main, upload_main
from mlx_glm4moe.server import lifecycle, memory
from mlx_glm4moe.streaming import resident_bytes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

# A server whose every token takes 20 ms and is never the stop token, for streams that are
# still running when the test stops the server; real signal handling (`lifecycle.run`).
SLOW_SERVER = """
import sys, time
import mlx.core as mx
from mlx_glm4moe import load
from mlx_glm4moe.server import create_app, lifecycle

def slow(job):
    def sample(logprobs):
        time.sleep(0.02)
        return mx.array([100])
    return sample

app = create_app(loader=load, sampler_factory=slow, max_tokens=1000)
sock = lifecycle.listen("127.0.0.1", 0)
grace = float(sys.argv[1])
sys.exit(lifecycle.run(app, sock, events=sys.stdout, ready={}, grace=grace, log_level="warning"))
"""


@contextlib.contextmanager
def child(args: list[str], **kw):
    """A process whose stdout lines arrive on `.lines` (a queue); killed on the way out."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, **kw
    )
    proc.lines = queue.Queue()

    def read():
        for line in proc.stdout:
            proc.lines.put(line)
        proc.lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def server_args(*flags: str) -> list[str]:
    return [sys.executable, "-m", "mlx_glm4moe.server", "--log-level", "warning", *flags]


def next_event(proc, timeout: float = 30) -> dict:
    line = proc.lines.get(timeout=timeout)
    assert line is not None, "the server's stdout ended"
    return json.loads(line)


def ready(proc) -> dict:
    """The ready event; every line before it must be a progress event."""
    while (event := next_event(proc))["event"] != "ready":
        assert event["event"] == "progress"
    return event


def gone(pid: int) -> bool:
    """The process has ended (a zombie left unreaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return condition()


# -- start and ready ----------------------------------------------------------------------------


def test_port_0_ready_line_progress_and_clean_exit(tmp_path):
    flags = ["--port", "0", "--progress", "json", "--prompt-cache-dir", str(tmp_path)]
    with child(server_args(*flags)) as proc:
        events = []
        while (event := next_event(proc))["event"] != "ready":
            events.append(event)
        assert event["pid"] == proc.pid and event["model"] == "glm4moe-demo"
        assert event["version"] and event["url"].startswith("http://127.0.0.1:")
        assert int(event["url"].rsplit(":", 1)[1]) != 0
        # Loading progress: bytes read, growing to the whole model.
        assert events and {e["stage"] for e in events} == {"load"}
        done = [e["done"] for e in events]
        assert done == sorted(done) and done[0] == 0 and done[-1] == events[-1]["total"] > 0
        health = httpx.get(f"{event['url']}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert httpx.post(f"{event['url']}/v1/chat/completions", json=CHAT).status_code == 200
        assert not list(tmp_path.rglob("*.safetensors"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.lines.get(timeout=5) is None  # nothing else on stdout
    assert list(tmp_path.rglob("*.safetensors"))  # the prompt cache, written at the end


def test_unix_socket_and_exit_on_stdin_close(tmp_path):
    path = tmp_path / "s.sock"
    args = server_args("--uds", str(path), "--exit-on-stdin-close")
    with child(args, stdin=subprocess.PIPE) as proc:
        assert ready(proc)["url"] == f"unix:{path}"
        assert path.stat().st_mode & 0o777 == 0o600  # only the user may connect
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as client:
            assert client.get("http://server/health").json()["status"] == "ok"
            r = client.post("http://server/v1/chat/completions", json=CHAT, timeout=30)
            assert r.status_code == 200
        proc.stdin.close()  # the app's end of the pipe
        assert proc.wait(timeout=5) == 0
    assert not path.exists()


def test_a_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path):
    path = tmp_path / "s.sock"
    live = lifecycle.listen("", 0, str(path))
    with pytest.raises(OSError, match="a server is listening"):
        lifecycle.listen("", 0, str(path))
    live.close()  # the file stays, as when a server dies
    lifecycle.listen("", 0, str(path)).close()


def test_health_is_503_loading_until_the_model_is_in(monkeypatch):
    gate = threading.Event()

    def progress(stage, done, total):
        gate.wait(20)

    server = Server(progress=progress)
    starter = threading.Thread(target=server.start)  # also: started off the main thread
    starter.start()
    try:
        assert wait_until(lambda: server.url is not None, 10)
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        gate.set()
        starter.join(20)
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert (health.status_code, health.json()["status"]) == (200, "ok")
    finally:
        gate.set()
        starter.join(20)
        server.stop()


def test_a_load_that_fails_is_an_error_not_a_ready_line(tmp_path):
    with pytest.raises(RuntimeError, match="No model folder at"):
        Server(tmp_path / "nothing").start()


def test_stop_while_loading_does_not_wait_for_the_load():
    gate = threading.Event()
    server = Server(progress=lambda *e: gate.wait(20))
    failed = []

    def start():
        try:
            server.start()
        except RuntimeError as e:
            failed.append(e)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        assert wait_until(lambda: server.app.state.engine.state == "loading", 10)
        start = time.monotonic()
        server.stop()
        starter.join(5)
        assert time.monotonic() - start < 2 and failed
    finally:
        gate.set()
        starter.join(20)


# -- dies with its app ----------------------------------------------------------------------------

PARENT = """
import subprocess, sys, time
server = subprocess.Popen(sys.argv[1:] + ["--parent-pid", str(__import__("os").getpid())])
print(server.pid, flush=True)
time.sleep(600)
"""


def test_server_ends_within_5_s_of_its_parent():
    with child([sys.executable, "-c", PARENT, *server_args("--port", "0")]) as parent:
        server_pid = int(parent.lines.get(timeout=30))
        try:
            ready(parent)  # the server's stdout is its parent's
            parent.kill()
            parent.wait()
            start = time.monotonic()
            assert wait_until(lambda: gone(server_pid), 5), "the server outlived its parent"
            assert time.monotonic() - start < 5
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)


# -- stops cleanly --------------------------------------------------------------------------------


def stream_chunks(url: str, max_tokens: int, chunks: list, first: threading.Event) -> None:
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    # A server that exits at once cuts the stream short.
    with contextlib.suppress(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()


@pytest.mark.parametrize("grace", [10.0, 0.3])
def test_sigterm_mid_stream(grace):
    """SIGTERM: new requests get 503; the answer in flight ends (within the grace) or is
    cancelled with an error (after it); exit 0."""
    with child([sys.executable, "-c", SLOW_SERVER, str(grace)]) as proc:
        url = ready(proc)["url"]
        chunks, first = [], threading.Event()
        reader = threading.Thread(target=stream_chunks, args=(url, 40, chunks, first))
        reader.start()
        assert first.wait(20)
        proc.send_signal(signal.SIGTERM)
        refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "The server is shutting down."
        assert httpx.get(f"{url}/health").json()["status"] == "stopping"
        reader.join(20)
        assert proc.wait(timeout=10) == 0
    assert chunks[-1] == "[DONE]"
    if grace > 1:  # 40 tokens take 0.8 s: the answer ends
        usage, last = json.loads(chunks[-2]), json.loads(chunks[-3])
        assert last["choices"][0]["finish_reason"] == "length"
        assert usage["usage"]["completion_tokens"] == 40
    else:
        error = json.loads(chunks[-2])
        assert error["error"]["message"] == "The server shut down before the answer ended."


def test_second_sigterm_exits_at_once():
    with child([sys.executable, "-c", SLOW_SERVER, "10"]) as proc:
        url = ready(proc)["url"]
        chunks, first = [], threading.Event()
        threading.Thread(target=stream_chunks, args=(url, 1000, chunks, first), daemon=True).start()
        assert first.wait(20)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=2) == 1


# -- gives memory back ----------------------------------------------------------------------------


def test_unload_gives_memory_back_and_the_next_request_loads_again():
    mx.set_default_device(mx.cpu)
    with Server() as server:
        engine = server.app.state.engine
        model_bytes = resident_bytes(engine.model)
        httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
        before = memory.figures()
        r = httpx.post(f"{server.url}/v1/unload", timeout=30)
        after = r.json()["memory"]
        assert r.status_code == 200 and r.json()["status"] == "unloaded"
        assert after["active"] <= before["active"] - model_bytes
        # The engine thread's MLX random key (8 bytes, thread-local) is freed when the thread
        # exits, which can come just after the join and the cache clear: allow that one.
        assert before["cache"] > 1024 and after["cache"] <= 8
        assert httpx.get(f"{server.url}/health").json()["status"] == "unloaded"
        r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200 and engine.loads == 2
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "glm4moe_requests_total 2" in metrics  # counted across the unload
        assert f"glm4moe_mlx_active_memory_bytes {mx.get_active_memory()}" in metrics


def test_requests_that_arrive_together_trigger_one_load():
    gate, loads = threading.Event(), []

    def progress(stage, done, total):
        if done == 0:
            loads.append(stage)
            gate.wait(20)

    gate.set()
    with Server(progress=progress) as server:
        httpx.post(f"{server.url}/v1/unload", timeout=30)
        gate.clear()
        answers = []

        def ask():
            r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
            answers.append(r.status_code)

        askers = [threading.Thread(target=ask) for _ in range(2)]
        for t in askers:
            t.start()
        assert wait_until(lambda: server.app.state.engine.state == "loading", 10)
        health = httpx.get(f"{server.url}/health")
        assert (health.status_code, health.json()["status"]) == (503, "loading")
        time.sleep(0.3)  # the second request is waiting for the same load
        gate.set()
        for t in askers:
            t.join(30)
        assert answers == [200, 200]
        assert loads == ["load", "load"]  # the first start, then one for both
        assert server.app.state.engine.loads == 2


def test_keep_alive_unloads_when_idle():
    with Server(keep_alive=0.3) as server:
        engine = server.app.state.engine
        r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200 and engine.state == "ok"
        assert wait_until(lambda: engine.state == "unloaded", 3)
        assert httpx.post(f"{server.url}/v1/load", timeout=30).json()["status"] == "ok"
        assert engine.loads == 2


def test_keep_alive_0_unloads_after_each_request_but_not_during_one():
    with Server(keep_alive=0) as server:
        engine = server.app.state.engine
        assert wait_until(lambda: engine.state == "unloaded", 3)
        body = {**CHAT, "max_tokens": 30, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            for _ in r.iter_lines():
                assert engine.loaded  # held while the answer streams
        assert wait_until(lambda: engine.state == "unloaded", 3)
        assert engine.loads == 2


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("5m", 300),
        ("30s", 30),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("0", 0),
        ("45", 45),
        ("-1", None),
    ],
)
def test_keep_alive_durations(text, seconds):
    assert lifecycle.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "m", "5x", ""])
def test_bad_keep_alive(text):
    with pytest.raises(ValueError):
        lifecycle.parse_duration(text)


# -- memory budget --------------------------------------------------------------------------------

GB = 1 << 30


def test_memory_and_cache_limits_are_set():
    # MLX reads a limit back only by setting another: the old ones, while 1 TB stands in.
    old_memory, old_cache = mx.set_memory_limit(1 << 40), mx.set_cache_limit(1 << 40)
    try:
        memory.set_limits(memory_gb=1.5, cache_gb=0.25)
        assert mx.set_memory_limit(old_memory) == int(1.5 * GB)
        assert mx.set_cache_limit(old_cache) == GB // 4
    finally:
        mx.set_memory_limit(old_memory)
        mx.set_cache_limit(old_cache)


@pytest.mark.parametrize(
    "model, ram, recommended, wired",
    [
        (20 * GB, 16 * GB, None, 12 * GB),  # a model past the Mac: a quarter of RAM stays free
        (10 * GB, 16 * GB, None, 12 * GB),  # 10 GB + 10 % + 1 GB is past the 12 GB allowed
        (8 * GB, 16 * GB, None, int(8.8 * GB) + GB),  # the model plus headroom
        (4 * GB, 8 * GB, None, 4 * GB),  # at least 4 GB stay free
        (100 * GB, 128 * GB, 96 * GB, 96 * GB),  # never past Metal's recommended working set
    ],
)
def test_auto_wired_limit(model, ram, recommended, wired):
    assert memory.auto_wired(model, ram, recommended) == wired


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal wires memory")
def test_wired_limit_is_a_no_op_without_metal():
    assert memory.set_wired("auto", 10 * GB) == 0


@pytest.mark.skipif(not mx.metal.is_available(), reason="only Metal wires memory")
def test_wired_limit_on_metal():
    try:
        assert memory.set_wired("1", 0) == GB and mx.set_wired_limit(0) == GB
        wired = memory.set_wired("auto", GB)
        assert 0 < wired <= 2.1 * GB and mx.set_wired_limit(0) == wired
    finally:
        mx.set_wired_limit(0)


# -- the Python side -------------------------------------------------------------------------------


def test_load_reports_progress_layer_by_layer():
    events = []
    model, _ = load(progress=lambda *e: events.append(e))
    total = resident_bytes(model)
    assert events[0] == ("load", 0, total) and events[-1] == ("load", total, total)
    assert len(events) > 3 and [d for _, d, _ in events] == sorted(d for _, d, _ in events)


def test_server_with_a_model_loaded_on_another_thread(tmp_path):
    """A model loaded here, served from the server's threads, over a Unix socket."""
    model, tokenizer = load()
    with Server(model, tokenizer, uds=tmp_path / "s.sock") as server:
        assert server.url == f"unix:{tmp_path / 's.sock'}"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "s.sock"))) as c:
            assert c.post("http://x/v1/chat/completions", json=CHAT).status_code == 200
            assert c.post("http://x/v1/unload").status_code == 409  # nothing to load it again
    assert not (tmp_path / "s.sock").exists()


# -- progress --------------------------------------------------------------------------------------


class FakeHub:
    def __init__(self, *args, **kw):
        pass

    def whoami(self):
        return {"auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, **kw):
        pass

    upload_folder = upload_file = create_repo


def test_convert_and_upload_print_ndjson_progress(air_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(upload, "HfApi", FakeHub)

    def snapshot_download(repo_id, tqdm_class, **kw):
        files = tqdm_class(total=2)
        files.update(1)
        files.update(1)
        return str(air_checkpoint)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    out = tmp_path / "out"
    flags = ["--hf-path", "zai-org/tiny", "--mlx-path", str(out), "--upload-repo", "me/tiny"]
    convert_main([*flags, "--progress", "json"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {e["event"] for e in events} == {"progress"}
    stages = {}
    for e in events:
        stages.setdefault(e["stage"], []).append((e["done"], e["total"]))
    assert list(stages) == ["download", "convert", "upload"]
    assert stages["download"] == [(1, 2), (2, 2)]
    layers = len(stages["convert"])
    assert stages["convert"] == [(i, layers) for i in range(1, layers + 1)] and layers > 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert stages["upload"] == [(0, size), (size, size)]
    upload_main(["--mlx-path", str(out), "--upload-repo", "me/tiny", "--progress", "json"])
    assert capsys.readouterr().out.splitlines() == [
        json.dumps({"event": "progress", "stage": "upload", "done": d, "total": size})
        for d in (0, size)
    ]


# -- shipping it in a .app (tools/macos_bundle.py; codesign and notarization need a Mac) ----------

_spec = importlib.util.spec_from_file_location("macos_bundle", ROOT / "tools" / "macos_bundle.py")
bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundle)
MACHO = bytes.fromhex("cffaedfe") + bytes(12)  # a 64-bit Mach-O header's first bytes


def fake_runtime(root: Path) -> Path:
    """python-build-standalone's install_only layout, its Mach-O files reduced to headers."""
    for name in ("bin/python3.12", "lib/libpython3.12.dylib", "lib/python3.12/lib-dynload/_ssl.so"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(MACHO)
    (root / "bin/python3").symlink_to("python3.12")
    (root / "lib/python3.12/os.py").write_text("")
    (root / "lib/python3.12/site-packages").mkdir()
    return root


def test_bundle_layout_metallib_and_signing_order(tmp_path):
    app = tmp_path / "My.app"
    root = bundle.copy_runtime(fake_runtime(tmp_path / "python"), app)
    assert root == app / "Contents/Frameworks/glm4moe-python"
    assert (root / "bin/python3").is_symlink()
    site = bundle.site_packages(root)
    # What pip installs from the mlx and mlx-metal wheels.
    (site / "mlx/lib").mkdir(parents=True)
    (site / "mlx/core.cpython-312-darwin.so").write_bytes(MACHO)
    (site / "mlx/lib/libmlx.dylib").write_bytes(MACHO)
    with pytest.raises(SystemExit, match="mlx.metallib: MLX would find no GPU kernels"):
        bundle.check_metallib(site)
    (site / "mlx/lib/mlx.metallib").write_bytes(b"MTLB")
    assert bundle.check_metallib(site) == site / "mlx/lib/mlx.metallib"

    plists = tmp_path / "app.plist", tmp_path / "helper.plist"
    commands = bundle.sign_commands(app, "Developer ID Application: Me", *plists)
    signed = [Path(c[-1]) for c in commands]
    assert signed[-1] == app and len(signed) == 6  # 5 Mach-O files, no symlink, no .py
    depth = [len(p.parts) for p in signed[:-1]]
    assert depth == sorted(depth, reverse=True)  # inside out
    assert all(
        c[:6] == ["codesign", "--force", "--timestamp", "--options", "runtime", "--sign"]
        for c in commands
    )
    entitled = {
        Path(c[-1]).name: c[c.index("--entitlements") + 1]
        for c in commands
        if "--entitlements" in c
    }
    assert entitled == {"python3.12": str(plists[1]), "My.app": str(plists[0])}

    app_ent, helper_ent = bundle.entitlements(sandboxed=True)
    assert helper_ent == {
        "com.apple.security.app-sandbox": True,
        "com.apple.security.inherit": True,
    }
    assert app_ent["com.apple.security.network.server"] is True
    assert bundle.entitlements(sandboxed=False) == ({}, {})


def test_ready_line_handshake_over_a_unix_socket():
    ready = bundle.handshake(Path(sys.executable))
    assert ready["url"].startswith("unix:") and ready["health"]["status"] == "ok"


@pytest.mark.skipif(sys.platform == "darwin", reason="on a Mac, codesign would run")
def test_bundle_command_line_prints_what_it_cannot_run(tmp_path, monkeypatch, capsys):
    def install(root, packages):  # pip, for macOS wheels, needs the network
        lib = bundle.site_packages(root) / "mlx/lib"
        lib.mkdir(parents=True)
        (lib / "libmlx.dylib").write_bytes(MACHO)
        (lib / "mlx.metallib").write_bytes(b"MTLB")

    monkeypatch.setattr(bundle, "install", install)
    app = tmp_path / "My.app"
    runtime = fake_runtime(tmp_path / "python")
    bundle.main(["--app", str(app), "--runtime", str(runtime), "--sign", "Me", "--sandboxed"])
    out = capsys.readouterr().out
    assert "codesign runs only on macOS: the commands above were not run" in out
    assert out.count("codesign --force") == 5 and "notarytool submit" in out  # 4 files, the app
    helper = plistlib.loads((tmp_path / "My.helper.entitlements").read_bytes())
    assert helper == bundle.entitlements(sandboxed=True)[1]
