"""The converter: round trips, mlx-lm compatibility, FP8 sources, the hub paths, bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mlx_glm4moe import convert as convert_module
from mlx_glm4moe import load
from mlx_glm4moe.convert import convert
from mlx_glm4moe.synthetic import make_checkpoint
from mlx_glm4moe.weights import HUB_PATTERNS, FP8Format, dequantize_fp8, fp8_format, resolve

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


def test_small_shards_hold_the_same_tensors(air_checkpoint, air_q4, tmp_path):
    """Shards written header first, tensor by tensor, read back with the safetensors library:
    each within the size limit (or one tensor), the same tensors as one big shard."""
    out = convert(
        str(air_checkpoint), str(tmp_path / "out"), quantize=True, max_shard_bytes=1 << 15
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    whole = {k: v for f in air_q4.glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 4 and set(index.values()) == {f.name for f in files}
    seen = {}
    for f in files:
        tensors = safetensors.numpy.load_file(f)
        assert sum(t.nbytes for t in tensors.values()) <= 1 << 15 or len(tensors) == 1
        seen.update({k: (f.name, t) for k, t in tensors.items()})
    assert seen.keys() == whole.keys() == index.keys()
    for name, (f, t) in seen.items():
        assert index[name] == f
        np.testing.assert_array_equal(t, np.array(whole[name]))


def test_failure_while_writing_leaves_nothing(air_checkpoint, tmp_path, monkeypatch):
    writes, write = [], convert_module._ShardWriter.write

    def disk_full(self, name, a):
        writes.append(name)
        if len(writes) == 20:
            raise OSError(28, "No space left on device")
        write(self, name, a)

    monkeypatch.setattr(convert_module._ShardWriter, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(str(air_checkpoint), str(tmp_path / "out"), max_shard_bytes=1 << 15)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def glm46_q4(tmp_path_factory):
    """GLM-4.6's layout, 4-bit: no MTP embedding or head in the source or the output."""
    hf = make_checkpoint(tmp_path_factory.mktemp("hf-glm46"), "glm45", layout="glm46")
    out = convert(str(hf), str(hf.parent / "q4"), quantize=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.4.eh_proj.weight" in index
    assert not [k for k in index if k.startswith("model.layers.4.") and "embed" in k]
    assert "model.layers.4.shared_head.head.weight" not in index
    return out


@pytest.mark.parametrize("out", ["air_f32", "air_q4", "glm46_q4"])
def test_mlx_lm_loads_output_with_equal_logits(out, request):
    path = request.getfixturevalue(out)
    model, _ = mlx_lm.load(str(path))
    assert np.abs(np.array(model(IDS)) - logits(path)).max() <= 1e-5


def _fp8(w, block):
    """`w` in FP8 E4M3 with its scales (per block, edge blocks partial; or per output channel),
    and the float32 it dequantizes to, computed in torch."""
    if block:
        (b0, b1), (rows, cols) = block, w.shape
        padded = torch.nn.functional.pad(w, (0, -cols % b1, 0, -rows % b0))
        scale = padded.unflatten(0, (-1, b0)).unflatten(-1, (-1, b1)).abs().amax(dim=(1, 3)) / 448
        full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:rows, :cols]
    else:
        scale = full = (w.abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16).float()
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def _fp8_checkpoint(src, dst, block=None):
    """Rewrite a float32 checkpoint as FP8: block FP8 (`quant_method: fp8`, `weight_scale_inv`)
    or per-channel compressed-tensors (`weight_scale`), and a float32 reference holding exactly
    the dequantized weights."""
    shutil.copytree(src, dst)
    ref = dst.parent / f"{dst.name}-ref"
    shutil.copytree(src, ref)
    suffix = "_scale_inv" if block else "_scale"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in sorted(src.glob("*.safetensors")):
        tensors, deq, fp8 = load_file(shard), {}, {}
        for name, w in tensors.items():
            linear = w.ndim == 2 and "embed" not in name and "lm_head" not in name
            if not linear or name.endswith("mlp.gate.weight") or "shared_head.head" in name:
                fp8[name] = deq[name] = w
                continue
            fp8[name], fp8[name + suffix], deq[name] = _fp8(w, block)
            index["weight_map"][name + suffix] = shard.name
        save_file(fp8, dst / shard.name, metadata={"format": "pt"})
        save_file(deq, ref / shard.name, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic"}
        if block
        else {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                }
            },
        }
    )
    (dst / "config.json").write_text(json.dumps(config))
    return ref


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    """Dense width 160: with 128-wide blocks, input and output dimensions below (64), equal to
    (q_proj's 128 outputs) and not a multiple of (160 = 1.25 blocks) the block."""
    return make_checkpoint(tmp_path_factory.mktemp("hf-fp8"), "air", intermediate_size=160)


