"""Thinking budgets: the reasoning gets exactly its budget of tokens, then ``</think>`` is forced
and the answer follows; in plain, batched and MTP decoding, under a grammar, and from each API's
field (Anthropic's budget_tokens, OpenAI's reasoning_effort, the Responses API's
reasoning.effort) or the server's default. The bundled demo model opens ``<think>`` itself
(GLM-4.5's template)."""

import json
import queue

import anthropic
import jsonschema
import mlx.core as mx
import openai
import pytest
from fastapi.testclient import TestClient
from test_server import main_kwargs, serving

from mlx_glm4moe import thinking
from mlx_glm4moe.batch import BatchEngine, Request
from mlx_glm4moe.chat import render_prompt
from mlx_glm4moe.constrain import Constraints
from mlx_glm4moe.generate import encode
from mlx_glm4moe.loading import load
from mlx_glm4moe.server import create_app, main

POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Where is the point?"}]


@pytest.fixture(scope="module")
def demo():
    with mx.stream(mx.cpu):
        yield load()


def ids(tokenizer):
    t = tokenizer.convert_tokens_to_ids
    return t("<think>"), t("</think>"), min(tokenizer.eos_token_ids), tokenizer.encode("the")[-1]


def thinks_forever(tokenizer, answer=False):
    """A model that opens <think>, then writes one word forever unless </think> is forced (the
    only token left), and then stops, or with `answer` answers greedily."""
    open_, close, eos, word = ids(tokenizer)
    drawn = []

    def sample(logprobs):
        if close in drawn:
            token = mx.argmax(logprobs, axis=-1).item() if answer else eos
        elif not drawn:
            token = open_
        elif mx.isfinite(logprobs).sum().item() == 1:
            token = mx.argmax(logprobs, axis=-1).item()
        else:
            token = word
        drawn.append(token)
        return mx.array([token])

    return sample


def generate(engine, requests):
    out = []
    for r in requests:
        events = queue.SimpleQueue()
        r.emit = events.put
        out.append(events)
        engine.submit(r)
    results = []
    for events in out:
        tokens = []
        while (event := events.get(timeout=120))["type"] == "token":
            tokens.append(event["token"])
        assert event["type"] == "done", event
        results.append(tokens)
    return results


@pytest.mark.parametrize("mtp", [False, True])
def test_the_reasoning_gets_exactly_its_budget(demo, mtp):
    """Three requests decoded together with budgets 0, 1 and 5: each reasons that many tokens,
    then </think> comes, then the answer (here: the stop token)."""
    model, tokenizer = demo
    open_, close, eos, word = ids(tokenizer)
    prompt = encode(tokenizer, render_prompt(tokenizer, ASK, None, True))
    engine = BatchEngine(model, tokenizer, decode_concurrency=3, mtp=mtp, num_draft=2)
    try:
        budgets = [0, 1, 5]
        requests = [
            Request(
                prompt, 50, None, make_sampler=lambda: thinks_forever(tokenizer), thinking_budget=b
            )
            for b in budgets
        ]
        results = generate(engine, requests)
    finally:
        engine.close()
    for tokens, b in zip(results, budgets, strict=True):
        assert tokens == [open_] + [word] * b + [close, eos]


def reasoning_and_answer(tokenizer, tokens):
    """The tokens between <think> and </think>, and the answer's text."""
    open_, close, _, _ = ids(tokenizer)
    end = tokens.index(close)
    return tokens[tokens.index(open_) + 1 : end], tokenizer.decode(tokens[end + 1 : -1])


def test_budget_grammar_and_mtp_together(demo):
    """Greedy, batched, with MTP and a JSON schema: each request reasons for its budget, then
    answers JSON that fits, the same tokens as without MTP."""
    model, tokenizer = demo
    open_, close, _, _ = ids(tokenizer)
    constraints = Constraints(tokenizer, model.args.vocab_size)
    text = render_prompt(tokenizer, ASK, None, True)
    prompt = encode(tokenizer, text)

    def make():
        # A compiled grammar holds its request's parse state: one per request, as the server.
        fmt = {"type": "json_schema", "json_schema": {"schema": POINT}}
        grammar = constraints.check(fmt, None, None)
        return constraints.sampler(grammar, lambda lp: mx.argmax(lp, axis=-1), text, True)

    budgets = [3, 9, 20]
    results = {}
    for mtp in (False, True):
        engine = BatchEngine(model, tokenizer, decode_concurrency=3, mtp=mtp, num_draft=2)
        try:
            requests = [
                Request(prompt, 120, None, make_sampler=make, thinking_budget=b) for b in budgets
            ]
            results[mtp] = generate(engine, requests)
        finally:
            engine.close()
        if mtp:
            assert engine.metrics.draft_accepted_total > 0
    assert results[True] == results[False]
    for tokens, b in zip(results[True], budgets, strict=True):
        reasoning, answer = reasoning_and_answer(tokenizer, tokens)
        assert len(reasoning) == b
        jsonschema.validate(json.loads(answer), POINT)


@pytest.fixture(scope="module")
def url(demo):
    model, tokenizer = demo
    app = create_app(
        model,
        tokenizer,
        sampler_factory=lambda job: thinks_forever(tokenizer),
        thinking_budget=6,
        prompt_cache_bytes=0,
    )
    with serving(app) as url:
        yield url


def spent(completion_tokens):
    """The reasoning's tokens in a thinks_forever reply: all but <think>, </think> and the
    stop."""
    return completion_tokens - 3


@pytest.fixture
def low(monkeypatch):
    monkeypatch.setitem(thinking.EFFORT_BUDGETS, "low", 4)


def test_openai_reasoning_effort(url, low):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model="demo", messages=ASK, reasoning_effort="low")
    assert spent(r.usage.completion_tokens) == 4
    assert r.choices[0].message.reasoning_content
    r = client.chat.completions.create(model="demo", messages=ASK)  # the server's default
    assert spent(r.usage.completion_tokens) == 6


def test_responses_reasoning_effort(url, low):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    r = client.responses.create(model="demo", input="Where?", reasoning={"effort": "low"})
    assert spent(r.usage.output_tokens) == 4


def test_anthropic_budget_tokens(url):
    claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    r = claude.messages.create(
        model="demo",
        max_tokens=100,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 2},
    )
    assert spent(r.usage.output_tokens) == 2
    assert r.content[0].type == "thinking"


def test_a_forced_call_keeps_room_for_its_answer(demo):
    """A model that would think all of its 200 tokens away, asked for a tool call without a
    budget: half stay for the call."""
    model, tokenizer = demo
    word = ids(tokenizer)[3]
    tool = {"type": "function", "function": {"name": "locate", "parameters": POINT}}
    app = create_app(
        model,
        tokenizer,
        sampler_factory=lambda job: thinks_forever(tokenizer, answer=True),
        prompt_cache_bytes=0,
    )
    with TestClient(app) as http:
        body = {"messages": ASK, "max_tokens": 200, "tools": [tool], "tool_choice": "required"}
        r = http.post("/v1/chat/completions", json=body).json()
    message = r["choices"][0]["message"]
    assert message["reasoning_content"] == tokenizer.decode([word] * 100)
    [call] = message["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), POINT)
    assert r["choices"][0]["finish_reason"] == "tool_calls"


def test_server_flag(monkeypatch):
    assert main_kwargs(monkeypatch, ["--thinking-budget", "300"])["thinking_budget"] == 300
    assert main_kwargs(monkeypatch, [])["thinking_budget"] is None
    with pytest.raises(SystemExit) as e:
        main(["--thinking-budget", "-1"])
    assert e.value.code == 2
