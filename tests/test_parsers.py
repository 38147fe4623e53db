"""Tests for mlx_glm4moe.parsers: corpus, streaming == batch, template round trip, messages."""

from __future__ import annotations

import copy
import json
import random
import re
import zlib
from pathlib import Path

import pytest
from parser_corpus import CASES, P45_OFF, P45_ON, P47_OFF, P47_ON, PEER_CASES, TOOLSETS

from mlx_glm4moe.parsers import StreamParser, normalize_messages, parse_assistant

TEMPLATE = Path(__file__).resolve().parents[1] / "mlx_glm4moe" / "chat_template.jinja"
TAG_PREFIXES = ("<think>", "</think>", "<tool_call>")
RANDOM_CHUNKINGS = 150  # per corpus case: 120 with pieces of 1-8 chars, 30 with pieces of 1-40

IDS = [c["name"] for c in CASES]


def _tools(c: dict) -> list | None:
    return TOOLSETS.get(c["tools"])


def _start(c: dict) -> dict:
    """The keyword arguments that say where a case's output starts."""
    return {"prompt": c["prompt"], "thinking": c["thinking"]}


def _calls(result: dict) -> list[tuple[str, dict]]:
    return [
        (t["function"]["name"], json.loads(t["function"]["arguments"]))
        for t in result["tool_calls"]
    ]


# ---- corpus: batch -----------------------------------------------------------------------------


def test_corpus_size():
    assert len(CASES) >= 40
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_corpus_batch(c):
    r = parse_assistant(c["text"], _tools(c), **_start(c))
    assert set(r) == {"content", "reasoning_content", "tool_calls", "malformed"}
    assert r["content"] == c["content"]
    assert r["reasoning_content"] == c["reasoning"]
    assert r["malformed"] == c["malformed"]
    assert _calls(r) == c["calls"]
    for call, (_, args) in zip(r["tool_calls"], c["calls"], strict=True):
        assert set(call) == {"id", "type", "function"}
        assert call["type"] == "function"
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
        # Exact wire text: insertion order kept, non-ASCII not escaped.
        assert call["function"]["arguments"] == json.dumps(args, ensure_ascii=False)
    assert len({call["id"] for call in r["tool_calls"]}) == len(r["tool_calls"])


def test_ids_deterministic_and_salted():
    c = next(c for c in CASES if c["name"] == "two_calls")
    a = parse_assistant(c["text"], _tools(c))
    assert a == parse_assistant(c["text"], _tools(c))
    b = parse_assistant(c["text"], _tools(c), id_salt="req-123")
    assert [x["id"] for x in a["tool_calls"]] != [x["id"] for x in b["tool_calls"]]
    assert _calls(a) == _calls(b)


def test_no_tools_and_empty_tools_accept_any_name():
    text = "<tool_call>anything\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
    for tools in (None, []):
        assert _calls(parse_assistant(text, tools)) == [("anything", {"a": 1})]


def test_bare_function_tools_accepted():
    tools = [{"name": "f", "parameters": {"properties": {"a": {"type": "string"}}}}]
    text = "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
    assert _calls(parse_assistant(text, tools)) == [("f", {"a": "1"})]


