"""Structured output and forced tool calls, enforced while sampling (`constrain.py`), through
the server on the bundled demo model. Its answers are nonsense (it was trained on a few dozen
chats), which is what makes the constraint visible: whatever it would write, the answer fits.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import jsonschema
import llguidance
import mlx.core as mx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from test_server import serving

from mlx_glm4moe.constrain import Constraints
from mlx_glm4moe.loading import load
from mlx_glm4moe.parsers import parse_assistant
from mlx_glm4moe.server import create_app
from mlx_glm4moe.server.core import Engine, Spec

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "verified": {"type": "boolean"},
            },
            "required": ["city", "verified"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "number"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 30},
        "limit": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["query", "limit"],
}
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINK = "Answer at once: what is the weather in Paris?"  # the sampler bans <think>
CALL_FIRST = "Call a tool: what is the weather in Paris?"  # the first token is <tool_call>


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def demo():
    return load()


@pytest.fixture(scope="module")
def url(demo):
    model, tokenizer = demo
    think = tokenizer.convert_tokens_to_ids("<think>")

    call = tokenizer.convert_tokens_to_ids("<tool_call>")

    def scripted(job):
        prompt = job.messages[-1]["content"] if job.messages else None
        # A model that never opens <think>, with thinking on (the output starts as an answer).
        if prompt == NO_THINK:
            return lambda lp: mx.argmax(mx.where(mx.arange(lp.shape[-1]) == think, -mx.inf, lp), -1)
        if prompt == CALL_FIRST:  # opens a call at once, then samples (temperature 1)
            drawn = []

            def sample(lp):
                first = not drawn
                drawn.append(1)
                return mx.full((lp.shape[0],), call) if first else mx.random.categorical(lp)

            return sample
        return None

    app = create_app(model, tokenizer, model_id="demo", max_tokens=300, sampler_factory=scripted)
    with serving(app) as url:
        yield url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@pytest.fixture
def claude(url):
    return anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)


def thinking(on: bool) -> dict:
    return {"chat_template_kwargs": {"enable_thinking": on}}


def test_every_sample_fits_the_schema(client):
    def sample(seed):
        return client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Describe a pet."}],
            response_format=json_format(PET),
            temperature=1.0,
            seed=seed,
            extra_body=thinking(False),
        ).choices[0]

    with ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(sample, range(20)))
    answers = set()
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        answer = json.loads(choice.message.content)
        jsonschema.validate(answer, PET)
        answers.add(json.dumps(answer))
    assert len(answers) > 1  # sampled, not one forced answer


@pytest.mark.parametrize("on", [True, False])
def test_json_object(client, on):
    r = client.chat.completions.create(
        model="demo",
        messages=ASK_WEATHER,
        response_format={"type": "json_object"},
        extra_body=thinking(on),
    )
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(message.content), dict)
    assert (message.reasoning_content is not None) == on  # reasoning stays free


def test_concurrent_requests_keep_their_own_schema(client):
    def ask(schema, seed):
        r = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Describe a pet."}],
            response_format=json_format(schema),
            temperature=1.0,
            seed=seed,
            extra_body=thinking(False),
        )
        return schema, json.loads(r.choices[0].message.content)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, [PET, POINT, PET, POINT], range(4)))
    for schema, answer in answers:
        jsonschema.validate(answer, schema)


def assert_calls(message, names=SCHEMAS):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "search"}}]
)
def test_forced_tool_call(client, choice, on):
    r = client.chat.completions.create(
        model="demo",
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        extra_body=thinking(on),
    )
    assert r.choices[0].finish_reason == "tool_calls"
    message = r.choices[0].message
    assert len(message.tool_calls) == 1
    assert_calls(message, ["search"] if isinstance(choice, dict) else SCHEMAS)
    assert (message.reasoning_content is not None) == on
    assert not message.content


def test_forced_call_when_the_answer_starts_without_think(client):
    r = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": NO_THINK}],
        tools=TOOLS,
        tool_choice="required",
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.reasoning_content is None
    assert_calls(r.choices[0].message)


def test_parallel_calls_may_come_many(client):
    r = client.chat.completions.create(
        model="demo", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", temperature=1.0
    )
    assert_calls(r.choices[0].message)


def test_strict_tools_under_auto(client):
    """A model that opens a call, then samples at temperature 1: with strict tools under auto,
    every call's arguments fit (free, the demo model's nonsense would not)."""
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    for seed in range(3):
        r = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": CALL_FIRST}],
            tools=strict,
            seed=seed,
            extra_body=thinking(False),
        )
        assert r.choices[0].finish_reason == "tool_calls"
        assert_calls(r.choices[0].message)


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "search"}])
def test_anthropic_forced_tool_use(claude, choice, on):
    r = claude.messages.create(
        model="demo",
        max_tokens=300,
        messages=ASK_WEATHER,
        tools=[{"name": n, "input_schema": s} for n, s in SCHEMAS.items()],
        tool_choice={**choice, "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 1024} if on else {"type": "disabled"},
    )
    assert r.stop_reason == "tool_use"
    [use] = [b for b in r.content if b.type == "tool_use"]
    assert use.name == choice.get("name", use.name) and use.name in SCHEMAS
    jsonschema.validate(use.input, SCHEMAS[use.name])
    assert ("thinking" in {b.type for b in r.content}) == on


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": json_format({"not": {"type": "string"}})}, "response_format"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"anyOf": [WEATHER, SEARCH]},
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    *TOOLS,
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"n": {"type": "array", "not": {"maxItems": 1}}},
                            },
                            "strict": True,
                        },
                    },
                ]
            },
            "tools[2].function.parameters",
        ),
    ],
)
def test_what_cannot_be_enforced_is_a_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=ASK_WEATHER, **extra)
    assert e.value.status_code == 400
    assert e.value.body["param"].startswith(param), e.value.body
    assert "cannot" in e.value.body["message"]


def sample_text(constraints, grammar, tokenizer, vocab, seed):
    """Tokens drawn from random logits under `grammar` (thinking off), until the end token."""
    rng = np.random.default_rng(seed)
    sampler = constraints.sampler(grammar, lambda lp: mx.argmax(lp, -1), "</think>", False)
    tokens: list[int] = []
    while not tokens or tokens[-1] not in tokenizer.eos_token_ids:
        tokens.append(sampler(mx.array(rng.normal(size=(1, vocab)) * 4)).item())
    return tokenizer.decode(tokens[:-1])


def test_glm47_calls_have_no_newlines(demo):
    """GLM-4.7's template writes calls without newlines; the grammar follows the template."""
    model, tokenizer = demo
    original = tokenizer.chat_template
    tokenizer.chat_template = (Path(__file__).parent / "glm47_chat_template.jinja").read_text()
    try:
        constraints = Constraints(tokenizer, model.args.vocab_size)
    finally:
        tokenizer.chat_template = original
    grammar = constraints.grammar(None, TOOLS, "get_weather")
    text = sample_text(constraints, grammar, tokenizer, model.args.vocab_size, seed=0)
    assert text.lstrip("\n").startswith("<tool_call>get_weather<arg_key>city</arg_key><arg_value>")
    assert "\n<" not in text.lstrip("\n")
    [call] = parse_assistant(text, TOOLS, thinking=False)["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)


def test_arguments_read_back_as_their_schema_says(demo):
    """Whatever the grammar lets through, the parser reads back as arguments that fit: raw
    strings (bounded by pattern, length), enums mixing strings and numbers, local $refs,
    nullable numbers, nested objects and arrays as JSON."""
    model, tokenizer = demo
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{1,3}$"},
            "note": {"type": "string", "minLength": 1, "maxLength": 8},
            "level": {"enum": ["low", 2, None]},
            "color": {"$ref": "#/$defs/Color"},
            "size": {"type": ["integer", "null"], "minimum": 0, "maximum": 99},
            "box": {"$ref": "#/$defs/Box"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        },
        "required": ["code", "level", "color", "box"],
        "$defs": {
            "Color": {"type": "string", "enum": ["red", "dark blue"]},
            "Box": {
                "type": "object",
                "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["w"],
                "additionalProperties": False,
            },
        },
    }
    tools = [{"type": "function", "function": {"name": "paint", "parameters": schema}}]
    constraints = Constraints(tokenizer, model.args.vocab_size)
    grammar = constraints.grammar(None, tools, "required", parallel=False)
    for seed in range(8):
        text = sample_text(constraints, grammar, tokenizer, model.args.vocab_size, seed)
        reply = parse_assistant(text, tools, thinking=False)
        assert reply["malformed"] is None, text
        [call] = reply["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": json_format(PET), **thinking(False)},
        {"response_format": json_format(POINT), **thinking(True)},
        {"tools": TOOLS, "tool_choice": "required", **thinking(False)},
    ],
)
def test_constrained_mtp_equals_plain(demo, extra):
    """With MTP, in a batch, a constrained greedy answer is the one without MTP: a draft the
    grammar forbids is rejected, and the grammar sees only the tokens kept."""
    model, tokenizer = demo
    body = {"messages": ASK_WEATHER, "max_tokens": 120, **extra}
    answers = []
    for mtp in (False, True):
        app = create_app(model, tokenizer, mtp=mtp, num_draft=2, prompt_cache_bytes=0)
        with TestClient(app) as http, ThreadPoolExecutor(3) as pool:
            ask = [body, body, {"messages": ASK_WEATHER, "max_tokens": 40}]  # with a free one
            replies = list(pool.map(lambda b: http.post("/v1/chat/completions", json=b), ask))
            assert [r.status_code for r in replies] == [200] * 3
            messages = [r.json()["choices"][0]["message"] for r in replies]
            for call in (c for m in messages for c in m["tool_calls"] or ()):
                del call["id"]  # random
            answers.append(messages)
            metrics = http.get("/metrics").text
    plain, spec = answers
    assert spec == plain
    assert spec[0]["content"] or spec[0]["tool_calls"]
    accepted = next(ln for ln in metrics.splitlines() if ln.startswith("glm4moe_draft_accepted"))
    assert int(accepted.split()[-1]) > 20


