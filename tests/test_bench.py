"""The benchmark's report and accounting, the memory bound of chunked prefill, and that the speed
work keeps outputs exact. Nothing here times anything."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step

from mlx_glm4moe import load
from mlx_glm4moe.bench import (
    METRICS,
    PARTS,
    decode_bytes,
    format_device_report,
    main,
)
from mlx_glm4moe.generate import generate_step
from mlx_glm4moe.models.base import SortedSwitchGLU
from mlx_glm4moe.synthetic import PRESETS

# The report's device is the CPU, its figures (deep decode at 4K, peak memory) the CPU's: pin it
# (see conftest's `cpu`).
pytestmark = pytest.mark.usefixtures("cpu")

# mlx-lm's SwitchGLU sorts the (token, expert) pairs by expert from this many on.
SORT_PAIRS = 64


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def prompt(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 380, n), dtype=mx.uint32)


def test_bench_end_to_end_writes_the_report(air_f32, tmp_path, capsys):
    """On float32 weights nothing is left to round differently: both implementations must pick
    the same greedy tokens, and the report must say so."""
    out = tmp_path / "report.json"
    main(
        ["--model", str(air_f32), "--prompt-tokens", "80", "--gen-tokens", "4", "--repeats", "2"]
        + ["--compare", "mlx-lm", "--prefill-step-size", "32", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert report["prompt_tokens"] == 80 and report["repeats"] == 2
    assert set(report["results"]) == {"ours", "mlx-lm"}
    for r in report["results"].values():
        for m in METRICS:
            assert len(r[m]["runs"]) == 2
            assert 0 < r[m]["min"] <= r[m]["median"] <= r[m]["max"]
        assert r["load_s"] > 0 and r["weights_gb"] > 0
        assert 0 < r["roofline_fraction"]
    assert set(report["ratios"]) == set(METRICS) | {"load_s"}
    assert set(report["decode_bytes_per_token"]) == set(PARTS) | {"total"}
    assert report["copy_bandwidth_gbs"] > 0
    assert report["same_tokens"] is True
    table = capsys.readouterr().out
    assert "| decode tokens/s |" in table and "ours / mlx-lm" in table


def test_bench_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="not a model folder"):
        main(["--model", str(tmp_path), "--compare", "none"])


def test_decode_bytes_match_a_hand_count(air_f32, air_q4):
    c = json.loads((air_f32 / "config.json").read_text())
    H, V, D, I, Im = (
        c["hidden_size"],
        c["vocab_size"],
        c["head_dim"],
        c["intermediate_size"],
        c["moe_intermediate_size"],
    )
    nq, nkv, E, k = (
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["n_routed_experts"],
        c["num_experts_per_tok"],
    )
    n_layers, n_dense = c["num_hidden_layers"], c["first_k_dense_replace"]
    n_moe = n_layers - n_dense
    f = 4  # float32 bytes
    q, kv = nq * D, nkv * D
    expected = {
        "embedding": f * H,  # one row
        "attention": n_layers * f * (H * q + q + 2 * (H * kv + kv) + q * H),  # q/k/v biases
        "dense_mlp": n_dense * f * 3 * H * I,
        "router": n_moe * f * (E * H + E),
        "shared_experts": n_moe * f * 3 * H * Im,
        "routed_experts": n_moe * f * 3 * H * Im * k,  # k of the E experts
        "norms": f * (2 * H * n_layers + H),
        "head": f * V * H,
    }
    expected["total"] = sum(expected.values())
    model, _ = load(air_f32)
    assert decode_bytes(model) == expected
    # mlx-lm's model of the same folder has the same arrays under the same names.
    assert decode_bytes(mlx_lm.load(str(air_f32))[0]) == expected

    # 4-bit experts: packed weights (half a byte each) plus a float32 scale and bias per 64.
    model, _ = load(air_q4)
    per_expert = 3 * (H * Im // 2 + 2 * f * H * Im // 64)
    assert decode_bytes(model)["routed_experts"] == n_moe * k * per_expert


def test_chunked_prefill_memory_is_bounded_by_chunk_and_cache(air_f32):
    """With small chunks, what prefill allocates beyond the KV cache stays flat as the prompt
    grows 4x (the cache itself briefly exists twice while it grows); one big chunk does not
    (its attention scores alone are heads x 2048^2 floats, 64 MiB here)."""
    model, _ = load(air_f32, lazy=False)

    def prefill_peak(n, chunk):
        cache = model.make_cache()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        list(generate_step(prompt(n), model, max_tokens=1, prompt_cache=cache,
                           prefill_step_size=chunk))  # fmt: skip
        return mx.get_peak_memory() - base, sum(c.nbytes for c in cache)

    MB = 1 << 20
    extra = []
    for n in (512, 2048):
        peak, kv = prefill_peak(n, 64)
        extra.append(peak - 2 * kv)
    assert max(extra) < 1 * MB
    assert abs(extra[1] - extra[0]) < 0.5 * MB
    peak, kv = prefill_peak(2048, 2048)
    assert peak - 2 * kv > 32 * MB


def test_greedy_tokens_equal_mlx_lm_on_fp32_weights(air_f32):
    """Float32 weights leave no rounding to differ: our model with the speed changes (sorted
    expert dispatch in prefill, unsorted in decode) picks the same tokens as mlx-lm's."""
    ours, _ = load(air_f32)
    theirs, _ = mlx_lm.load(str(air_f32))
    p = prompt(40)  # 40 tokens x top-2 = 80 (token, expert) pairs: the sorted path
    a = [t for t, _ in generate_step(p, ours, max_tokens=12, sampler=greedy)]
    b = [int(t) for t, _ in mlx_lm_generate_step(p, theirs, max_tokens=12, sampler=greedy)]
    assert a == b


