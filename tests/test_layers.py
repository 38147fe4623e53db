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
    {"model", "weights", "parsers", "anthropic_api"},
    {"recipes", "synthetic", "streaming", "distributed", "upload"},
    {"loading", "convert"},
    {"mtp"},
    {"generate"},
    {"chat", "batch"},
    {"server", "cli", "bench", "evaluate"},
]
FLOOR = {name: i for i, floor in enumerate(FLOORS) for name in floor}


def our_imports(path: Path) -> set[str]:
    """The package modules that `path` imports (relative or absolute), anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("mlx_glm4moe."):
                found.add(node.module.split(".")[1])
            elif node.module == "mlx_glm4moe":
                found.update(a.name for a in node.names if a.name in FLOOR)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("mlx_glm4moe.")
            )
    return found


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_floor():
    assert set(modules()) == set(FLOOR), "place new modules in FLOORS"


@pytest.mark.parametrize("name", modules())
def test_imports_point_down(name):
    upward = {m: FLOOR[m] for m in our_imports(PACKAGE / f"{name}.py") if FLOOR[m] >= FLOOR[name]}
    assert not upward, f"{name} (floor {FLOOR[name]}) imports from its floor or above: {upward}"


def test_the_checker_sees_every_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "from .model import Model\nfrom . import chat, weights\n"
        "def g():\n    from mlx_glm4moe.server import create_app\n"
        "import mlx_glm4moe.cli\nfrom mlx_glm4moe import generate\n"
    )
    assert our_imports(f) == {"model", "chat", "weights", "server", "cli", "generate"}


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
