"""The model against transformers' Glm4MoeForCausalLM, and its parts against the math."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import AutoModelForCausalLM

from mlx_glm4moe import load
from mlx_glm4moe.convert import convert
from mlx_glm4moe.models import model_args
from mlx_glm4moe.models.base import select_experts
from mlx_glm4moe.models.glm4_moe import ModelArgs
from mlx_glm4moe.synthetic import make_checkpoint, make_config, random_weights, save_sharded

IDS = np.random.default_rng(0).integers(0, 380, size=(2, 48))


def hf_logits(path, ids=IDS):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_converted_fp32_matches_transformers(hf_checkpoint, tmp_path):
    out = convert(str(hf_checkpoint), str(tmp_path / "f32"), dtype="float32")
    model, _ = load(out)
    ours = np.array(model(mx.array(IDS)))
    ref = hf_logits(hf_checkpoint)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors


def test_raw_hf_folder_loads_directly(hf_checkpoint):
    model, _ = load(hf_checkpoint)
    assert np.abs(np.array(model(mx.array(IDS))) - hf_logits(hf_checkpoint)).max() <= 1e-4


def test_unnormalized_routing_matches_transformers(tmp_path):
    """`norm_topk_prob: false`: the experts' weights are their raw sigmoid scores (times the
    scaling factor), not renormalized to sum to one, as transformers has it."""
    hf = make_checkpoint(tmp_path / "hf", "glm45", norm_topk_prob=False)
    ref = hf_logits(hf)
    for path in (hf, convert(str(hf), str(tmp_path / "f32"), dtype="float32")):
        model, _ = load(path)
        assert model.args.norm_topk_prob is False
        assert np.abs(np.array(model(mx.array(IDS))) - ref).max() <= 1e-4
    # The switch matters on this checkpoint: normalizing moves the logits far past the bound.
    normalized = make_checkpoint(tmp_path / "normalized", "glm45", norm_topk_prob=True)
    assert np.abs(hf_logits(normalized) - ref).max() > 0.1


@pytest.mark.parametrize("bits,bound", [(4, 0.25), (8, 0.02)])
def test_quantized_stays_close(hf_checkpoint, tmp_path, bits, bound):
    """Random weights are harder on quantization than trained ones, so the 4-bit bound is loose;
    8 bits must be far closer (routing flips near ties keep it above zero)."""
    out = convert(str(hf_checkpoint), str(tmp_path / "q"), quantize=True, q_bits=bits)
    model, _ = load(out)
    p = torch.tensor(hf_logits(hf_checkpoint)).log_softmax(-1)
    q = torch.tensor(np.array(model(mx.array(IDS)))).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    print(f"{bits}-bit KL to fp32 ({hf_checkpoint.name}): {kl:.5f}")
    assert 0 < kl < bound


def test_incremental_decoding_equals_full_pass(hf_checkpoint):
    model, _ = load(hf_checkpoint)
    full = model(mx.array(IDS))
    cache = model.make_cache()
    parts = [model(mx.array(IDS[:, :20]), cache=cache)]
    parts += [model(mx.array(IDS[:, t : t + 1]), cache=cache) for t in range(20, 30)]
    parts.append(model(mx.array(IDS[:, 30:]), cache=cache))
    assert np.abs(np.array(mx.concatenate(parts, axis=1)) - np.array(full)).max() <= 1e-5


def test_mtp_layer_loads_and_predicts(hf_checkpoint):
    model, _ = load(hf_checkpoint)
    assert model.mtp is not None
    logits, hidden = model(mx.array(IDS[:1]), return_hidden=True)
    draft_logits, _ = model.mtp.predict(mx.array(IDS[:1, 1:]), hidden[:, :-1])
    assert draft_logits.shape == (1, IDS.shape[1] - 1, model.args.vocab_size)
    eh = model.mtp.eh_proj.weight
    assert float(mx.abs(eh).sum()) > 0
    # GLM-4.6's layout: no embedding or head of its own, and no copy of the main ones.
    glm46 = (hf_checkpoint / "mtp.safetensors").exists()
    assert ("embed_tokens" in model.mtp) == ("head" in model.mtp.shared_head) == (not glm46)
    names = [n for n, _ in tree_flatten(model.parameters())]
    assert sum(n.endswith("embed_tokens.weight") for n in names) == 1 + (not glm46)


@pytest.mark.parametrize("layout", ["glm46", "glm46-unlisted"])
def test_glm46_mtp_layer_uses_the_main_embedding_and_head(tmp_path, layout):
    """The same weights in GLM-4.5's layout, with the MTP embedding and head set to copies of
    the main ones, and in GLM-4.6's, without them: the same drafts, float32 or 4-bit."""
    hf = {"glm45": make_checkpoint(tmp_path / "glm45", "glm45")}
    config = json.loads((hf["glm45"] / "config.json").read_text())
    w = random_weights(config)
    p = f"model.layers.{config['num_hidden_layers']}"
    w[f"{p}.embed_tokens.weight"] = w["model.embed_tokens.weight"]
    w[f"{p}.shared_head.head.weight"] = w["lm_head.weight"]
    hf[layout] = shutil.copytree(hf["glm45"], tmp_path / layout)
    drafts = {}
    for name, path in hf.items():
        for f in path.glob("*.safetensors"):
            f.unlink()
        save_sharded(w, path, layout=name)
        for q in (False, True):
            model, _ = load(convert(str(path), str(tmp_path / f"{name}-{q}"), quantize=q))
            logits, hidden = model(mx.array(IDS), return_hidden=True)
            drafts[name, q] = np.array(model.mtp.predict(mx.array(IDS[:, 1:]), hidden[:, :-1])[0])
    for q in (False, True):
        np.testing.assert_array_equal(drafts["glm45", q], drafts[layout, q])