def test_quantized_kv_cache_matches_mlx_lm(air_f32):
    ours, _ = load(air_f32)
    theirs, _ = mlx_lm.load(str(air_f32))
    kw = dict(max_tokens=8, sampler=greedy, kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    a = [t for t, _ in generate_step(prompt(24), ours, **kw)]
    b = [int(t) for t, _ in mlx_lm_generate_step(prompt(24), theirs, **kw)]
    assert a == b


def reference_experts(switch_mlp, x, inds, weights):
    """The routed experts one (token, expert) pair at a time, from the dequantized weights, in
    float64 numpy: the oracle for every path of SortedSwitchGLU."""

    def dense(proj):
        w = mx.dequantize(proj.weight, proj.scales, proj.biases, proj.group_size, proj.bits)
        return np.array(w.astype(mx.float32), np.float64)

    gate, up, down = (
        dense(p) for p in (switch_mlp.gate_proj, switch_mlp.up_proj, switch_mlp.down_proj)
    )
    rows = np.array(x.astype(mx.float32), np.float64).reshape(-1, x.shape[-1])
    ids = np.array(inds).reshape(len(rows), -1)
    ws = np.array(weights.astype(mx.float32), np.float64).reshape(len(rows), -1)
    out = np.zeros_like(rows)
    for t, row in enumerate(rows):
        for e, w in zip(ids[t], ws[t], strict=True):
            g, u = gate[e] @ row, up[e] @ row
            out[t] += w * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("tokens", [3, 50])
def test_sorted_switch_glu_equals_the_reference(air_q4, tokens, dtype):
    """The experts' weighted sum, on decode-sized (12 pairs) and prefill-sized (200 pairs, the
    sorted path) inputs, on float32 activations (the CPU's branch) and bfloat16 ones (a Mac's
    branch), equals the pair-by-pair reference to float32 rounding: the fixture's quantization
    scales are float32, so the arithmetic after the input's rounding is float32 on both."""
    model, _ = load(air_q4)
    moe = model.layers[1].mlp
    assert isinstance(moe.switch_mlp, SortedSwitchGLU)
    x = mx.random.normal((2, tokens, model.args.hidden_size), key=mx.random.key(1)).astype(dtype)
    inds, weights = moe.gate(x)
    assert (inds.size >= SORT_PAIRS) == (tokens == 50)
    ours = moe.switch_mlp(x, inds, weights)
    assert ours.shape == x.shape
    ref = reference_experts(moe.switch_mlp, x, inds, weights)
    atol = 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), ref, rtol=1e-5, atol=atol)


