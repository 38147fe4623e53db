"""Expert streaming (identical output to the resident model in bounded memory, clear errors on bad
files), and the memory of loading and converting, measured in subprocesses."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_glm4moe import load, stream_generate
from mlx_glm4moe import streaming as st
from mlx_glm4moe.cli import generate_main
from mlx_glm4moe.convert import convert
from mlx_glm4moe.synthetic import make_checkpoint

# Bit-exact comparisons with the resident model: MLX's CPU (see conftest's `cpu`).
pytestmark = pytest.mark.usefixtures("cpu")

ROOT = Path(__file__).resolve().parents[1]
E, K = 16, 2  # the small model: 16 routed experts, top-2
IDS = mx.array(np.random.default_rng(0).integers(0, 380, size=(2, 48)))
MB = 1 << 20
# A model whose experts dominate its size: 8 MoE layers (7 + MTP) of 32 float32 experts of 0.79 MB.
BIG = dict(
    hidden_size=256,
    head_dim=64,
    moe_intermediate_size=256,
    n_routed_experts=32,
    num_experts_per_tok=4,
    num_hidden_layers=8,
)


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    """In GLM-4.6's layout (the MTP layer in mtp.safetensors, sharing the main embedding and
    head); `big_hf` is in GLM-4.5's."""
    path = tmp_path_factory.mktemp("hf-small")
    return make_checkpoint(path, "air", layout="glm46", n_routed_experts=E)


@pytest.fixture(scope="module", params=["q4", "f32"])
def small(request, small_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"small-{request.param}") / "out"
    return convert(str(small_hf), str(out), quantize=request.param == "q4")


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf-big"), "air", num_shards=8, **BIG)


@pytest.fixture(scope="module")
def big(big_hf, tmp_path_factory):
    return convert(str(big_hf), str(tmp_path_factory.mktemp("big") / "out"))


# Each measurement runs in a fresh interpreter (peak memory is per process), imports first so
# that the baseline holds the libraries, not the weights; it prints its figures as JSON. On the
# CPU: the bounds count the process's own memory (a Mac's GPU buffers are the driver's).
PRELUDE = """
import json, sys
import mlx.core as mx, numpy as np, transformers
mx.set_default_device(mx.cpu)
from mlx_glm4moe import load
from mlx_glm4moe.convert import convert
from mlx_glm4moe.bench import peak_rss_bytes
from mlx_glm4moe.streaming import resident_bytes, stats
base = peak_rss_bytes()
"""
RESIDENT = """
model, _ = load(sys.argv[1])
lazy = peak_rss_bytes() - base
mx.eval(model.parameters())
print(json.dumps({"lazy": lazy, "loaded": peak_rss_bytes() - base,
                  "weights": resident_bytes(model)}))
"""
STREAMED = """
model, _ = load(sys.argv[1], expert_slots=int(sys.argv[2]))
ids = mx.array(np.random.default_rng(0).integers(0, 380, size=(1, 64)))
cache = model.make_cache()
mx.eval(model(ids, cache=cache))
for t in range(16):
    mx.eval(model(ids[:, t : t + 1], cache=cache))
s = stats(model)
print(json.dumps({"peak": peak_rss_bytes() - base, "resident": s.resident_bytes,
                  "misses": s.misses}))
"""
CONVERT = """
convert(sys.argv[1], sys.argv[2])  # the default shard size: the whole output in one shard
print(json.dumps({"peak": peak_rss_bytes() - base}))
"""


@pytest.fixture(scope="module")
def measured(big_hf, big, tmp_path_factory):
    """The three memory measurements, run side by side to save time."""
    out = tmp_path_factory.mktemp("convert-measured") / "out"
    runs = {
        "resident": (RESIDENT, big),
        "streamed": (STREAMED, big, BIG["num_experts_per_tok"]),
        "convert": (CONVERT, big_hf, out),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PRELUDE + code, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for name, (code, *args) in runs.items()
    }
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate()
        assert p.returncode == 0, f"{name}: {stderr[-3000:]}"
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    return {**results, "converted": out}


def tokens(model, tokenizer, n=24):
    return [r.token for r in stream_generate(model, tokenizer, "Hello, world! How", n)]


@pytest.fixture(scope="module", params=["bf16-q4", "bf16"])
def small_bf16(request, small_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"small-{request.param}") / "out"
    return convert(str(small_hf), str(out), quantize=request.param == "bf16-q4", dtype="bfloat16")


def test_streaming_equals_resident_at_every_cache_size(small):
    check_streaming_equals_resident(small)


def test_streaming_equals_resident_on_lite(tmp_path):
    """GLM-4.7-Flash's architecture (latent attention), at 4 bits."""
    hf = make_checkpoint(tmp_path / "hf", "lite", n_routed_experts=E)
    check_streaming_equals_resident(convert(str(hf), str(tmp_path / "q4"), quantize=True))


