"""The GPU code path on the CPU: `activations="native"` runs the weights' dtype (bfloat16 here)
with no CPU-only staging, as a Mac does. Checked against mlx-lm's `glm4_moe` on the same files,
and for the properties the float32 tests prove: MTP equals plain greedy, streaming equals
resident. (Tensor and pipeline parallelism on native: tests/test_distributed.py.)"""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_glm4moe import load
from mlx_glm4moe.models import activation_dtype

# The GPU's code path, to the bit on MLX's CPU kernels (see conftest's `cpu`).
pytestmark = pytest.mark.usefixtures("cpu")

PROMPT = mx.array(np.random.default_rng(0).integers(0, 380, 80), dtype=mx.uint32)


def experts_in_float32(model):
    """MLX's CPU gather_mm takes float32 only: give mlx-lm's unquantized experts the float32
    copies our loader gives ours (bfloat16 activations are widened inside gather_mm)."""
    for _, m in model.named_modules():
        if isinstance(m, SwitchLinear):
            m.weight = m.weight.astype(mx.float32)


def test_activation_modes():
    assert activation_dtype("float32") == mx.float32
    assert activation_dtype("native") is None
    assert activation_dtype("auto") == (mx.float32 if mx.default_device() == mx.cpu else None)
    with pytest.raises(ValueError, match="activations must be one of"):
        load(activations="half")


def compare_with_mlx_lm(path, check):
    """An 80-token prefill (160 (token, expert) pairs: SwitchGLU's sorted path), then 6 greedy
    decode steps (unsorted), each fed to both models; `check(ours, theirs)` on every pass."""
    ours, _ = load(path, activations="native")
    theirs, _ = mlx_lm.load(str(path))
    experts_in_float32(theirs)
    ours_cache, theirs_cache = ours.make_cache(), make_prompt_cache(theirs)
    inputs = PROMPT[None]
    for _ in range(7):
        a, b = ours(inputs, cache=ours_cache), theirs(inputs, cache=theirs_cache)
        assert a.dtype == mx.bfloat16
        check(a, b)
        inputs = b[:, -1:].argmax(-1)


def test_4bit_logits_equal_mlx_lm_to_the_bit(air_bf16_q4):
    """4-bit weights with bfloat16 scales: ours and mlx-lm run the same bfloat16 arithmetic, so
    prefill and decode logits are identical. (On the CPU's default float32 activations ours
    differs from mlx-lm by float32 rounding instead; see test_bench.)"""

    def check(a, b):
        assert mx.array_equal(a, b).item(), float(mx.abs(a - b).max())

    compare_with_mlx_lm(air_bf16_q4, check)


def test_bf16_logits_match_mlx_lm(air_bf16):
    """Unquantized bfloat16 weights: MLX's CPU gather_mm takes float32 only, so both hold the
    experts in float32 and widen the activations into them; mlx-lm then keeps the float32 result
    while ours rounds it back to bfloat16 (as on a GPU). Not bit-exact: logits (magnitude ~4)
    agree to a few bfloat16 steps (0.016 each there), and greedy decode tokens agree."""

    def check(a, b):
        diff = mx.abs(a.astype(mx.float32) - b).max().item()
        assert diff < 0.02 * mx.abs(b).max().item(), diff
        if a.shape[1] == 1:
            assert a.argmax(-1).item() == b.argmax(-1).item()

    compare_with_mlx_lm(air_bf16, check)


def test_cli_passes_activations(air_bf16_q4, monkeypatch, capsys):
    from mlx_glm4moe import cli
    from mlx_glm4moe.cli import generate_main as main

    seen, real = [], cli.load
    monkeypatch.setattr(cli, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    main(["--model", str(air_bf16_q4), "--prompt", "hi", "--max-tokens", "4", "--activations"]
         + ["native"])  # fmt: skip
    assert seen[0]["activations"] == "native" and capsys.readouterr().out