def hf_logits(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(np.array(IDS))).logits.numpy()


@pytest.mark.parametrize(
    "block", [None, (128, 128), (32, 48)], ids=["per-channel", "block128", "block32x48"]
)
def test_fp8_sources_match_transformers_on_their_dequantized_weights(fp8_source, tmp_path, block):
    """transformers cannot read block FP8 with partial blocks on the CPU, so it runs the float32
    checkpoint of exactly the weights the FP8 one stands for (dequantized in torch): the float32
    product of an FP8 value and a float32 scale is the same in torch and MLX, so the float32
    parity bound holds. The FP8 error itself (against the source) is printed."""
    ref = _fp8_checkpoint(fp8_source, tmp_path / "fp8", block)
    out = convert(str(tmp_path / "fp8"), str(tmp_path / "out"), dtype="float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ours, expected, source = logits(out), hf_logits(ref), hf_logits(fp8_source)
    diff = np.abs(ours - expected).max()
    fp8_error = np.abs(ours - source).max()
    print(f"FP8 {block}: max |logit diff| vs transformers {diff:.2e}, vs source {fp8_error:.3f}")
    assert diff <= 1e-4 and np.abs(expected).max() > 1
    np.testing.assert_array_equal(logits(tmp_path / "fp8"), ours)  # a raw FP8 folder loads too


def test_fp8_lite_source_matches_transformers(tmp_path):
    """GLM-4.7-Flash has no published FP8 checkpoint that we know of; were there one in block
    FP8, its latent-attention projections (kv_b_proj included) dequantize before they are split."""
    src = make_checkpoint(tmp_path / "hf", "lite")
    ref = _fp8_checkpoint(src, tmp_path / "fp8", (32, 48))
    out = convert(str(tmp_path / "fp8"), str(tmp_path / "out"), dtype="float32")
    assert np.abs(logits(out) - hf_logits(ref)).max() <= 1e-4


@pytest.mark.parametrize(
    "config,message",
    [
        (None, "is FP8 but the checkpoint has no FP8 quantization_config"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "has no model.layers.0."),
    ],
)
def test_fp8_that_the_config_does_not_describe_fails_clearly(fp8_source, tmp_path, config, message):
    _fp8_checkpoint(fp8_source, tmp_path / "bad")  # per-channel weight_scale
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["quantization_config"] = config
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(str(tmp_path / "bad"), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "bad-ref"]


@pytest.mark.parametrize(
    "shape,block",
    [
        ((64, 64), (128, 128)),
        ((128, 128), (128, 128)),
        ((300, 160), (128, 128)),
        ((7, 50), (3, 16)),
    ],
)
def test_block_fp8_of_every_shape(shape, block):
    w = torch.randn(shape)
    q, scale, deq = _fp8(w, block)
    ours = dequantize_fp8(
        "w", mx.array(q.view(torch.uint8).numpy()), mx.array(scale.numpy()), FP8Format("_s", block)
    )
    np.testing.assert_array_equal(np.array(ours), deq.numpy())
    with pytest.raises(ValueError, match=r"w_s has shape .* needs"):
        dequantize_fp8("w", mx.zeros(shape, mx.uint8), mx.ones((1, 1, 1)), FP8Format("_s", block))


def test_fp8_format_comes_from_the_config():
    def fmt(q):
        return fp8_format({"quantization_config": q})

    assert fmt({"quant_method": "fp8", "weight_block_size": [128, 64]}) == FP8Format(
        "_scale_inv", (128, 64)
    )
    assert fmt({"quant_method": "fp8"}) == FP8Format("_scale", None)  # per tensor
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    channel = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
    assert fmt({**ct, "config_groups": {"g": channel}}) == FP8Format("_scale", None)
    block = {"weights": {**channel["weights"], "strategy": "block", "block_structure": [64, 64]}}
    assert fmt({**ct, "config_groups": {"g": block}}) == FP8Format("_scale", (64, 64))
    assert fmt({"group_size": 64, "bits": 4}) is None  # MLX's own, as convert writes it
    assert fp8_format({}) is None
    int4 = {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}
    with pytest.raises(ValueError, match="only FP8"):
        fmt({**ct, "format": "pack-quantized", "config_groups": {"g": int4}})
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        fmt({"quant_method": "gptq", "bits": 4})


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