def test_config_layouts():
    v4 = make_config("glm45")
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "partial_rotary_factor")}
    v5["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "partial_rotary_factor": 0.5,
    }
    a, b = ModelArgs.from_dict(v4), ModelArgs.from_dict(v5)
    assert (a.rope_theta, a.partial_rotary_factor) == (b.rope_theta, b.partial_rotary_factor)
    assert a.head_dim == 32 and a.num_nextn_predict_layers == 1


def test_config_errors():
    with pytest.raises(ValueError, match="Unsupported model_type 'llama'.*'glm4_moe_lite'"):
        model_args({**make_config(), "model_type": "llama"})
    bad = make_config()
    del bad["n_routed_experts"]
    with pytest.raises(ValueError, match="missing required key.*n_routed_experts"):
        ModelArgs.from_dict(bad)


def reference_route(logits, bias, k, n_group, topk_group, scale):
    """transformers' Glm4MoeTopkRouter, in numpy."""
    s = 1 / (1 + np.exp(-logits))
    choice = s + bias
    g = choice.reshape(len(s), n_group, -1)
    group_scores = np.sort(g, -1)[..., -2:].sum(-1)
    keep = np.argsort(-group_scores, -1)[:, :topk_group]
    mask = np.zeros_like(group_scores, dtype=bool)
    np.put_along_axis(mask, keep, True, -1)
    choice = np.where(np.repeat(mask, g.shape[-1], -1), choice, -np.inf)
    idx = np.argsort(-choice, -1)[:, :k]
    w = np.take_along_axis(s, idx, -1)
    return idx, w / w.sum(-1, keepdims=True) * scale


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (4, 1)])
def test_router_matches_reference(n_group, topk_group):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((64, 16)).astype(np.float32) * 3
    # A large negative bias makes biased scores negative: masked groups must still lose.
    bias = (rng.standard_normal(16) - 2.0).astype(np.float32)
    inds, w = select_experts(
        mx.sigmoid(mx.array(logits)), mx.array(bias), 4, n_group, topk_group, True, 2.5
    )
    ref_idx, ref_w = reference_route(logits, bias, 4, n_group, topk_group, 2.5)
    order = np.argsort(np.array(inds), -1)
    assert (np.take_along_axis(np.array(inds), order, -1) == np.sort(ref_idx, -1)).all()
    got_w = np.take_along_axis(np.array(w), order, -1)
    ref_w = np.take_along_axis(ref_w, np.argsort(ref_idx, -1), -1)
    assert np.allclose(got_w, ref_w, atol=1e-6)


def test_bf16_model_keeps_a_float32_router_and_matches_float32(air_checkpoint, air_f32, tmp_path):
    out = convert(str(air_checkpoint), str(tmp_path / "bf16"), dtype="bfloat16")
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = mx.load(str(out / weights["model.layers.1.mlp.gate.e_score_correction_bias"]))
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == mx.float32
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == mx.bfloat16
    model, _ = load(out)
    reference, _ = load(air_f32)
    x = mx.array(IDS)
    got, want = np.array(model(x).astype(mx.float32)), np.array(reference(x))
    # Rounding the weights to bfloat16 (8 bits of mantissa) moved the logits by at most 4% of
    # their spread on this fixture (measured); the bound leaves room for that and no more.
    assert np.abs(got - want).max() < 0.1 * want.std()