@pytest.mark.parametrize(
    "field",
    [
        {"type": ["string", "integer"]},
        {"type": ["integer", "string"]},
        {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    ],
)
def test_quoted_number_stays_a_string_where_strings_are_allowed(field):
    """`"123"` is a string the model quoted: where the field may be a string it is kept byte for
    byte, not unquoted into the integer 123 (only an integer field reads it as 123). A bare 123
    is still the integer."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": _value_schema(field)}}]
    for raw, value in (('"123"', '"123"'), ("123", 123)):
        text = f"<tool_call>f\n<arg_key>value</arg_key>\n<arg_value>{raw}</arg_value>\n</tool_call>"
        r = parse_assistant(text, tools, thinking=False)
        assert r["malformed"] is None
        [call] = r["tool_calls"]
        assert call["function"]["arguments"] == json.dumps({"value": value})
        _check_stream(list(text), tools, {"thinking": False}, r)
    schema = _value_schema({"type": "integer"})
    integer = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    text = '<tool_call>f\n<arg_key>value</arg_key>\n<arg_value>"123"</arg_value>\n</tool_call>'
    assert _calls(parse_assistant(text, integer, thinking=False)) == [("f", {"value": 123})]


def _value_schema(field: dict) -> dict:
    return {"type": "object", "properties": {"value": field}}


# ---- streaming == batch ------------------------------------------------------------------------


def _stream(pieces: list[str], tools, start: dict) -> tuple[list[dict], dict]:
    sp = StreamParser(tools, **start)
    events = []
    for piece in pieces:
        events += sp.feed(piece)
    events += sp.close()
    return events, sp.result()


def _check_stream(pieces: list[str], tools, start: dict, batch: dict) -> None:
    events, result = _stream(pieces, tools, start)
    assert result == batch, pieces
    reasoning = [e["delta"] for e in events if e["type"] == "reasoning"]
    content = [e["delta"] for e in events if e["type"] == "content"]
    calls = [e["tool_call"] for e in events if e["type"] == "tool_call"]
    assert all(reasoning) and all(content), "empty delta"
    assert "".join(reasoning) == (batch["reasoning_content"] or ""), pieces
    if batch["reasoning_content"] is None:
        assert not reasoning
    assert "".join(content) == batch["content"], pieces
    assert [c.pop("index") for c in calls] == list(range(len(calls)))
    assert calls == batch["tool_calls"], pieces


def _splits(text: str, seed: int, chunkings: int = RANDOM_CHUNKINGS):
    """Every single cut point, one char at a time, then seeded random chunkings (a fifth of them
    with pieces of up to 40 chars, the others up to 8)."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(seed)
    for k in range(chunkings):
        top = 8 if k < chunkings * 4 // 5 else 40
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, top)
            pieces.append(text[i : i + n])
            i += n
        yield pieces


SPLIT_COUNTS: dict[str, int] = {}


def _check_case_streaming(c: dict) -> int:
    tools, start = _tools(c), _start(c)
    batch = parse_assistant(c["text"], tools, **start)
    n = 0
    for pieces in _splits(c["text"], seed=zlib.crc32(c["name"].encode())):
        _check_stream(pieces, tools, start, batch)
        n += 1
    return n


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_streaming_equals_batch(c):
    SPLIT_COUNTS[c["name"]] = _check_case_streaming(c)


def test_streaming_split_count(capsys):
    for c in CASES:  # cases not run above (e.g. under -k) are checked here
        if c["name"] not in SPLIT_COUNTS:
            SPLIT_COUNTS[c["name"]] = _check_case_streaming(c)
    total = sum(SPLIT_COUNTS.values())
    with capsys.disabled():
        print(f"\n[parsers] streaming==batch checked on {total} splits of {len(CASES)} cases")
    assert total > 15000


def test_no_partial_tag_ever_emitted():
    # Each delta is checked when emitted: no delta may end inside a tag that completes later.
    text = "\n<think>r</think>\nab<tool_call>get_time\n</tool_call>\ncd</think>e"
    for pieces in _splits(text, seed=1):
        sp = StreamParser(TOOLSETS["basic"])
        for piece in pieces:
            for e in sp.feed(piece):
                if e["type"] != "tool_call":
                    assert not any(
                        t in e["delta"] or e["delta"].endswith(t[:k])
                        for t in TAG_PREFIXES
                        for k in range(1, len(t))
                    ), pieces


def test_leading_newlines_after_think_are_held():
    sp = StreamParser()
    assert sp.feed("\n<think>r</think>\n\n") == [{"type": "reasoning", "delta": "r"}]
    assert sp.feed("\n") == []
    assert sp.feed("Hi  ") == [{"type": "content", "delta": "Hi"}]
    assert sp.feed(" there\n") == [{"type": "content", "delta": "   there"}]
    assert sp.close() == []
    assert sp.result()["content"] == "Hi   there"


