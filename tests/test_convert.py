"""The converter: round trips, mlx-lm compatibility, FP8 sources, the hub paths, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlx_glm4moe import load
from mlx_glm4moe.convert import convert
from mlx_glm4moe.weights import HUB_PATTERNS, resolve

IDS = mx.array(np.random.default_rng(3).integers(0, 380, size=(1, 32)))

ROOT = Path(__file__).resolve().parents[1]


def logits(path):
    model, _ = load(path)
    return np.array(model(IDS))


def test_round_trip_keeps_everything(air_checkpoint, air_f32, air_q4):
    assert np.abs(logits(air_f32) - logits(air_checkpoint)).max() == 0
    for out in (air_f32, air_q4):
        files = {f.name for f in out.iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
        assert {"config.json", "model.safetensors.index.json", "README.md"} <= files
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(k.startswith("model.layers.3.eh_proj") for k in index)  # the MTP layer
        assert not any(".experts." in k for k in index)  # stacked
    config = json.loads((air_q4 / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    index = json.loads((air_q4 / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.switch_mlp.up_proj.scales" in index
    assert "model.layers.1.mlp.gate.scales" not in index


@pytest.mark.parametrize("out", ["air_f32", "air_q4"])
def test_mlx_lm_loads_output_with_equal_logits(out, request):
    path = request.getfixturevalue(out)
    model, _ = mlx_lm.load(str(path))
    assert np.abs(np.array(model(IDS)) - logits(path)).max() <= 1e-5


def _fp8_checkpoint(src, dst, block=None):
    """Rewrite a float32 checkpoint as FP8 (per-channel compressed-tensors, or block scales),
    and a float32 reference holding exactly the dequantized weights."""
    shutil.copytree(src, dst)
    ref = dst.parent / f"{dst.name}-ref"
    shutil.copytree(src, ref)
    for shard in sorted(src.glob("*.safetensors")):
        tensors, deq, fp8 = load_file(shard), {}, {}
        for name, w in tensors.items():
            linear = w.ndim == 2 and "embed" not in name and "lm_head" not in name
            if not linear or name.endswith("mlp.gate.weight") or "shared_head.head" in name:
                fp8[name] = deq[name] = w
                continue
            if block:
                b0, b1 = block
                blocks = w.unflatten(0, (-1, b0)).unflatten(-1, (-1, b1))
                scale = blocks.abs().amax(dim=(1, 3)) / 448
                q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
                deq[name] = (q.float() * scale[:, None, :, None]).flatten(-2).flatten(0, 1)
                fp8[name], fp8[f"{name}_scale_inv"] = q.flatten(-2).flatten(0, 1), scale
            else:
                scale = w.abs().amax(dim=1, keepdim=True) / 448
                q = (w / scale).to(torch.float8_e4m3fn)
                fp8[name], fp8[f"{name}_scale"] = q, scale.to(torch.bfloat16).float()
                deq[name] = q.float() * fp8[f"{name}_scale"]
        save_file(fp8, dst / shard.name, metadata={"format": "pt"})
        save_file(deq, ref / shard.name, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for name, f in list(index["weight_map"].items()):
        suffix = "_scale_inv" if block else "_scale"
        if f"{name}{suffix}" in load_file(dst / f):
            index["weight_map"][f"{name}{suffix}"] = f
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "weight_block_size": list(block)}
        if block
        else {"quant_method": "compressed-tensors", "format": "float-quantized"}
    )
    (dst / "config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize("block", [None, (32, 32)], ids=["per-channel", "block"])
def test_fp8_sources_are_dequantized(air_checkpoint, tmp_path, block):
    ref = _fp8_checkpoint(air_checkpoint, tmp_path / "fp8", block)
    out = convert(str(tmp_path / "fp8"), str(tmp_path / "out"), dtype="float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert np.abs(logits(out) - logits(ref)).max() <= 1e-4


def test_hub_repo_id_goes_through_snapshot_download(air_checkpoint, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(air_checkpoint)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve("zai-org/GLM-4.5-Air") == air_checkpoint
    assert calls == [("zai-org/GLM-4.5-Air", HUB_PATTERNS)]


def run_convert(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *args], capture_output=True, text=True
    )


def broken(src, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    shard = sorted(bad.glob("*.safetensors"))[0]
    if how == "missing config key":
        del config["hidden_size"]
    elif how == "model type":
        config["model_type"] = "llama"
    elif how == "missing shard":
        shard.unlink()
    elif how == "garbage shard":
        shard.write_bytes(b"not a safetensors file at all" * 10)
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif how == "no config":
        (bad / "config.json").unlink()
    if (bad / "config.json").exists():
        (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize(
    "how,message",
    [
        ("missing config key", "missing required key(s): hidden_size"),
        ("model type", "Unsupported model_type 'llama'"),
        ("missing shard", "Missing weight shard model-00001-of-00002.safetensors"),
        ("garbage shard", "corrupt or not a safetensors file"),
        ("truncated shard", "corrupt or not a safetensors file"),
        ("no config", "No config.json"),
    ],
)
def test_bad_source_fails_clearly_and_writes_nothing(air_checkpoint, tmp_path, how, message):
    bad = broken(air_checkpoint, tmp_path, how)
    r = run_convert("--hf-path", str(bad), "--mlx-path", str(tmp_path / "out"))
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no temp folder


def test_existing_destination_is_kept_without_force(air_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_convert("--hf-path", str(air_checkpoint), "--mlx-path", str(out))
    assert r.returncode != 0 and "already exists" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = run_convert("--hf-path", str(air_checkpoint), "--mlx-path", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize(
    "flags", [["--q-bits", "7"], ["--q-group-size", "48"], ["--dtype", "int8"], ["--bogus"]]
)
def test_bad_flags(air_checkpoint, tmp_path, flags):
    r = run_convert(
        "--hf-path", str(air_checkpoint), "--mlx-path", str(tmp_path / "o"), "-q", *flags
    )
    assert r.returncode == 2 and "error:" in r.stderr
    assert not (tmp_path / "o").exists()