def test_synthetic_bench_checkpoint_runs(tmp_path):
    out = tmp_path / "report.json"
    main(["--synthetic", "--compare", "none", "--prompt-tokens", "8", "--gen-tokens", "2"]
         + ["--repeats", "1", "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["ours"] and "ratios" not in report
    # 4-bit weights with bf16 scales: about 0.5625 bytes per weight.
    b, p = report["decode_bytes_per_token"], PRESETS["bench"]
    H, Im, k = p["hidden_size"], p["moe_intermediate_size"], p["num_experts_per_tok"]
    moe_layers = p["num_hidden_layers"] - p["first_k_dense_replace"]
    assert b["routed_experts"] == moe_layers * k * 3 * H * Im * 9 // 16


def test_device_report_fields_are_present_and_sane(air_q4, tmp_path, capsys):
    """`--report` on a tiny model, with a 200-token long prompt (the default: 2048)."""
    out = tmp_path / "report.json"
    main(["--model", str(air_q4), "--report", "--prompt-tokens", "200", "--gen-tokens", "4"]
         + ["--json", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    # float32 weights and scales: "native" runs float32 like mlx-lm, the same logits to rounding.
    assert r["agreement"]["max_logit_diff"] < 1e-4
    assert r["agreement"]["greedy_tokens_equal"] == r["agreement"]["greedy_steps"] == 16
    for name in ("ours", "mlx-lm"):
        assert list(r["speed"][name]) == ["128", "200"]
        for run in r["speed"][name].values():
            assert run["prefill_tps"] > 0 and run["ttft_s"] > 0 and run["peak_memory_gb"] > 0
        assert r["speed"][name]["128"]["decode_tps"] > 0
    deep = r["deep_decode"]  # on the CPU at 4K tokens, not 16K
    assert deep["depth"] == 4096 and deep["ours"] > 0 and deep["mlx-lm"] > 0
    m = r["mtp"]
    assert 0 <= m["acceptance"] <= 1 and 1 <= m["tokens_per_pass"] <= 2 and m["speed_ratio"] > 0
    assert [s["slots"] for s in r["streaming"]] == [4, 2]  # half of 8 experts, the top-k minimum
    for s in r["streaming"]:
        assert 0 <= s["hit_rate"] < 1 and s["read_gbs"] > 0 and s["tps"] > 0
        assert s["prefill_mb_per_token"] > 0 and s["mb_per_token"] > 0
    assert r["streaming"][0]["hit_rate"] >= r["streaming"][1]["hit_rate"]
    assert r["device"] == "cpu" and r["memory_gb"] > 1 and r["mlx"] == mx.__version__
    assert r["mlx_lm"] == mlx_lm.__version__ and r["disk_read_gbs"] > 0
    assert r["decode_bytes_per_token"] == decode_bytes(load(air_q4)[0])["total"]
    assert r["roofline_decode_tps"] == r["copy_bandwidth_gbs"] * 1e9 / r["decode_bytes_per_token"]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| measure | ours | mlx-lm | ours / mlx-lm |"
    assert all(line.startswith("| ") and line.count(" | ") == 3 for line in table[2:])
    assert "| greedy tokens equal | 16 of 16 |  |  |" in table
    assert any(line.startswith("| prefill tokens/s, 200-token prompt |") for line in table)
    deep_row = "| decode tokens/s at a 4K-token context (CPU: 4K, not 16K) |"
    assert any(line.startswith(deep_row) for line in table)
    assert table == format_device_report(r).splitlines()