def test_streaming_equals_resident_on_native_bfloat16(small_bf16):
    """The GPU's code path (bfloat16 activations, SwitchGLU's layout): still bit-identical to
    resident at every cache size on the CPU, whose kernels compute each (token, expert) row
    alone. On a GPU the grouped path's smaller batches may pick other kernels than one resident
    pass: there, only float32 activations are identical by construction."""
    check_streaming_equals_resident(small_bf16, "native")


def host(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))  # exact for bfloat16, which numpy lacks


def check_streaming_equals_resident(path, activations="auto"):
    small = path
    resident, tokenizer = load(small, activations=activations)
    ref_logits = host(resident(IDS))
    ref_tokens = tokens(resident, tokenizer)
    cache = resident.make_cache()
    resident(IDS[:, :40], cache=cache)
    ref_steps = [host(resident(IDS[:, t : t + 1], cache=cache)) for t in range(40, 48)]
    logits, hidden = resident(IDS, return_hidden=True)
    ref_mtp = host(resident.mtp.predict(IDS[:, 1:], hidden[:, :-1])[0])

    for slots in (E, E // 2, E // 4, K):
        model, _ = load(small, expert_slots=slots, activations=activations)
        # Logits are bit-identical: each (token, expert) row is the same product on the same
        # weights, whichever slot holds them. 96 tokens need more than K experts: the grouped path.
        np.testing.assert_array_equal(host(model(IDS)), ref_logits)
        cache = model.make_cache()
        model(IDS[:, :40], cache=cache)
        for t, ref in zip(range(40, 48), ref_steps, strict=True):
            np.testing.assert_array_equal(host(model(IDS[:, t : t + 1], cache=cache)), ref)
        np.testing.assert_array_equal(
            host(model.mtp.predict(IDS[:, 1:], hidden[:, :-1])[0]), ref_mtp
        )
        assert tokens(model, tokenizer) == ref_tokens
        s = st.stats(model)
        assert s.slots == slots and s.misses > 0
        if slots < E:  # experts were evicted and read again
            assert s.misses > E * 3  # 3 MoE layers (2 + MTP)


def test_prefill_reads_each_needed_expert_once_per_layer(small):
    """One 96-token prefill from empty slots: the minimum cache (grouped path) reads exactly the
    experts the full cache reads, each once."""
    reads = {}
    for slots in (E, K):
        model, _ = load(small, expert_slots=slots)
        model(IDS)
        reads[slots] = st.stats(model)
    full, minimum = reads[E], reads[K]
    assert full.hits == minimum.hits == 0
    assert full.misses == minimum.misses > E  # several layers, most experts used
    size, _ = st.expert_bytes(small, json.loads((small / "config.json").read_text()))
    assert minimum.bytes_read == full.bytes_read == full.misses * size


def test_generate_cli_with_expert_slots(small, capsys):
    argv = ["--model", str(small), "--max-tokens", "12", "--prompt", "Hi"]
    generate_main(argv)
    resident = capsys.readouterr()
    generate_main([*argv, "--expert-slots", str(K)])
    streamed = capsys.readouterr()
    assert streamed.out == resident.out
    assert f"Expert streaming: {K} slots/layer, hit rate" in streamed.err
    line = re.search(
        r"read (\S+) MB/prompt token and (\S+) MB/generated token at (\S+) GB/s "
        r"\(disk sequential read: (\S+) GB/s\)",
        streamed.err,
    )
    assert line and all(float(x) > 0 for x in line.groups())

    # The prompt's reads are counted apart: every prompt token but the last is prefilled.
    model, tokenizer = load(small, expert_slots=K)
    prompt = tokenizer.encode("Hello there, how are you today?")
    responses = list(stream_generate(model, tokenizer, prompt, 6))
    s = st.stats(model)
    assert s.prefill_tokens == len(prompt) - 1 and s.tokens == s.prefill_tokens + len(responses)
    assert 0 < s.prefill_bytes_read < s.bytes_read

    size, layers = st.expert_bytes(small, json.loads((small / "config.json").read_text()))
    generate_main([*argv, "--expert-cache-gb", str(4.5 * size * layers / 1e9)])
    assert "4 slots/layer" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="too small: the minimum"):
        generate_main([*argv, "--expert-cache-gb", str(size / 1e9)])
    with pytest.raises(SystemExit, match="at least num_experts_per_tok"):
        generate_main([*argv, "--expert-slots", "1"])


def test_raw_hf_folder_cannot_stream(small_hf):
    with pytest.raises(ValueError, match="converted by convert.py"):
        load(small_hf, expert_slots=K)