def test_tool_call_event_shape():
    sp = StreamParser(TOOLSETS["basic"])
    events = sp.feed("<tool_call>get_time\n</tool_call>")
    assert len(events) == 1 and events[0]["type"] == "tool_call"
    call = events[0]["tool_call"]
    assert call["index"] == 0 and call["function"] == {"name": "get_time", "arguments": "{}"}
    sp.close()
    with pytest.raises(RuntimeError):
        sp.feed("x")


FRAGMENTS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_",
    "</thi",
    "<",
    ">",
    "\n",
    "\n\n",
    " ",
    "\\n",
    "get_time",
    "get_weather",
    "city",
    "days",
    "Paris",
    "3",
    '{"a": [1]}',
    "null",
    "é字",
    "x < y & z",
    "{",
    '"',
]


def _rerender(r: dict) -> tuple[str, str]:
    """(prompt, text): a parse result written back in GLM-4.7's format."""
    text = "" if r["reasoning_content"] is None else r["reasoning_content"] + "</think>"
    text += r["content"]
    for name, args in _calls(r):
        text += f"<tool_call>{name}"
        for k, v in args.items():
            v = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            text += f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>"
        text += "</tool_call>"
    return (P47_OFF if r["reasoning_content"] is None else P47_ON), text


FUZZ_STARTS = [{}, {"thinking": False}, {"prompt": P45_ON}, {"prompt": P47_ON}, {"prompt": P47_OFF}]


def test_fuzz_streaming_equals_batch_and_round_trips():
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 30)))
        tools = rng.choice([None, TOOLSETS["basic"]])
        start = rng.choice(FUZZ_STARTS)
        batch = parse_assistant(text, tools, **start)
        _check_stream(list(text), tools, start, batch)
        for _ in range(3):
            cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            _check_stream(pieces, tools, start, batch)
        assert all(isinstance(args, dict) for _, args in _calls(batch))
        if batch["malformed"] is None:
            # Every tag was consumed, and the result says everything there is to say: written
            # back out and parsed again, it gives itself.
            for tag in ("<think>", "</think>", "<tool_call>"):
                assert tag not in batch["content"], text
            assert "<think>" not in (batch["reasoning_content"] or ""), text
            assert "</think>" not in (batch["reasoning_content"] or ""), text
            prompt, again = _rerender(batch)
            r = parse_assistant(again, tools, prompt=prompt)
            assert (r["content"], r["reasoning_content"], _calls(r), r["malformed"]) == (
                batch["content"],
                batch["reasoning_content"],
                _calls(batch),
                None,
            ), text


# ---- peers -------------------------------------------------------------------------------------


def peer_view(r: dict) -> tuple:
    """A parse result as the peers' tests compare it (see PEER_CASES)."""
    return (
        (r["content"] or "").strip(),
        (r["reasoning_content"] or "").strip(),
        [(t["function"]["name"], _typed_json(t["function"]["arguments"])) for t in r["tool_calls"]],
    )


def peer_expected(c: dict, overrides: dict | None = None) -> tuple:
    e = {**c, **(overrides or {})}
    calls = [(name, _typed_json(json.dumps(args))) for name, args in e["calls"]]
    return ((e["content"] or "").strip(), (e["reasoning"] or "").strip(), calls)


def _typed_json(arguments: str) -> str:
    return json.dumps(json.loads(arguments), sort_keys=True)  # 1, 1.0 and true stay apart


def emitted_before_close(c: dict) -> dict:
    sp = StreamParser(c["tools"], prompt=c["prompt"])
    events = sp.feed(c["text"])
    return {
        kind: "".join(e["delta"] for e in events if e["type"] == kind).strip()
        for kind in ("content", "reasoning")
    }