@pytest.mark.parametrize(
    ("prompt_end", "thinking", "script"),
    [
        # GLM-4.7 opens <think> in the prompt: free until </think>.
        ("<|assistant|><think>", True, "Plain words, no call.</think>"),
        # GLM-4.5 leaves <think> to the model: free once it opens it.
        ("<|assistant|>", True, "\n<think>Plain words.</think>"),
    ],
)
def test_reasoning_stays_free(demo, prompt_end, thinking, script):
    """A model that reasons in words the answer's grammar forbids keeps them, and the call
    comes after (the scripted sampler prefers its next token among those allowed)."""
    model, tokenizer = demo
    constraints = Constraints(tokenizer, model.args.vocab_size)
    call = "\n<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>x</arg_value>\n"
    call += "<arg_key>limit</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    ids = iter(tokenizer.encode(script + call, add_special_tokens=False))
    eos = min(tokenizer.eos_token_ids)

    def scripted(lp):
        bonus = mx.where(mx.arange(lp.shape[-1]) == next(ids, eos), 1e9, 0.0)
        return mx.argmax(lp + bonus, -1)

    grammar = constraints.grammar(None, TOOLS, "required")
    sampler = constraints.sampler(grammar, scripted, prompt_end, thinking)
    flat = mx.zeros((1, model.args.vocab_size))
    tokens = [sampler(flat).item()]
    while tokens[-1] != eos:
        tokens.append(sampler(flat).item())
    assert tokenizer.decode(tokens[:-1]) == script + call


def test_the_grammar_is_compiled_before_the_job_runs(demo, monkeypatch):
    """The request's thread compiles its grammar, which travels with the job: the engine
    thread never compiles one, even when the cache of compiled grammars no longer holds it."""
    model, tokenizer = demo
    engine = Engine(model, tokenizer)
    try:
        engine.constraints.keep = 0  # the cache keeps nothing
        spec = Spec(messages=ASK_WEATHER, response_format=json_format(POINT))
        job = engine.prepare(None, spec, loop=None)

        def compile_again(*args, **kwargs):
            raise AssertionError("a grammar compiled when the job started")

        monkeypatch.setattr(llguidance, "LLMatcher", compile_again)
        job.prompt += "</think>"  # the answer starts at once
        sampler = engine._sampler(job)
        first = sampler(mx.zeros((1, model.args.vocab_size))).item()
        assert tokenizer.decode([first]).lstrip().startswith("{")
    finally:
        engine.batch.close()