def _expert_tensor(path: Path) -> tuple[Path, int, int]:
    """(file, data start, header entry) of a stacked expert weight in a converted folder."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.switch_mlp.down_proj.weight"
    f = path / index[name]
    start, header = st.read_header(f)
    return f, start, header[name]["data_offsets"]


def test_truncated_file_is_a_clear_error(small, tmp_path):
    bad = Path(shutil.copytree(small, tmp_path / "bad"))
    f, start, (begin, end) = _expert_tensor(bad)
    model, tokenizer = load(bad, expert_slots=K)
    mx.eval(model.parameters())  # the resident weights are in memory; only experts are read
    os.truncate(f, start + (begin + end) // 2)
    with pytest.raises(st.ExpertReadError, match="truncated or changed since loading"):
        model(IDS)
    with pytest.raises(ValueError, match="truncated"):
        load(bad, expert_slots=K)


def test_corrupt_header_is_a_clear_error(small, tmp_path):
    bad = Path(shutil.copytree(small, tmp_path / "bad"))
    f, start, (begin, end) = _expert_tensor(bad)
    raw = f.read_bytes()
    header = raw[8:start].replace(f"[{begin},{end}]".encode(), f"[{begin},{end - 4}]".encode())
    assert header != raw[8:start]
    f.write_bytes(raw[:8] + header + raw[start:])  # same length: only one range is wrong
    with pytest.raises(ValueError, match="corrupt"):
        load(bad, expert_slots=K)
    f.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    with pytest.raises(ValueError, match="corrupt|not a safetensors file"):
        load(bad, expert_slots=K)


def test_resident_weights_larger_than_memory_are_refused(small, monkeypatch):
    """Any backend: a resident load that does not fit stops before reading a weight, naming the
    way out; streaming fits; `force` loads anyway. On Metal the limit is the working set."""
    size = st.resident_bytes(load(small)[0])
    monkeypatch.setattr(st, "available_memory", lambda: size - 1)
    with pytest.raises(ValueError, match="exceed the memory available.*--expert-cache-gb"):
        load(small)
    load(small, expert_slots=K)
    load(small, force=True)
    # The streaming benchmark's default cache sizes skip those that would not fit.
    config = json.loads((small / "config.json").read_text())
    assert not st.fits_in_memory(small, config, None) and not st.fits_in_memory(small, config, E)
    assert st.fits_in_memory(small, config, K)
    monkeypatch.undo()
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1000})
    assert st.available_memory() == 1000


def test_generation_wires_memory_only_while_it_runs(small, monkeypatch):
    """On Metal (simulated) generating sets the wired limit and restores the old one after."""
    limits = [0]
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: limits.append(n) or limits[-2])
    model, tokenizer = load(small)
    tokens(model, tokenizer, 4)
    assert limits == [0]  # no Metal: nothing is wired
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1 << 40})
    tokens(model, tokenizer, 4)
    assert limits == [0, 1 << 40, 0]


def test_resident_load_is_lazy_and_holds_one_copy(measured):
    r = measured["resident"]
    print(f"resident load: {r['loaded'] / MB:.1f} MB RSS for {r['weights'] / MB:.1f} MB of weights")
    assert r["lazy"] < 0.05 * r["weights"]
    assert r["weights"] < r["loaded"] < 1.05 * r["weights"]


def test_streaming_memory_is_bounded_by_the_slots(measured, big):
    """Peak RSS growth with k slots stays under the non-expert weights + k experts per layer +
    a 40 MB margin (activations, read buffers, the tokenizer, MLX's buffer cache)."""
    r = measured["streamed"]
    size, layers = st.expert_bytes(big, json.loads((big / "config.json").read_text()))
    all_experts = size * layers * BIG["n_routed_experts"]
    bound = r["resident"] + 40 * MB
    print(
        f"{BIG['num_experts_per_tok']} slots: peak {r['peak'] / MB:.1f} MB, "
        f"bound {bound / MB:.1f} MB, all experts {all_experts / MB:.1f} MB"
    )
    assert r["resident"] <= r["peak"] < bound
    assert bound < all_experts / 2  # the measurement can tell streaming from resident
    assert r["misses"] * size > all_experts  # it really streamed the experts through


def test_converter_holds_one_shard_and_one_layer(measured, big_hf):
    """Peak RSS growth of a conversion into one output shard (the whole model) stays under the
    largest source shard + one layer's experts (being stacked) + 16 MB, far below the
    checkpoint: shards are written as their tensors are made, never held."""
    shards = [f.stat().st_size for f in big_hf.glob("*.safetensors")]
    config = json.loads((big_hf / "config.json").read_text())
    size, _ = st.expert_bytes(measured["converted"], config)
    layer = size * BIG["n_routed_experts"]
    peak = measured["convert"]["peak"]
    print(
        f"convert: peak {peak / MB:.1f} MB; largest shard {max(shards) / MB:.1f} MB, "
        f"one layer's experts {layer / MB:.1f} MB, checkpoint {sum(shards) / MB:.1f} MB"
    )
    assert len(shards) == 8
    assert len(list(measured["converted"].glob("*.safetensors"))) == 1
    assert peak < max(shards) + layer + 16 * MB < sum(shards) / 2