def test_peer_corpus_size(capsys):
    assert len(PEER_CASES) >= 280
    assert len({c["name"] for c in PEER_CASES}) == len(PEER_CASES)
    differ = sum(bool(c["differs"]) for c in PEER_CASES)
    with capsys.disabled():
        print(
            f"\n[parsers] peer corpus: {len(PEER_CASES)} cases, "
            f"{len(PEER_CASES) - differ} agree, {differ} differ on purpose"
        )


@pytest.mark.parametrize("c", PEER_CASES, ids=[c["name"] for c in PEER_CASES])
def test_peer_case(c):
    r = parse_assistant(c["text"], c["tools"], prompt=c["prompt"])
    agrees = peer_view(r) == peer_expected(c)
    if c["differs"]:
        assert not agrees, "agrees with the peer now: drop its 'differs' note"
        assert peer_view(r) == peer_expected(c, c["ours"])
    else:
        assert agrees
    if c["emitted"]:
        emitted = emitted_before_close(c)
        assert {k: emitted[k] for k in c["emitted"]} == c["emitted"]
    start = {"prompt": c["prompt"]}
    for pieces in _splits(c["text"], seed=zlib.crc32(c["name"].encode()), chunkings=20):
        _check_stream(pieces, c["tools"], start, r)


TAGS = ("<think>", "</think>", "<tool_call>")


def _given_prompt(c: dict) -> str:
    return c["prompt"] or (P45_ON if c["thinking"] else P45_OFF)


@pytest.mark.parametrize("c", CASES + PEER_CASES, ids=[c["name"] for c in CASES + PEER_CASES])
def test_streaming_holds_back_only_what_may_be_a_tag(c):
    """After every character, what close() would still flush is whitespace, the start of a
    tag, or an unfinished tool call: nothing else waits for the end of the generation."""
    tools = c["tools"] if isinstance(c["tools"], list) else _tools(c)
    sp = StreamParser(tools, prompt=_given_prompt(c))
    for ch in c["text"]:
        sp.feed(ch)
        flushed = "".join(
            e["delta"] for e in copy.deepcopy(sp).close() if e["type"] != "tool_call"
        ).strip()
        assert (
            not flushed
            or any(t.startswith(flushed) for t in TAGS)
            or flushed.startswith("<tool_call>")
        ), (c["text"], flushed)


# ---- round trip through the real chat template -------------------------------------------------


def _render(messages: list[dict], tools) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=TEMPLATE.read_text(),
        tools=tools,
        add_generation_prompt=False,
    )
    return rendered[0]


RT_TOOLS = TOOLSETS["basic"] + TOOLSETS["typed"]
ROUND_TRIPS = [
    {
        "reasoning_content": "Two tools.\nFirst edit, then configure.",
        "content": "I'll make the change & configure <it>.",
        "tool_calls": [
            (
                "edit_file",
                {
                    "path": "src/ä.py",
                    "old": "x = 1\n",
                    "new": "if a < b and c > d:\n    s = \"q\" + '&'\n",
                },
            ),
            (
                "configure",
                {
                    "count": 3,
                    "ratio": 1.5,
                    "enabled": False,
                    "options": {"a": [1, None]},
                    "tags": ["x", "y"],
                    "note": None,
                    "mode": "slow",
                    "limit": 7,
                    "level": 1,
                    "nothing": None,
                    "payload": {"k": "v"},
                },
            ),
        ],
    },
    {"content": "", "tool_calls": [("get_time", {})]},
    {"content": "", "tool_calls": [("search", {"query": '{"looks": "like json"}', "filters": {}})]},
    {
        "content": "",
        "tool_calls": [
            ("edit_file", {"path": "\nleading and trailing\n", "new": "   ", "old": ""})
        ],
    },
    {"content": "Plain answer with 中文 and emoji 🎉\n\nSecond paragraph.", "tool_calls": []},
    {"reasoning_content": "Only thinking then answer.", "content": "Answer.", "tool_calls": []},
    {
        "content": "Weather for two cities:",
        "tool_calls": [
            ("get_weather", {"city": "São Paulo", "days": 2, "unit": "celsius"}),
            ("get_weather", {"city": "123"}),
        ],
    },
]


