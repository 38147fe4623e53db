"""The mlx and mlx-lm floors in pyproject.toml were checked (by tools/floors.py, against the
floor versions themselves) for every symbol and keyword the package uses from them."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors)
RERUN = "run `python tools/floors.py` (it downloads the floor versions and checks them)"


def test_every_symbol_the_package_uses_was_checked_in_the_floor_versions():
    record = json.loads(floors.RECORD.read_text())
    checked = {dist: record[dist] for dist in floors.DISTS}
    assert floors.floors() == checked, f"pyproject.toml's floors were not the ones checked: {RERUN}"
    unchecked = sorted(floors.used_symbols() - set(record["symbols"]))
    assert not unchecked, f"Not checked against the floors {checked}: {unchecked}; {RERUN}"


def test_the_scan_sees_imports_attributes_and_keywords(tmp_path):
    (tmp_path / "m.py").write_text(
        "import mlx.core as mx\n"
        "import mlx_lm\n"
        "from mlx_lm.utils import load_tokenizer as lt\n"
        "import numpy as np\n"
        "y = mx.distributed.all_sum(x, group=g).shape\n"
        "lt(path, eos_token_ids=[1])\n"
        "mlx_lm.load(path)\n"
        "np.zeros(3, dtype=np.float32)\n"
    )
    assert floors.used_symbols(tmp_path) == {
        "mlx.core.distributed",
        "mlx.core.distributed.all_sum",
        "mlx.core.distributed.all_sum(group)",
        "mlx_lm.utils.load_tokenizer",
        "mlx_lm.utils.load_tokenizer(eos_token_ids)",
        "mlx_lm.load",
    }
