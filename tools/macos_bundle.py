"""Put the server into a macOS app as a helper: a relocatable Python with the package installed,
`mlx.metallib` checked, every Mach-O signed inside out with the hardened runtime.

    python tools/macos_bundle.py --app MyApp.app --runtime python/ \\
        --sign "Developer ID Application: Me (TEAMID)" [--sandboxed]

1. `--runtime` is a relocatable CPython for macOS arm64: python-build-standalone's
   ``cpython-3.12.*-aarch64-apple-darwin-install_only.tar.gz`` unpacked (its ``python/``
   folder), or what ``uv python install 3.12`` puts under ``uv python dir``. It is copied to
   ``MyApp.app/Contents/Frameworks/glm4moe-python``: code belongs under Contents/Frameworks,
   not Resources, for codesign.
2. pip installs mlx-glm4moe (or `--package`, e.g. a wheel you built) and its dependencies into
   that Python's site-packages, as wheels only, tagged for `MACOS_MIN` on arm64: the oldest
   macOS the mlx-metal wheels are built for, so the app runs wherever MLX does.
3. `mlx/lib/mlx.metallib` (MLX's GPU kernels, from the mlx-metal wheel) must sit beside
   `libmlx.dylib`, where MLX looks for it; bundlers that collect only Python files drop it, and
   MLX then fails at its first GPU operation.
4. Entitlements: a sandboxed app's helper gets exactly ``app-sandbox`` and ``inherit`` (it
   inherits the app's sandbox); the app gets ``network.server`` (the helper listens on a port;
   a Unix socket in the app group's container needs neither) and ``network.client``.
5. codesign, deepest file first (a bundle is signed after what it holds), with
   ``--options runtime``; the Python executables carry the helper's entitlements, the app its
   own. codesign and notarization run only on macOS: elsewhere this prints the commands.

`--check` then starts the bundled server on a Unix socket and waits for its ready line (the
handshake the app does). Notarize with ``xcrun notarytool submit MyApp.zip --keychain-profile
PROFILE --wait`` and ``xcrun stapler staple MyApp.app`` (printed, not run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import plistlib
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

HELPER = Path("Contents/Frameworks/glm4moe-python")
MACOS_MIN = "14.0"  # mlx-metal's wheels: macosx_14_0_arm64
MACHO_MAGIC = {
    bytes.fromhex(m) for m in ("cffaedfe", "cefaedfe", "feedfacf", "feedface", "cafebabe")
}


def copy_runtime(runtime: Path, app: Path) -> Path:
    """Copy the relocatable Python into the app; returns its folder there."""
    if not (runtime / "bin" / "python3").exists():
        raise SystemExit(f"error: {runtime} is not a Python install (no bin/python3)")
    root = app / HELPER
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(runtime, root, symlinks=True)
    return root


def site_packages(root: Path) -> Path:
    [found] = root.glob("lib/python3.*/site-packages")
    return found


def install(root: Path, packages: list[str]) -> None:
    """pip-install `packages` into the bundled Python, wheels for macOS `MACOS_MIN` arm64."""
    version = site_packages(root).parent.name.removeprefix("python")
    tag = f"macosx_{MACOS_MIN.replace('.', '_')}_arm64"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--upgrade", "--target", site_packages(root)]
        + ["--platform", tag, "--python-version", version, "--implementation", "cp"]
        + ["--only-binary=:all:", *packages],
        check=True,
    )


def check_metallib(site: Path) -> Path:
    """The path of mlx.metallib beside libmlx.dylib; SystemExit when it is missing."""
    lib = site / "mlx" / "lib"
    metallib = lib / "mlx.metallib"
    if not (lib / "libmlx.dylib").is_file():
        raise SystemExit(f"error: no {lib / 'libmlx.dylib'}: is the mlx-metal wheel installed?")
    if not metallib.is_file() or metallib.stat().st_size == 0:
        raise SystemExit(f"error: no {metallib}: MLX would find no GPU kernels")
    return metallib


def is_macho(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) in MACHO_MAGIC


def signing_order(app: Path) -> list[Path]:
    """Every Mach-O file of the helper, deepest first, then the app: inside out."""
    root = app / HELPER
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and is_macho(p)]
    return sorted(files, key=lambda p: (-len(p.parts), str(p))) + [app]


def entitlements(sandboxed: bool) -> tuple[dict, dict]:
    """(the app's, the helper's)."""
    if not sandboxed:
        return {}, {}
    app = {
        "com.apple.security.app-sandbox": True,
        "com.apple.security.network.client": True,
        "com.apple.security.network.server": True,
    }
    helper = {"com.apple.security.app-sandbox": True, "com.apple.security.inherit": True}
    return app, helper


def sign_commands(app: Path, identity: str, app_plist: Path, helper_plist: Path) -> list[list[str]]:
    """The codesign commands, in order (`signing_order`)."""
    commands = []
    for path in signing_order(app):
        command = ["codesign", "--force", "--timestamp", "--options", "runtime", "--sign", identity]
        if path == app:
            command += ["--entitlements", str(app_plist)]
        elif path.parent.name == "bin":
            command += ["--entitlements", str(helper_plist)]
        commands.append(command + [str(path)])
    return commands


def handshake(python: Path, model: str | None = None, timeout: float = 60) -> dict:
    """Start ``python -m mlx_glm4moe.server`` on a Unix socket as an app does, read its ready
    line, ask ``/health`` over the socket, stop it by closing its stdin. Returns the ready event
    with the health answer under "health"."""
    folder = Path(tempfile.mkdtemp(prefix="glm4moe-"))
    sock = folder / "s.sock"
    args = [python, "-m", "mlx_glm4moe.server", "--uds", sock, "--parent-pid", str(os.getpid())]
    args += ["--exit-on-stdin-close", "--log-level", "warning"]
    args += ["--model", model] if model else []
    # No .pyc files written into the signed bundle: they would break its seal.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        ready = json.loads(lines.get(timeout=timeout) or "{}")
        if ready.get("event") != "ready":
            raise SystemExit(f"error: the server did not start (exit status {proc.wait(timeout)})")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=timeout) as c:
            ready["health"] = c.get("http://helper/health").json()
        proc.stdin.close()
        proc.wait(timeout)
        return ready
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--app", type=Path, required=True, help="The .app bundle to put the helper in.")
    p.add_argument("--runtime", type=Path, required=True, help="A relocatable Python (see above).")
    p.add_argument("--package", action="append", help="What to install (default: mlx-glm4moe).")
    p.add_argument("--sign", metavar="IDENTITY", help="codesign identity (default: no signing).")
    p.add_argument("--sandboxed", action="store_true", help="The app runs in the App Sandbox.")
    p.add_argument("--check", action="store_true", help="Start the bundled server once.")
    a = p.parse_args(argv)
    root = copy_runtime(a.runtime, a.app)
    install(root, a.package or ["mlx-glm4moe"])
    print(f"mlx.metallib: {check_metallib(site_packages(root))}")
    if a.sign:
        app_ent, helper_ent = entitlements(a.sandboxed)
        plists = [a.app.parent / f"{a.app.stem}.{who}.entitlements" for who in ("app", "helper")]
        for path, content in zip(plists, (app_ent, helper_ent), strict=True):
            path.write_bytes(plistlib.dumps(content))
        commands = sign_commands(a.app, a.sign, *plists)
        on_mac = platform.system() == "Darwin"
        for command in commands:
            print(" ".join(command))
            if on_mac:
                subprocess.run(command, check=True)
        if not on_mac:
            print("codesign runs only on macOS: the commands above were not run")
    print(f"notarize: ditto -c -k --keepParent {a.app} app.zip && xcrun notarytool submit app.zip")
    print(f"  --keychain-profile PROFILE --wait && xcrun stapler staple {a.app}")
    if a.check:
        print(handshake(root / "bin" / "python3"))


if __name__ == "__main__":
    main()
