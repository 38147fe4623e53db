"""GLM-4.7-Flash (`glm4_moe_lite`): float32 logits against transformers' Glm4MoeLiteForCausalLM
on synthetic checkpoints in the real layout (prefill and step-by-step decoding through the
latent cache, with and without the MTP layer), the published shape's parameter count, and the
converted folder in mlx-lm's own glm4_moe_lite."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from starlette.testclient import TestClient
from transformers import AutoModelForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

from mlx_glm4moe import load
from mlx_glm4moe.bench import main as bench_main
from mlx_glm4moe.cli import generate_main
from mlx_glm4moe.convert import convert
from mlx_glm4moe.generate import generate_step
from mlx_glm4moe.models import build, model_args
from mlx_glm4moe.server import create_app
from mlx_glm4moe.synthetic import make_checkpoint

IDS = np.random.default_rng(0).integers(0, 380, size=(2, 40))
PROMPT = 16  # decoding steps through the cache start after this many tokens


@pytest.fixture(scope="module", params=[1, 0], ids=["mtp", "no-mtp"])
def lite_hf(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"lite-{request.param}")
    return make_checkpoint(path, "lite", num_nextn_predict_layers=request.param)


@pytest.fixture(scope="module")
def reference(lite_hf):
    model = AutoModelForCausalLM.from_pretrained(lite_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def prefill_and_decode(model) -> tuple[np.ndarray, np.ndarray]:
    """The logits of one pass over IDS, and of a prompt then one token at a time."""
    full = np.array(model(mx.array(IDS)))
    cache = model.make_cache()
    steps = [model(mx.array(IDS[:, :PROMPT]), cache=cache)]
    steps += [model(mx.array(IDS[:, t : t + 1]), cache=cache) for t in range(PROMPT, IDS.shape[1])]
    return full, np.array(mx.concatenate(steps, axis=1))


@pytest.mark.parametrize("converted", [False, True], ids=["raw", "converted"])
def test_prefill_and_decode_match_transformers(lite_hf, reference, converted, tmp_path):
    path = convert(str(lite_hf), str(tmp_path / "f32")) if converted else lite_hf
    model, _ = load(path)
    assert (model.mtp is not None) == (model.args.num_nextn_predict_layers == 1)
    full, decoded = prefill_and_decode(model)
    print(
        f"{lite_hf.name} {'converted' if converted else 'raw'}: max |ours - transformers| "
        f"prefill {np.abs(full - reference).max():.2e}, "
        f"decode {np.abs(decoded - reference).max():.2e}"
    )
    assert np.abs(full - reference).max() <= 1e-4
    assert np.abs(decoded - reference).max() <= 1e-4
    assert np.abs(reference).max() > 1.0  # not two near-zero tensors


def test_the_cache_holds_the_latent_not_keys_and_values(lite_hf):
    model, _ = load(lite_hf)
    cache = model.make_cache()
    model(mx.array(IDS[:, :PROMPT]), cache=cache)
    a = model.args
    assert cache[0].keys[..., :PROMPT, :].shape == (2, 1, PROMPT, a.kv_lora_rank)
    assert cache[0].values[..., :PROMPT, :].shape == (2, 1, PROMPT, a.qk_rope_head_dim)


def test_a_quantized_kv_cache_is_refused(tmp_path):
    """The latent and the rotary key 32 wide, so that mlx-lm can quantize them in groups of 32."""
    model, _ = load(make_checkpoint(tmp_path, "lite", qk_rope_head_dim=32))
    steps = generate_step(
        mx.array(IDS[0]), model, max_tokens=2, kv_bits=4, kv_group_size=32, quantized_kv_start=0
    )
    with pytest.raises(ValueError, match="latent"):
        list(steps)


def test_published_shape_has_transformers_parameter_count():
    """The class defaults are GLM-4.7-Flash's shape. Our model is built lazily (shapes only);
    transformers' on the meta device. transformers keeps the router's correction bias as a
    buffer, not a parameter: one per routed expert in each MoE layer."""
    config = Glm4MoeLiteConfig()
    args = model_args(config.to_dict())
    ours = sum(p.size for _, p in tree_flatten(build(args).parameters()))
    with torch.device("meta"):
        theirs = sum(p.numel() for p in Glm4MoeLiteForCausalLM(config).parameters())
    moe_layers = args.num_hidden_layers - args.first_k_dense_replace
    assert ours - args.n_routed_experts * moe_layers == theirs
    assert round(theirs / 1e9, 2) == 29.94


# GLM-4.7-Flash's config.json fields as vLLM's glm4_moe_lite config test carries them, with the
# nextn layer the checkpoint ships.
PUBLISHED = dict(
    model_type="glm4_moe_lite",
    architectures=["Glm4MoeLiteForCausalLM"],
    vocab_size=154880,
    hidden_size=2048,
    intermediate_size=10240,
    moe_intermediate_size=1536,
    num_hidden_layers=47,
    num_nextn_predict_layers=1,
    num_attention_heads=20,
    num_key_value_heads=20,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    attention_bias=False,
    max_position_embeddings=202752,
    rope_theta=1_000_000.0,
    rope_scaling=None,
    partial_rotary_factor=1.0,
    q_lora_rank=768,
    kv_lora_rank=512,
    qk_nope_head_dim=192,
    qk_rope_head_dim=64,
    v_head_dim=256,
    n_routed_experts=64,
    n_shared_experts=1,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    routed_scaling_factor=1.8,
    n_group=1,
    topk_group=1,
    topk_method="noaux_tc",
    first_k_dense_replace=1,
)


def test_published_config_builds_the_same_model_plus_its_mtp_layer():
    published = build(model_args(PUBLISHED))
    defaults = build(model_args(Glm4MoeLiteConfig().to_dict()))
    mtp = f"model.layers.{PUBLISHED['num_hidden_layers']}."
    shapes = {k: p.shape for k, p in tree_flatten(published.parameters())}
    assert {k: v for k, v in shapes.items() if not k.startswith(mtp)} == {
        k: p.shape for k, p in tree_flatten(defaults.parameters())
    }
    assert published.mtp is not None and "embed_tokens" in published.mtp


@pytest.mark.parametrize("quant", [None, "4bit", "mixed-3"])
def test_converted_folder_loads_in_mlx_lm_with_the_same_logits(lite_hf, quant, tmp_path):
    """Float32, `-q` and a mixed recipe. mlx-lm drops the MTP layer and runs its two latent norms
    at `rms_norm_eps` where transformers (and we) use 1e-6: the logits agree to that difference."""
    out = convert(str(lite_hf), str(tmp_path / "out"), quant_recipe=quant)
    ours, _ = load(out)
    theirs, _ = mlx_lm.load(str(out))
    assert quant is None or "scales" in ours.model.layers[1].self_attn.o_proj
    diff = np.abs(np.array(ours(mx.array(IDS))) - np.array(theirs(mx.array(IDS)))).max()
    print(f"{lite_hf.name} {quant}: max |ours - mlx-lm| {diff:.2e}")
    assert diff <= 1e-4


def runs_everywhere(folder, model_id: str, prompt: str, tmp_path, capsys) -> None:
    """A smoke test of a converted folder: the command line (plain and MTP), the server and
    `bench --report` (whose logits agree with the reference, with MTP and streaming run)."""
    for extra in ([], ["--mtp"]):
        generate_main(["--model", str(folder), "-p", prompt, "--max-tokens", "4", *extra])
    assert capsys.readouterr().out.strip()

    model, tokenizer = load(folder)
    with TestClient(create_app(model, tokenizer, model_id=model_id, max_tokens=8)) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0

    out = tmp_path / "report.json"
    bench_main(["--model", str(folder), "--report", "--prompt-tokens", "32", "--gen-tokens", "2"]
               + ["--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["agreement"]["max_logit_diff"] < 1e-4
    assert report["mtp"]["speed_ratio"] > 0 and report["streaming"]


def test_generate_server_and_report_run_a_lite_model(lite_q4, tmp_path, capsys):
    runs_everywhere(lite_q4, "lite", "Hi", tmp_path, capsys)


def test_mlx_lm_conversions_load_too(tmp_path):
    """mlx-community's GLM-4.7-Flash folders come from mlx_lm.convert: no MTP layer, kv_b_proj
    already split under the names we use."""
    hf = make_checkpoint(tmp_path / "hf", "lite")
    mlx_lm.convert(str(hf), mlx_path=str(tmp_path / "lm"), quantize=True)
    ours, _ = load(tmp_path / "lm")
    theirs, _ = mlx_lm.load(str(tmp_path / "lm"))
    assert ours.mtp is None
    diff = np.abs(np.array(ours(mx.array(IDS))) - np.array(theirs(mx.array(IDS)))).max()
    assert diff <= 1e-4
