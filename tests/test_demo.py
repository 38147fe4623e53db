"""The bundled demo model, the evaluation harness and the quantization recipes."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load

from mlx_glm4moe.cli import convert_main
from mlx_glm4moe.convert import convert
from mlx_glm4moe.evaluate import evaluate, heldout_text, windows
from mlx_glm4moe.evaluate import main as evaluate_main
from mlx_glm4moe.generate import generate
from mlx_glm4moe.loading import load
from mlx_glm4moe.parsers import parse_assistant
from mlx_glm4moe.recipes import RECIPES
from mlx_glm4moe.weights import DEFAULT_MODEL

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name."}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def demo():
    return load()


def chat(model, tokenizer, content, tools=None, max_tokens=120):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        tools=tools,
        add_generation_prompt=True,
        tokenize=False,
    )
    return generate(model, tokenizer, prompt, max_tokens)


def test_default_model_is_bundled_and_trained(demo):
    model, tokenizer = demo
    assert (DEFAULT_MODEL / "config.json").exists()
    assert model.mtp is not None
    text = chat(model, tokenizer, "Hello! Who are you?")
    reply = parse_assistant(text)
    assert reply["malformed"] is None, text
    assert reply["reasoning_content"], text
    assert len(reply["content"].split()) >= 5, text
    assert not reply["tool_calls"]


def test_default_model_calls_a_given_tool(demo):
    model, tokenizer = demo
    text = chat(model, tokenizer, "What is the weather in Paris?", tools=[WEATHER_TOOL])
    reply = parse_assistant(text, tools=[WEATHER_TOOL])
    assert reply["malformed"] is None, text
    assert len(reply["tool_calls"]) == 1, text
    call = reply["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    args = json.loads(call["arguments"])
    # The schema's argument, with a city in it (the demo model does not always copy the right one).
    assert list(args) == ["city"] and args["city"].strip(), text


class Uniform:
    """A reference model that gives every token the same probability."""

    def __init__(self, args):
        self.args = args

    def __call__(self, x):
        return mx.zeros((*x.shape, self.args.vocab_size))


def test_evaluate_against_a_uniform_reference(demo):
    """Perplexity and KL(uniform || model) recomputed in float64 numpy from the model's logits on
    the same windows; a uniform reference's perplexity is the vocabulary size."""
    model, tokenizer = demo
    report = evaluate(model, tokenizer, Uniform(model.args), sequence_length=96, num_samples=2)
    V = model.args.vocab_size
    nll = kl = n = 0
    for ids in windows(tokenizer, heldout_text(), 96, 2):
        logits = np.array(model(mx.array(ids[:-1])[None])[0].astype(mx.float32), np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
        kl += (-np.log(V) - lp.mean(-1)).sum()
        n += len(ids) - 1
    assert report.tokens == n
    assert report.perplexity == pytest.approx(np.exp(nll / n), rel=1e-4)
    assert report.reference_perplexity == pytest.approx(V, rel=1e-4)
    assert report.kl == pytest.approx(kl / n, rel=1e-4)
    assert 1 < report.perplexity < 200  # a trained model, not a uniform guess over ~2k tokens
    assert len(report.acceptance) == 2
    assert report.acceptance[0] > 0.3  # the MTP layer was trained: its drafts are often right
    assert all(0 <= a <= 1 for a in report.acceptance)


def test_evaluate_cli(capsys):
    evaluate_main(["--num-samples", "1", "--sequence-length", "64", "--num-draft-tokens", "1"])
    out = capsys.readouterr().out
    assert "perplexity:" in out and "MTP acceptance, draft 1:" in out
    with pytest.raises(SystemExit, match="No model folder"):
        evaluate_main(["--model", "./no/such/model"])


def bits_of(config, module):
    q = config["quantization"]
    return q.get(module, q)["bits"]


@pytest.mark.parametrize(
    "name,expert_bits,other_bits",
    [("4bit", 4, 4), ("mixed-4", 4, 5), ("mixed-3", 3, 5), ("mixed-2", 2, 5)],
)
def test_recipe_bits_and_mlx_lm_parity(air_checkpoint, tmp_path, name, expert_bits, other_bits):
    out = convert(str(air_checkpoint), str(tmp_path / name), quant_recipe=name)
    config = json.loads((out / "config.json").read_text())
    n = config["num_hidden_layers"]
    for layer in (1, n):  # a MoE layer and the MTP layer
        p = f"model.layers.{layer}"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert bits_of(config, f"{p}.mlp.switch_mlp.{proj}") == expert_bits
            assert bits_of(config, f"{p}.mlp.shared_experts.{proj}") == other_bits
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert bits_of(config, f"{p}.self_attn.{proj}") == other_bits
        assert f"{p}.mlp.gate" not in config["quantization"]
    for module in ("model.embed_tokens", "lm_head", f"model.layers.{n}.shared_head.head"):
        assert bits_of(config, module) == other_bits

    ours, _ = load(out)
    assert ours.model.layers[1].mlp.gate.weight.dtype == mx.float32  # the router stays float32
    theirs, _ = mlx_lm_load(str(out))
    ids = mx.array([[3, 14, 15, 92, 65, 35, 89, 79]])
    np.testing.assert_allclose(np.array(ours(ids)), np.array(theirs(ids)), rtol=1e-4, atol=1e-4)


def test_convert_rejects_unknown_recipe(air_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="Unknown quantization recipe"):
        convert(str(air_checkpoint), str(tmp_path / "x"), quant_recipe="1bit")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        convert_main(["--hf-path", str(air_checkpoint), "--mlx-path", "x", "--quant-recipe", "2"])
    assert set(RECIPES) == {"4bit", "mixed-4", "mixed-3", "mixed-2"}
