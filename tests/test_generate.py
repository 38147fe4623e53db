"""Generation: the decode loop, stopping, cancellation, and the command line."""

import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_glm4moe import generate, load, stream_generate

PROMPT = "Hello world, how are you?"


@pytest.fixture(scope="module")
def q4(air_q4):
    return load(air_q4)


def test_greedy_tokens_match_full_recompute(q4):
    """Each cached decode step picks the argmax of a fresh full forward pass."""
    model, tokenizer = q4
    # Greedy over the tokens that do not stop generation, so that all 12 steps are checked.
    no_stop = (
        mx.zeros(model.args.vocab_size).at[mx.array(sorted(tokenizer.eos_token_ids))].add(-mx.inf)
    )
    greedy = lambda logprobs: mx.argmax(logprobs + no_stop, axis=-1)  # noqa: E731
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=12, sampler=greedy))
    assert len(responses) == 12 and responses[-1].finish_reason == "length"
    tokens = tokenizer.encode(PROMPT)
    for r in responses:
        assert r.token == int(mx.argmax(model(mx.array([tokens]))[0, -1] + no_stop))
        tokens.append(r.token)


def test_response_fields_and_length_limit(q4):
    model, tokenizer = q4
    never_stop = lambda logprobs: mx.array([5])  # noqa: E731 - a token that is no stop id
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=7, sampler=never_stop))
    assert len(responses) == 7
    assert [r.finish_reason for r in responses] == [None] * 6 + ["length"]
    last = responses[-1]
    assert last.generation_tokens == 7 and last.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory >= 0
    assert last.logprobs.shape == (model.args.vocab_size,)
    text = "".join(r.text for r in responses)
    assert text == tokenizer.decode([5] * 7)
    assert generate(model, tokenizer, PROMPT, max_tokens=7, sampler=never_stop) == text


@pytest.mark.parametrize("stop", ["<|endoftext|>", "<|user|>", "<|observation|>"])
def test_stops_on_every_glm_stop_token(q4, stop):
    model, tokenizer = q4
    stop_id = tokenizer.convert_tokens_to_ids(stop)
    script = iter([7, 8, stop_id, 9])
    responses = list(
        stream_generate(
            model, tokenizer, PROMPT, max_tokens=10, sampler=lambda _: mx.array([next(script)])
        )
    )
    assert [r.token for r in responses] == [7, 8, stop_id]
    assert responses[-1].finish_reason == "stop" and responses[-1].text == ""


def test_cancel_from_another_thread(q4):
    model, tokenizer = q4
    cancel = threading.Event()
    seen = []
    for r in stream_generate(
        model, tokenizer, PROMPT, max_tokens=1000, cancel=cancel, sampler=lambda _: mx.array([5])
    ):
        seen.append(r)
        if len(seen) == 3:
            setter = threading.Thread(target=cancel.set)
            setter.start()
            setter.join()  # set before the next token is produced
    assert [r.finish_reason for r in seen] == [None, None, None, "cancelled"]


def test_token_prompt_and_empty_prompt(q4):
    model, tokenizer = q4
    ids = tokenizer.encode(PROMPT)
    a = generate(model, tokenizer, ids, max_tokens=5)
    assert a == generate(model, tokenizer, PROMPT, max_tokens=5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tokenizer, [], max_tokens=5)


def test_chat_template_thinking_switch(q4):
    _, tokenizer = q4
    messages = [{"role": "user", "content": "hi"}]
    on = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    off = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert on == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    assert off == "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "generate.py", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_runs_on_bundled_default():
    r = run_cli("--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "bundled" in r.stderr
    assert "Generation:" in r.stderr and "Peak memory" in r.stderr


def test_cli_model_and_flags(air_q4):
    r = run_cli(
        "--model",
        str(air_q4),
        "--prompt",
        "hi",
        "--no-think",
        "--max-tokens",
        "4",
        "--temp",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "Prompt:" in r.stderr and "bundled" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "No model folder at /nonexistent/model"),
        (["--max-tokens", "0"], "--max-tokens and --num-draft must be at least 1"),
        (["--top-p", "1.5"], "0 < --top-p <= 1"),
    ],
)
def test_cli_bad_input(args, message):
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_greedy_is_deterministic_and_seeded_sampling_repeats(q4):
    model, tokenizer = q4
    a = generate(model, tokenizer, PROMPT, max_tokens=8, temp=0.9, seed=3)
    b = generate(model, tokenizer, PROMPT, max_tokens=8, temp=0.9, seed=3)
    assert a == b
    g = [generate(model, tokenizer, PROMPT, max_tokens=8) for _ in range(2)]
    assert g[0] == g[1]
    assert np.isfinite(np.array(model(mx.array([tokenizer.encode(PROMPT)])))).all()
