"""Shared fixtures: tiny GLM-4.5, GLM-4.5-Air and GLM-4.7-Flash checkpoints in the real Hugging Face
layout."""

import importlib
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_glm4moe.convert import convert
from mlx_glm4moe.synthetic import make_checkpoint

# name: (preset, layout). GLM-4.6 is GLM-4.5's architecture with its nextn layer in
# mtp.safetensors (here left out of the index), without its own embedding and head.
CHECKPOINTS = {
    "glm45": ("glm45", "glm45"),
    "air": ("air", "glm45"),
    "glm46": ("glm45", "glm46-unlisted"),
}


@pytest.fixture(scope="session", params=list(CHECKPOINTS))
def hf_checkpoint(request, tmp_path_factory) -> Path:
    """A float32 HF checkpoint: two shards with an index, config, tokenizer, chat template."""
    preset, layout = CHECKPOINTS[request.param]
    return make_checkpoint(tmp_path_factory.mktemp(f"hf-{request.param}"), preset, layout=layout)


@pytest.fixture(scope="session")
def air_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf-air"), "air")


@pytest.fixture(scope="session")
def air_q4(air_checkpoint, tmp_path_factory) -> Path:
    """The Air fixture converted to 4-bit."""
    return convert(str(air_checkpoint), str(tmp_path_factory.mktemp("q4") / "out"), quantize=True)


@pytest.fixture(scope="session")
def lite_q4(tmp_path_factory) -> Path:
    """A GLM-4.7-Flash-shaped (glm4_moe_lite) checkpoint at 4 bits, with its MTP layer."""
    root = tmp_path_factory.mktemp("lite-q4")
    return convert(str(make_checkpoint(root / "hf", "lite")), str(root / "q4"), quantize=True)


@pytest.fixture(scope="session")
def air_f32(air_checkpoint, tmp_path_factory) -> Path:
    return convert(str(air_checkpoint), str(tmp_path_factory.mktemp("f32") / "out"))


@pytest.fixture(scope="session")
def air_bf16(air_checkpoint, tmp_path_factory) -> Path:
    """The Air fixture in bfloat16, as the published weights are."""
    out = tmp_path_factory.mktemp("bf16") / "out"
    return convert(str(air_checkpoint), str(out), dtype="bfloat16")


@pytest.fixture(scope="session")
def air_bf16_q4(air_checkpoint, tmp_path_factory) -> Path:
    """The Air fixture at 4 bits with bfloat16 scales: `activations="native"` runs bfloat16."""
    out = tmp_path_factory.mktemp("bf16-q4") / "out"
    return convert(str(air_checkpoint), str(out), quantize=True, dtype="bfloat16")


@pytest.fixture(scope="module")
def cpu():
    """MLX's CPU for a whole test module (`pytestmark = pytest.mark.usefixtures("cpu")`): the
    bit-exact comparisons (float32 staging of bfloat16, the order of sums) and the allocator's
    peak-memory figures hold there, and a Mac runs the GPU by default. Pins the default device
    before the module's models load (activations="auto" follows it), and mlx-lm's generation
    stream, made on the default device when mlx-lm was imported (our modules hold it by name)."""
    modules = ("mlx_lm.generate", "mlx_glm4moe.generate", "mlx_glm4moe.mtp", "mlx_glm4moe.prefill")
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    with pytest.MonkeyPatch.context() as patch:
        stream = mx.new_thread_local_stream(mx.cpu)  # as mlx-lm makes it: each thread its own
        for name in modules:
            patch.setattr(importlib.import_module(name), "generation_stream", stream)
        yield
    mx.set_default_device(device)