@pytest.mark.parametrize("msg", ROUND_TRIPS, ids=[str(i) for i in range(len(ROUND_TRIPS))])
@pytest.mark.parametrize("wire", [False, True], ids=["dict_args", "json_string_args"])
def test_template_round_trip(msg, wire):
    calls = [
        {
            "id": f"c{i}",
            "type": "function",
            "function": {
                "name": name,
                "arguments": json.dumps(args) if wire else copy.deepcopy(args),
            },
        }
        for i, (name, args) in enumerate(msg["tool_calls"])
    ]
    assistant = {"role": "assistant", "content": msg["content"]}
    if "reasoning_content" in msg:
        assistant["reasoning_content"] = msg["reasoning_content"]
    if calls:
        assistant["tool_calls"] = calls
    messages = [{"role": "user", "content": "Do the thing."}, assistant]
    text = _render(normalize_messages(messages), RT_TOOLS).split("<|assistant|>")[-1]
    assert text.startswith("\n<think>")
    r = parse_assistant(text, RT_TOOLS, thinking=True)
    assert r["malformed"] is None
    assert r["content"] == msg["content"].strip()
    assert r["reasoning_content"] == msg.get("reasoning_content", "").strip()
    assert _calls(r) == msg["tool_calls"]
    # Exact types too (1 vs 1.0 vs True compare equal in Python).
    assert [c["function"]["arguments"] for c in r["tool_calls"]] == [
        json.dumps(a, ensure_ascii=False) for _, a in msg["tool_calls"]
    ]
    _check_stream(list(text), RT_TOOLS, {}, r)


def test_template_round_trip_without_tools_schema():
    args = {"city": "Paris", "days": 3, "flags": [True, None], "opts": {"deep": {"x": 1.5}}}
    messages = normalize_messages(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "lookup", "arguments": json.dumps(args)}}],
            },
        ]
    )
    text = _render(messages, None).split("<|assistant|>")[-1]
    assert text.startswith("\n<think></think>\n<tool_call>lookup\n")  # no "None" content
    r = parse_assistant(text)
    assert (r["content"], r["reasoning_content"], _calls(r)) == ("", "", [("lookup", args)])


# ---- normalize_messages ------------------------------------------------------------------------


def test_normalize_messages():
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": None},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": [2]}}},
                {
                    "id": "c",
                    "type": "function",
                    "function": {"name": "h", "arguments": "{not json"},
                },
                {"id": "d", "type": "function", "function": {"name": "i", "arguments": "[1, 2]"}},
                {"id": "e", "type": "function", "function": {"name": "j", "arguments": ""}},
                {"id": "f", "type": "function", "function": {"name": "k", "arguments": None}},
                {"name": "flat", "arguments": '{"z": "é"}'},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": '{"x": 1}'},
    ]
    before = copy.deepcopy(messages)
    out = normalize_messages(messages)
    assert messages == before  # input untouched
    assert out[0] == messages[0] and out[0] is not messages[0]
    assert out[1]["content"] == "" and out[2]["content"] == ""
    got = [c.get("function", c)["arguments"] for c in out[2]["tool_calls"]]
    assert got == [
        {"x": 1},
        {"y": [2]},
        {"raw_arguments": "{not json"},
        {"raw_arguments": "[1, 2]"},
        {},
        {},
        {"z": "é"},
    ]
    assert out[3] == messages[3]  # tool message content is not parsed
    assert [c.get("id") for c in out[2]["tool_calls"]] == ["a", "b", "c", "d", "e", "f", None]
    assert "<arg_value>{not json</arg_value>" in _render(out, None)


def test_normalize_messages_passes_through_odd_shapes():
    messages = [{"role": "assistant", "content": "x", "tool_calls": None}, "junk"]
    assert normalize_messages(messages) == messages
    assert normalize_messages([]) == []
