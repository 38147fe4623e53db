"""The package's import floors: a module imports only modules on lower floors, so data flows one
way (files → weights → model → decoding → chat → command lines and servers) and no import closes a
circle. Imports inside functions count: they are dependencies all the same."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_glm4moe"
FLOORS = [
    {"progress"},
    {"models", "weights", "parsers"},
    {"recipes", "synthetic", "streaming", "distributed", "upload", "constrain", "thinking"},
    {"loading", "convert", "prefill"},
    {"mtp"},
    {"generate", "prompt_cache", "mtp_batch"},
    {"chat", "batch"},
    {"server", "cli", "bench", "evaluate"},
]
FLOOR = {name: i for i, floor in enumerate(FLOORS) for name in floor}
# Subpackages keep the same rule among their own modules: in the server, the shared core sits
# under the API modules, and they under the app that mounts them.
SUBFLOORS = {
    # responses reuses anthropic's reasoning signature.
    # residency swaps the core's engine in and out; lifecycle runs the app that mounts it all.
    "server": [
        {"core", "memory"},
        {"openai", "anthropic", "residency"},
        {"responses", "lifecycle"},
        {"app"},
        {"embedded"},
        {"__init__", "__main__"},
    ],
    # The shared parts under the architectures, and the registry over them.
    "models": [{"base"}, {"mla"}, {"glm4_moe", "glm4_moe_lite", "glm_moe_dsa"}, {"__init__"}],
}
SUBFLOOR = {
    (pkg, name): i for pkg, floors in SUBFLOORS.items() for i, f in enumerate(floors) for name in f
}


def our_imports(path: Path, package: str | None = None) -> set[str]:
    """The package modules that `path` imports (relative or absolute), anywhere in the file:
    top-level modules by name, modules of `path`'s own subpackage `package` as "package.name"."""

    def named(parts: list[str]) -> str:
        return ".".join(parts[:2]) if parts[0] == package and len(parts) > 1 else parts[0]

    base = [package] if package else []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: .x from a subpackage is its sibling, ..x a top module
                where = base[: len(base) - node.level + 1]
                if node.module:
                    found.add(named(where + node.module.split(".")))
                else:
                    found.update(named(where + [a.name]) for a in node.names)
            elif node.module and node.module.startswith("mlx_glm4moe."):
                found.add(named(node.module.split(".")[1:]))
            elif node.module == "mlx_glm4moe":
                found.update(a.name for a in node.names if a.name in FLOOR)
        elif isinstance(node, ast.Import):
            found.update(
                named(a.name.split(".")[1:])
                for a in node.names
                if a.name.startswith("mlx_glm4moe.")
            )
    return found


def modules() -> list[str]:
    top = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    sub = [f"{pkg}/{p.stem}" for pkg in SUBFLOORS for p in (PACKAGE / pkg).glob("*.py")]
    return sorted(top + sub)


def test_every_module_has_a_floor():
    top = {m for m in modules() if "/" not in m} | set(SUBFLOORS)
    assert top == set(FLOOR), "place new modules in FLOORS"
    sub = {tuple(m.split("/")) for m in modules() if "/" in m}
    assert sub == set(SUBFLOOR), "place new subpackage modules in SUBFLOORS"


@pytest.mark.parametrize("name", modules())
def test_imports_point_down(name):
    package, _, stem = name.rpartition("/")
    owner = package or name
    imports = our_imports(PACKAGE / f"{name}.py", package or None)
    upward = {m: FLOOR[m] for m in imports if "." not in m and FLOOR[m] >= FLOOR[owner]}
    if package:
        mine = SUBFLOOR[package, stem]
        upward |= {
            m: SUBFLOOR[tuple(m.split("."))]
            for m in imports
            if "." in m and SUBFLOOR[tuple(m.split("."))] >= mine
        }
        upward.pop(package, None)  # `from . import x` names the package's own modules
    assert not upward, f"{name} imports from its floor or above: {upward}"


def test_the_checker_sees_every_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "from .model import Model\nfrom . import chat, weights\n"
        "def g():\n    from mlx_glm4moe.server import create_app\n"
        "import mlx_glm4moe.cli\nfrom mlx_glm4moe import generate\n"
    )
    assert our_imports(f) == {"model", "chat", "weights", "server", "cli", "generate"}
    f.write_text(
        "from .core import Job\nfrom . import openai\nfrom ..chat import Reply\n"
        "from .. import model\nimport mlx_glm4moe.server.app\n"
    )
    assert our_imports(f, "server") == {
        "server.core",
        "server.openai",
        "chat",
        "model",
        "server.app",
    }


@pytest.mark.parametrize(
    "command", [["bench"], ["bench", "mtp"], ["bench", "streaming"], ["evaluate"], ["server"]]
)
def test_entry_points_run_without_runpy_warning(command):
    """`python -m mlx_glm4moe.X` warns when the package's own import already loaded X."""
    module, *sub = command
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", f"mlx_glm4moe.{module}", *sub]
        + ["--help"],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "RuntimeWarning" not in out.stderr
