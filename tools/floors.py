"""Version floors that hold: check that the mlx and mlx-lm versions pyproject.toml asks for at
least have everything the package uses from them.

`python tools/floors.py` downloads the floor versions' wheels (pip download, no install),
unpacks them into a temporary folder, and in a subprocess that imports them instead of the
installed ones: imports every module of the package, and checks every symbol the package names
(`mx.device_info`, `from mlx_lm.utils import infer_quant_config`, ...) and every keyword it passes
to them. When all hold, it records the versions and the symbols in `tests/floors.json`, which
`tests/test_floors.py` holds the code to (offline): a symbol used later that the floors were not
checked for fails there until this is run again.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_glm4moe"
RECORD = ROOT / "tests" / "floors.json"
MODULES = ("mlx", "mlx_lm")  # top-level modules whose symbols are checked
DISTS = {"mlx": "mlx", "mlx-lm": "mlx_lm"}


def floors(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{"mlx": version, "mlx-lm": version} from the `>=` requirements of pyproject.toml (every
    platform's `mlx` requirement must ask for the same floor)."""
    found: dict[str, set[str]] = {}
    for dist, version in re.findall(r'"(mlx-lm|mlx)(?:\[\w+\])?>=([\w.]+)', pyproject.read_text()):
        found.setdefault(dist, set()).add(version)
    if set(found) != set(DISTS) or any(len(v) != 1 for v in found.values()):
        raise ValueError(f"Expected one floor each for {sorted(DISTS)}, found {found}")
    return {dist: versions.pop() for dist, versions in found.items()}


def used_symbols(package: Path = PACKAGE) -> set[str]:
    """Every `mlx*`/`mlx_lm*` name the package's code refers to, dotted in full
    (`mlx.core.distributed.all_sum`), and `name(keyword)` for each keyword passed to one."""
    used = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        alias: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    root = a.name.split(".")[0]
                    if root in MODULES:  # `import mlx.core as mx` binds mx; `import mlx.core`, mlx
                        alias[a.asname or root] = a.name if a.asname else root
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODULES:
                for a in node.names:
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"
                    used.add(f"{node.module}.{a.name}")

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (name := _dotted(node, alias)):
                used.add(name)
            if isinstance(node, ast.Call) and (name := _dotted(node.func, alias)):
                used.update(f"{name}({k.arg})" for k in node.keywords if k.arg)
    return used


def _dotted(node: ast.AST, alias: dict[str, str]) -> str | None:
    """`mx.distributed.all_sum` → "mlx.core.distributed.all_sum", given `mx` → "mlx.core"."""
    if isinstance(node, ast.Name):
        return alias.get(node.id)
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value, alias)):
        return f"{base}.{node.attr}"
    return None


# Run with the floor versions first on sys.path: import the package, resolve every symbol.
CHECK = r"""
import importlib, inspect, json, pkgutil, sys
import mlx.core, mlx_lm
import mlx_glm4moe

print(json.dumps({"mlx": mlx.core.__version__, "mlx-lm": mlx_lm.__version__}))
for m in pkgutil.iter_modules(mlx_glm4moe.__path__):
    importlib.import_module(f"mlx_glm4moe.{m.name}")

def resolve(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)

def takes(obj, keyword):
    for f in (obj, getattr(obj, "__init__", None)):  # a C++ function or class: signature text
        if nb := getattr(f, "__nb_signature__", None):
            return any(f"{keyword}:" in s[0] or "**" in s[0] for s in nb)
    params = inspect.signature(obj).parameters.values()
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)

missing = []
for symbol in json.loads(sys.argv[1]):
    name, _, keyword = symbol.rstrip(")").partition("(")
    try:
        obj = resolve(name)
        if keyword and not takes(obj, keyword):
            missing.append(symbol)
    except (ImportError, AttributeError):
        missing.append(symbol)
print(json.dumps(missing))
"""


def verify(versions: dict[str, str], symbols: set[str]) -> list[str]:
    """The symbols missing from the given versions (downloaded, not installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        reqs = [f"mlx=={versions['mlx']}", f"mlx-lm=={versions['mlx-lm']}"]
        if sys.platform == "linux":
            reqs.append(f"mlx-cpu=={versions['mlx']}")  # the CPU backend of mlx[cpu]
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels)]
        subprocess.run([*pip, *reqs], check=True)
        for wheel in wheels.glob("*.whl"):
            zipfile.ZipFile(wheel).extractall(site)
        run = subprocess.run(
            [sys.executable, "-c", CHECK, json.dumps(sorted(symbols))],
            capture_output=True,
            text=True,
            cwd=tmp,
            env={"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin"},
        )
        if run.returncode:
            sys.exit(f"Importing the package under {versions} failed:\n{run.stderr[-3000:]}")
        got, missing = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
        if got != versions:
            sys.exit(f"Imported {got}, not the floors {versions}")
        return missing


def main() -> None:
    versions, symbols = floors(), used_symbols()
    missing = verify(versions, symbols)
    if missing:
        sys.exit(f"Missing from {versions}: {', '.join(missing)}. Raise the floors.")
    RECORD.write_text(json.dumps({**versions, "symbols": sorted(symbols)}, indent=1) + "\n")
    print(f"{len(symbols)} symbols hold in {versions}; recorded in {RECORD.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
