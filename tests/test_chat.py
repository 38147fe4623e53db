"""chat() / stream_chat(), PromptCache and the chat command line, on the tiny random fixture.

The fixture's weights are random, so where a test needs specific assistant text it scripts the
generation: a sampler that ignores the logits and emits the fixture tokenizer's tokens for that
text, then a stop token. Everything else (template, tokenization, decoding loop, detokenizer,
parser) runs for real.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import pty
import select
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from parser_corpus import CONFIGURE, EDIT, TIME, WEATHER

from mlx_glm4moe import load
from mlx_glm4moe.chat import PromptCache, chat, encode_messages, render_prompt, stream_chat
from mlx_glm4moe.cli import ReplyPrinter, generate_main, interactive, load_tools

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [WEATHER]  # each tool adds ~150 prompt tokens to prefill
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
REPLY = (
    "\n<think>The user wants the weather.\nCall the tool.</think>\n"
    "Let me check that for you.\n"
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
)


@pytest.fixture(scope="module")
def loaded(air_checkpoint):
    return load(air_checkpoint)


def stop_id(tokenizer, name: str = "<|observation|>") -> int:
    token = tokenizer.convert_tokens_to_ids(name)
    assert token in tokenizer.eos_token_ids
    return token


def scripted(tokenizer, text: str, stop: str = "<|observation|>"):
    """A sampler emitting `text`'s tokens, then the stop token (repeated: generation reads one
    step ahead)."""
    queue = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(queue) == text
    end = stop_id(tokenizer, stop)

    def sampler(logprobs: mx.array) -> mx.array:
        return mx.array(queue.pop(0) if queue else end)

    return sampler


def recording(log: list):
    """Greedy, keeping every logprobs vector it saw."""

    def sampler(logprobs: mx.array) -> mx.array:
        log.append(np.array(logprobs))
        return mx.argmax(logprobs, axis=-1)

    return sampler


def weather(city="Paris", days=3):
    return {"name": "get_weather", "arguments": dumps({"city": city, "days": days})}


def dumps(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)  # as the parser writes arguments


# ---- chat() / stream_chat() -------------------------------------------------------------------


def test_chat_returns_the_parsed_message(loaded):
    model, tok = loaded
    n_reply = len(tok.encode(REPLY, add_special_tokens=False))
    r = chat(model, tok, USER, TOOLS, sampler=scripted(tok, REPLY), id_salt="t")
    calls = r.pop("tool_calls")
    assert r == {
        "role": "assistant",
        "content": "Let me check that for you.",
        "reasoning_content": "The user wants the weather.\nCall the tool.",
        "finish_reason": "tool_calls",
        "usage": {
            "prompt_tokens": len(encode_messages(tok, USER, TOOLS)),
            "completion_tokens": n_reply + 1,  # the stop token counts
            "cached_tokens": 0,
            "cache_creation_tokens": 0,
        },
        "malformed": None,
    }
    assert len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_")
    # Typed from the schema: "3" is an integer, "Paris" stays a string.
    assert calls[0]["function"] == weather()


def test_stream_chat_events_add_up_to_the_message(loaded):
    model, tok = loaded
    events = list(stream_chat(model, tok, USER, TOOLS, sampler=scripted(tok, REPLY), id_salt="t"))
    done = events.pop()
    assert done["type"] == "done" and done["finish_reason"] == "tool_calls"
    kinds = [e["type"] for e in events]
    assert kinds == sorted(kinds, key=["reasoning", "content", "tool_call"].index)
    assert len([k for k in kinds if k == "reasoning"]) > 1  # streamed, not dumped at the end
    msg = done["message"]
    assert (
        "".join(e["delta"] for e in events if e["type"] == "reasoning") == msg["reasoning_content"]
    )
    assert "".join(e["delta"] for e in events if e["type"] == "content") == msg["content"]
    streamed = [e["tool_call"] for e in events if e["type"] == "tool_call"]
    assert [{k: v for k, v in c.items() if k != "index"} for c in streamed] == msg["tool_calls"]
    batch = chat(model, tok, USER, TOOLS, sampler=scripted(tok, REPLY), id_salt="t")
    assert {k: batch[k] for k in msg} == msg


def test_call_ids_differ_between_requests_by_default(loaded):
    model, tok = loaded
    a, b = (chat(model, tok, USER, sampler=scripted(tok, REPLY)) for _ in range(2))
    assert a["tool_calls"][0]["function"] == b["tool_calls"][0]["function"]
    assert a["tool_calls"][0]["id"] != b["tool_calls"][0]["id"]


def test_thinking_off(loaded):
    model, tok = loaded
    prompt = tok.decode(encode_messages(tok, USER, enable_thinking=False))
    assert prompt.endswith("Paris?/nothink<|assistant|>\n<think></think>")
    r = chat(
        model, tok, USER, enable_thinking=False, sampler=scripted(tok, "\nIt is sunny.", "<|user|>")
    )
    assert (r["content"], r["reasoning_content"], r["finish_reason"]) == (
        "It is sunny.",
        None,
        "stop",
    )


GLM47_TEMPLATE = (Path(__file__).parent / "glm47_chat_template.jinja").read_text()
REPLY_47 = (
    "The user wants the weather.</think>Let me check."
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
    "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
)


@pytest.fixture
def glm47(loaded):
    """The fixture model with a GLM-4.7-style chat template."""
    model, tok = loaded
    hf = tok._tokenizer
    saved, hf.chat_template = hf.chat_template, GLM47_TEMPLATE
    yield model, tok
    hf.chat_template = saved


def test_glm47_thinking_on_starts_inside_reasoning(glm47):
    model, tok = glm47
    assert render_prompt(tok, USER, TOOLS).endswith("Paris?<|assistant|><think>")
    events = list(stream_chat(model, tok, USER, TOOLS, sampler=scripted(tok, REPLY_47)))
    done = events.pop()
    assert events[0]["type"] == "reasoning"  # from the first token on, not held back
    assert [e["type"] for e in events].count("reasoning") > 1
    assert done["message"]["reasoning_content"] == "The user wants the weather."
    assert done["message"]["content"] == "Let me check."
    assert [c["function"] for c in done["message"]["tool_calls"]] == [weather()]
    assert (done["finish_reason"], done["malformed"]) == ("tool_calls", None)


def test_glm47_stopped_inside_reasoning_stays_reasoning(glm47):
    model, tok = glm47
    r = chat(model, tok, USER, TOOLS, max_tokens=4, sampler=scripted(tok, REPLY_47))
    assert r["finish_reason"] == "length" and r["content"] == "" and not r["tool_calls"]
    assert r["reasoning_content"] and "The user wants the weather.".startswith(
        r["reasoning_content"]
    )
    assert r["malformed"] == "unclosed_think"


def test_glm47_thinking_off_is_all_content(glm47):
    model, tok = glm47
    assert render_prompt(tok, USER, enable_thinking=False).endswith("<|assistant|></think>")
    reply = "No thinking.<tool_call>get_time</tool_call>"
    # enable_thinking in chat_template_kwargs wins over the argument (as the server passes it)
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    r = chat(model, tok, USER, [TIME], sampler=scripted(tok, reply), **kwargs)
    assert (r["content"], r["reasoning_content"]) == ("No thinking.", None)
    assert [c["function"] for c in r["tool_calls"]] == [{"name": "get_time", "arguments": "{}"}]


def test_chat_template_kwargs_reach_the_template(glm47):
    model, tok = glm47
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
        *USER,
    ]
    cleared = render_prompt(tok, history)
    kept = render_prompt(tok, history, chat_template_kwargs={"clear_thinking": False})
    assert "<think>Greet back.</think>Hello." in kept
    assert "Greet back." not in cleared
    assert encode_messages(tok, history, chat_template_kwargs={"clear_thinking": False}) == (
        tok.encode(kept, add_special_tokens=False)
    )
    r = chat(
        model,
        tok,
        history,
        chat_template_kwargs={"clear_thinking": False},
        sampler=scripted(tok, "Fine.</think>Sunny.", "<|user|>"),
    )
    assert r["usage"]["prompt_tokens"] == len(tok.encode(kept, add_special_tokens=False))
    assert (r["reasoning_content"], r["content"]) == ("Fine.", "Sunny.")
    for bad in ({"tools": []}, {"add_generation_prompt": False}, ["clear_thinking"]):
        with pytest.raises(ValueError, match="chat_template_kwargs"):
            chat(model, tok, USER, chat_template_kwargs=bad)


def test_interleaved_thinking_streams_as_reasoning(loaded):
    model, tok = loaded
    reply = (
        "\n<think>Time first.</think>\n<tool_call>get_time\n</tool_call>\n"
        "<think>Then the weather.</think>\n" + REPLY.split("\n", 3)[3]
    )
    events = list(stream_chat(model, tok, USER, [TIME, WEATHER], sampler=scripted(tok, reply)))
    done = events.pop()
    kinds = [e["type"] for e in events]
    first_call = kinds.index("tool_call")
    assert "reasoning" in kinds[first_call:]  # the second block streams as reasoning
    msg = done["message"]
    assert msg["reasoning_content"] == "Time first.\n\nThen the weather."
    assert "think>" not in msg["content"] and msg["content"] == "Let me check that for you."
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_time", "get_weather"]


def test_length_and_cancel_finish_reasons(loaded):
    model, tok = loaded
    r = chat(model, tok, USER, enable_thinking=False, max_tokens=5, sampler=scripted(tok, REPLY))
    assert (r["finish_reason"], r["usage"]["completion_tokens"]) == ("length", 5)
    import threading

    cancel = threading.Event()
    cancel.set()
    r = chat(model, tok, USER, max_tokens=50, cancel=cancel)
    assert r["finish_reason"] == "cancelled"


def test_history_with_json_string_arguments(loaded):
    """OpenAI clients send arguments as a JSON string; the template needs a dict."""
    model, tok = loaded

    def history(arguments):
        fn = {**weather(), "arguments": arguments}
        call = {"id": "call_1", "type": "function", "function": fn}
        return USER + [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]

    wire = history(json.dumps({"city": "Paris", "days": 3}))
    as_dict = history({"city": "Paris", "days": 3})
    before = copy.deepcopy(wire)
    tokens = encode_messages(tok, wire, TOOLS)
    assert tokens == encode_messages(tok, as_dict, TOOLS)
    assert wire == before  # the caller's messages are not modified
    text = tok.decode(tokens)
    assert "<arg_value>3</arg_value>" in text and "<|observation|>\n<tool_response>" in text
    sampler = scripted(tok, "\n<think></think>\nIt is 21.", "<|user|>")
    r = chat(model, tok, wire, TOOLS, sampler=sampler)
    assert (r["content"], r["reasoning_content"]) == ("It is 21.", "")


ROUND_TRIPS = {
    "two_calls": ([WEATHER], [weather("São Paulo", 2), weather("123", 1)]),
    "code_string": (
        [EDIT],
        [
            {
                "name": "edit_file",
                "arguments": dumps(
                    {"path": "a.py", "old": "x = 1\n", "new": 'if a < b:\n    s = "&"\n'}
                ),
            }
        ],
    ),
    "typed": (
        [CONFIGURE],
        [
            {
                "name": "configure",
                "arguments": dumps(
                    {
                        "count": 3,
                        "ratio": 1.5,
                        "enabled": False,
                        "tags": ["x"],
                        "note": None,
                        "options": {"a": [1, None]},
                    }
                ),
            }
        ],
    ),
}


@pytest.mark.parametrize("tools,calls", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_through_template_tokens_and_generation(loaded, tools, calls):
    """History → chat template → tokens → (scripted) generation → parse gives the same calls."""
    model, tok = loaded
    assistant = {
        "role": "assistant",
        "content": "Doing it.",
        "reasoning_content": "Plan it.",
        "tool_calls": [{"id": "c", "type": "function", "function": c} for c in calls],
    }
    rendered = tok.decode(encode_messages(tok, USER + [assistant], tools))
    reply = rendered.split("<|assistant|>")[-2]  # the last one is the generation prompt
    prompt_tokens = encode_messages(tok, USER, tools)
    r = chat(model, tok, USER, tools, sampler=scripted(tok, reply), id_salt="rt")
    assert [c["function"] for c in r["tool_calls"]] == calls
    assert (r["content"], r["reasoning_content"]) == ("Doing it.", "Plan it.")
    assert r["usage"]["prompt_tokens"] == len(prompt_tokens)


def test_bad_input_is_a_clear_error(loaded):
    model, tok = loaded
    for messages in ([], "hi", [{"content": "no role"}], [{"role": "wizard", "content": "x"}]):
        with pytest.raises(ValueError, match="role|messages"):
            chat(model, tok, messages)
    with pytest.raises(ValueError, match="tools"):
        chat(model, tok, USER, tools={"not": "a list"})


# ---- PromptCache ------------------------------------------------------------------------------


def test_multi_turn_reuse_gives_identical_outputs(loaded):
    """A conversation (thinking on, so earlier reasoning is dropped from later prompts) through
    one PromptCache gives exactly the logits and tokens of the same turns without it."""
    model, tok = loaded
    cache = PromptCache(model)
    messages = [{"role": "system", "content": "Be brief."}]
    questions = ["Hello! How are you today?", "Tell me about Paris.", "And the weather?"]
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        reused, fresh = [], []
        a = chat(model, tok, messages, max_tokens=12, prompt_cache=cache, sampler=recording(reused))
        b = chat(model, tok, messages, max_tokens=12, sampler=recording(fresh))
        assert len(reused) == len(fresh) == 12
        for x, y in zip(reused, fresh, strict=True):
            assert np.array_equal(x, y)
        assert {k: a[k] for k in ("content", "reasoning_content", "tool_calls")} == {
            k: b[k] for k in ("content", "reasoning_content", "tool_calls")
        }
        u = a["usage"]
        assert u["prompt_tokens"] == b["usage"]["prompt_tokens"]
        if turn:
            # Everything up to the previous reply is reused; at least one token is always fed.
            previous_prompt = len(encode_messages(tok, messages[:-2]))
            assert previous_prompt <= u["cached_tokens"] < u["prompt_tokens"]
        # Reasoning the model wrote is kept in the message; the template drops it next turn.
        messages.append(
            {
                "role": "assistant",
                "content": a["content"] or "ok",
                "reasoning_content": "secret plan",
            }
        )
    assert "secret plan" not in tok.decode(encode_messages(tok, messages + USER))


def _filled(model, tokens):
    cache = model.make_cache()
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def _last_logits(model, cache, tokens):
    return np.array(model(mx.array(tokens)[None], cache=cache)[0, -1])


def test_fetch_rules(loaded):
    model, tok = loaded
    tokens = encode_messages(tok, USER)
    pc = PromptCache(model)
    pc.store(list(tokens), _filled(model, tokens))
    full = _last_logits(model, model.make_cache(), tokens)

    # Fully cached: the last token is handed back so the model has something to feed.
    cache, rest, n = pc.fetch(tokens)
    assert (rest, n, cache[0].offset) == (tokens[-1:], len(tokens) - 1, len(tokens) - 1)
    assert np.array_equal(_last_logits(model, cache, rest), full)
    # The entry handed out was a copy: feeding it left the stored one intact.
    cache, rest, n = pc.fetch(tokens)
    assert n == len(tokens) - 1 and np.array_equal(_last_logits(model, cache, rest), full)

    # Diverging after k tokens: trimmed to the common prefix.
    other = tokens[:5] + tok.encode("Something else entirely.", add_special_tokens=False)
    cache, rest, n = pc.fetch(other)
    assert (n, rest, cache[0].offset) == (5, other[5:], 5)
    assert np.array_equal(
        _last_logits(model, cache, rest), _last_logits(model, model.make_cache(), other)
    )
    # Longer prompt: the whole entry is reused.
    longer = tokens + tok.encode(" more", add_special_tokens=False)
    assert pc.fetch(longer)[1:] == (longer[len(tokens) :], len(tokens))
    # Nothing in common: a fresh cache.
    cache, rest, n = pc.fetch([tokens[1]] + tokens)
    assert (n, cache[0].offset, len(rest)) == (0, 0, len(tokens) + 1)


def test_store_aligns_tokens_and_cache(loaded):
    model, tok = loaded
    tokens = encode_messages(tok, USER)
    pc = PromptCache(model)
    # The cache holds more than the tokens listed: trimmed to them.
    pc.store(tokens[:6], _filled(model, tokens))
    assert pc.fetch(tokens)[2] == 6
    # Tokens past the cache's length (a token sampled but never fed) are ignored.
    pc = PromptCache(model)
    pc.store(tokens + [7, 8], _filled(model, tokens))
    assert pc.fetch(tokens + [7, 8, 9])[2] == len(tokens)
    # An entry that is a prefix of a new one is superseded.
    pc.store(tokens + [7, 8], _filled(model, tokens + [7, 8]))
    assert len(pc) == 1 and pc.fetch(tokens + [7, 8, 9])[2] == len(tokens) + 2


def test_byte_cap_and_entry_cap_evict_least_recent(loaded):
    model, tok = loaded
    prompts = [encode_messages(tok, [{"role": "user", "content": q}]) for q in ("Hi", "Hello")]
    one = sum(c.nbytes for c in _filled(model, prompts[0]))
    pc = PromptCache(model, max_bytes=one * 3 // 2)
    pc.store(prompts[0], _filled(model, prompts[0]))
    pc.store(prompts[1], _filled(model, prompts[1]))
    assert len(pc) == 1 and 0 < pc.nbytes <= pc.max_bytes
    assert pc.fetch(prompts[1])[2] == len(prompts[1]) - 1
    assert pc.fetch(prompts[0])[2] < len(prompts[0]) - 1  # only the shared [gMASK]<sop>… head

    pc = PromptCache(model, max_entries=2)
    third = encode_messages(tok, [{"role": "user", "content": "Numbers"}])
    for p in prompts:
        pc.store(p, _filled(model, p))
    pc.fetch(prompts[0])  # touch: now the most recent
    pc.store(third, _filled(model, third))
    assert len(pc) == 2
    assert pc.fetch(prompts[0])[2] == len(prompts[0]) - 1
    assert pc.fetch(prompts[1])[2] < len(prompts[1]) - 1


def test_cache_kept_when_the_consumer_stops_early(loaded):
    model, tok = loaded
    pc = PromptCache(model)
    stream = stream_chat(model, tok, USER, enable_thinking=False, prompt_cache=pc, max_tokens=50)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert len(pc) == 1
    prompt = encode_messages(tok, USER, enable_thinking=False)
    assert pc.fetch(prompt + [1, 2])[2] == len(prompt)


# ---- command line -----------------------------------------------------------------------------


def test_reply_printer():
    events = [
        {"type": "reasoning", "delta": "Hmm"},
        {"type": "reasoning", "delta": ", weather."},
        {"type": "content", "delta": "Checking."},
        {
            "type": "tool_call",
            "tool_call": {"id": "x", "type": "function", "function": weather("Zürich", 1)},
        },
        {"type": "done"},
    ]
    call = 'Tool call: {"name": "get_weather", "arguments": {"city": "Zürich", "days": 1}}\n'
    plain = io.StringIO()
    printer = ReplyPrinter(plain)
    for e in events:
        printer(e)
    printer.finish()
    assert plain.getvalue() == "Thinking: Hmm, weather.\n\nChecking.\n" + call
    dim = io.StringIO()
    printer = ReplyPrinter(dim, dim=True)
    for e in events[:3]:
        printer(e)
    printer.finish()
    assert dim.getvalue() == "\033[2mHmm\033[0m\033[2m, weather.\033[0m\n\nChecking.\n"


def test_load_tools(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps({"tools": TOOLS}))
    assert load_tools(f) == TOOLS
    for bad, why in [("{", "not valid JSON"), ('{"a": 1}', "list"), ('[{"type": "x"}]', "Tool 0")]:
        f.write_text(bad)
        with pytest.raises(ValueError, match=why):
            load_tools(f)
    with pytest.raises(ValueError, match="Cannot read"):
        load_tools(tmp_path / "missing.json")


def test_cli_single_turn_with_tools(loaded, air_checkpoint, tmp_path, capsys):
    _, tok = loaded
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(TOOLS))
    generate_main(["--model", str(air_checkpoint), "--tools", str(f), "-m", "4", "-p", "Hi"])
    err = capsys.readouterr().err
    n = len(encode_messages(tok, [{"role": "user", "content": "Hi"}], TOOLS))
    assert f"Prompt: {n} tokens" in err and "Generation: 4 tokens" in err
    f.write_text("[1]")
    with pytest.raises(SystemExit, match="error: Tool 0"):
        generate_main(["--model", str(air_checkpoint), "--tools", str(f)])


def test_cli_follows_a_glm47_template(air_checkpoint, tmp_path, capsys):
    """The command line hands the rendered prompt to the parser: after GLM-4.7's `<think>` the
    (random) reply prints as reasoning from its first token; after `</think>` as content."""
    model_dir = tmp_path / "glm47"
    shutil.copytree(air_checkpoint, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = GLM47_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    generate_main(["--model", str(model_dir), "-m", "6", "-p", "Hi"])
    assert capsys.readouterr().out.startswith("Thinking: ")
    generate_main(["--model", str(model_dir), "-m", "6", "-p", "Hi", "--no-think"])
    out = capsys.readouterr().out
    assert out.strip() and "Thinking:" not in out


def test_interactive_history_and_toggles(loaded, monkeypatch, capsys):
    """Scripted replies through interactive(): history kept, earlier reasoning dropped,
    /nothink applied, prompt reused."""
    model, tok = loaded
    lines = iter(["What is the weather in Paris?", "/nothink", "Thanks!"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    replies = iter([REPLY, "\nYou are welcome."])

    def scripted_turn(*args, **kwargs):
        return stream_chat(*args, **kwargs, sampler=scripted(tok, next(replies), "<|user|>"))

    monkeypatch.setattr("builtins.input", fake_input)
    # The module, not the `chat` function the package exports under the same name.
    monkeypatch.setattr(importlib.import_module("mlx_glm4moe.cli"), "stream_chat", scripted_turn)
    pc = PromptCache(model)
    interactive(model, tok, tools=TOOLS, prompt_cache=pc)
    out, err = capsys.readouterr()
    assert "Thinking: The user wants the weather." in out
    assert 'Tool call: {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}' in out
    assert "You are welcome." in out and "Thinking off." in err
    stats = [line for line in err.splitlines() if "prompt tokens" in line]
    assert len(stats) == 2 and "(0 cached)" in stats[0] and "(0 cached)" not in stats[1]
    # The cache holds the second prompt exactly as this history renders: turn 1 with its reply
    # and call (its reasoning kept in the message, dropped by the template), /nothink applied.
    history = USER + [
        {
            "role": "assistant",
            "content": "Let me check that for you.",
            "reasoning_content": "The user wants the weather.\nCall the tool.",
            "tool_calls": [{"id": "x", "type": "function", "function": weather()}],
        },
        {"role": "user", "content": "Thanks!"},
    ]
    second = encode_messages(tok, history, TOOLS, enable_thinking=False)
    assert "The user wants the weather." not in tok.decode(second)
    assert pc.fetch(second)[2] == len(second) - 1


class Terminal:
    """The chat CLI on a pseudo-terminal."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the CLI
            try:
                os.execve(sys.executable, [sys.executable, str(ROOT / "generate.py"), *args], env)
            finally:
                os._exit(127)
        self.seen = ""  # read but not yet consumed by expect()
        self.transcript = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` appears; return everything read up to it (and consume it)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            self.read_some(deadline, text)
        before, _, self.seen = self.seen.partition(text)
        return before

    def expect_output(self, timeout: float = 120) -> None:
        """Read until something other than whitespace arrives."""
        deadline = time.monotonic() + timeout
        while not self.seen.strip():
            self.read_some(deadline, "output")

    def read_some(self, deadline: float, waiting_for: str) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {waiting_for!r}; got:\n{self.seen}")
        try:
            data = os.read(self.fd, 4096).decode(errors="replace")
        except OSError:  # the child closed the terminal
            raise AssertionError(f"exited before {waiting_for!r}; got:\n{self.seen}") from None
        self.seen += data
        self.transcript += data

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.05)[0]:
                try:
                    self.transcript += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the terminal closed: the child is exiting
                    time.sleep(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("the chat did not exit")

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_chat_session_on_a_terminal(loaded, air_checkpoint):
    model, tok = loaded
    max_tokens = 150
    term = Terminal(["--model", str(air_checkpoint), "--chat", "--max-tokens", str(max_tokens)])
    try:
        # (While the CLI starts.) It decodes greedily: pick a first message whose thinking-off
        # reply does not stop on its own, so a Ctrl-C sent as soon as it starts printing lands
        # mid-reply.
        for first in ["Tell me about Paris.", "Numbers: 1 2 3", "café", "Hi", "Why?"]:
            msgs = [{"role": "user", "content": first}]
            reply = chat(model, tok, msgs, enable_thinking=False, max_tokens=max_tokens)
            if reply["finish_reason"] == "length":
                break
        else:
            pytest.fail("no message gives a long enough reply on this fixture")

        term.expect(">>> ", timeout=300)  # the start-up imports are slow on a busy machine
        term.send("/nothink\n")
        term.expect("Thinking off.")
        term.expect(">>> ")
        term.send(first + "\n")
        term.expect(first + "\r\n")  # the echo
        term.expect_output()  # the reply has started streaming
        term.send("\x03")  # Ctrl-C mid-reply
        stats = term.expect(" generated")
        assert "[reply stopped]" in stats and "(0 cached)" in stats
        assert int(stats.rsplit(", ", 1)[1]) < max_tokens
        term.expect(">>> ")
        term.send("/think\n")
        term.expect("Thinking on.")
        term.expect(">>> ")
        term.send("Thanks!\n")
        stats = term.expect(" generated")  # a whole reply, then its stats line
        assert "stopped" not in stats
        assert int(stats.rsplit("(", 1)[1].split(" cached")[0]) > 0  # the first turn's prefix
        term.expect(">>> ")
        term.send("\x03")  # Ctrl-C at the prompt: a fresh prompt, not an exit
        term.expect(">>> ")
        term.send("\x04")  # Ctrl-D
        assert term.wait() == 0
        assert "Traceback" not in term.transcript and "Warning" not in term.transcript
    finally:
        term.kill()
