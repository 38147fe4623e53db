"""Realistic GLM-4.5 generations and the parse_assistant result each must give.

Each case: ``name``, ``text`` (generated text only), ``tools`` (a key of TOOLSETS or None),
``thinking`` (default True; used when ``prompt`` is None), ``prompt`` (the end of the rendered
prompt the text continues, or None) and the expected ``content``, ``reasoning`` (reasoning_content),
``calls`` (list of (name, arguments dict), in order; arguments compare as JSON text too, so the
key order matters) and ``malformed`` (None or the flag). PEER_CASES, further down, restate the
parser tests of vLLM, SGLang, mlx-lm and llama.cpp.
"""

import json


def _fn(name, properties=None, required=()):
    params = {"type": "object", "properties": properties or {}, "required": list(required)}
    fn = {"name": name, "description": name, "parameters": params}
    return {"type": "function", "function": fn}


WEATHER = _fn(
    "get_weather",
    {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    ["city"],
)
EDIT = _fn(
    "edit_file",
    {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}},
)
TIME = _fn("get_time")
SEARCH = _fn("search", {"query": {"type": "string"}, "filters": {"type": "object"}})
CONFIGURE = _fn(
    "configure",
    {
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "enabled": {"type": "boolean"},
        "options": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": ["string", "null"]},
        "mode": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "limit": {"oneOf": [{"type": "integer"}, {"type": "null"}]},
        "level": {"enum": [1, 2, 3]},
        "nothing": {"type": "null"},
        "payload": {"description": "no type given"},
    },
)

# What Pydantic's model_json_schema() writes: $defs, $ref, anyOf with null, enums, allOf.
CREATE_USER = _fn(
    "create_user",
    {
        "name": {"$ref": "#/$defs/Name"},
        "nickname": {"allOf": [{"$ref": "#/$defs/Name"}], "description": "shown name"},
        "role": {"$ref": "#/$defs/Role"},
        "address": {"$ref": "#/definitions/Address"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "manager": {"anyOf": [{"$ref": "#/$defs/Name"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Name"}},
        "active": {"type": "boolean"},
    },
)
CREATE_USER["function"]["parameters"]["$defs"] = {
    "Name": {"type": "string", "title": "Name"},
    "Role": {"enum": ["admin", "user"], "title": "Role", "type": "string"},
}
CREATE_USER["function"]["parameters"]["definitions"] = {
    "Address": {"type": "object", "properties": {"zip": {"type": "string"}}},
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "$ref": "#/$defs/LookupArgs",
            "$defs": {
                "LookupArgs": {
                    "type": "object",
                    "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                }
            },
        },
    },
}

TOOLSETS = {
    "basic": [WEATHER, EDIT, TIME, SEARCH],
    "typed": [CONFIGURE],
    "pydantic": [CREATE_USER, LOOKUP],
}

WEATHER_PARIS = (
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
)
TIME_CALL = "<tool_call>get_time\n</tool_call>"

# Ends of rendered prompts: GLM-4.5/4.6 (thinking on, off) and GLM-4.7 (thinking on, off).
P45_ON = "[gMASK]<sop><|user|>\nHi<|assistant|>"
P45_OFF = "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>"
P47_ON = "[gMASK]<sop><|user|>Hi<|assistant|><think>"
P47_OFF = "[gMASK]<sop><|user|>Hi<|assistant|></think>"


def case(
    name,
    text,
    *,
    tools=None,
    thinking=True,
    prompt=None,
    content="",
    reasoning=None,
    calls=(),
    malformed=None,
):
    return {
        "name": name,
        "text": text,
        "tools": tools,
        "thinking": thinking,
        "prompt": prompt,
        "content": content,
        "reasoning": reasoning,
        "calls": list(calls),
        "malformed": malformed,
    }


CASES = [
    # ---- reasoning / content -----------------------------------------------------------------
    case(
        "think_answer",
        "\n<think>\nThe user greets me. I should reply politely.\n</think>\n"
        "Hello! How can I help you today?",
        reasoning="The user greets me. I should reply politely.",
        content="Hello! How can I help you today?",
    ),
    case(
        "think_markdown_answer",
        "\n<think>Need a code sample.\n\nKeep it short.</think>\n\nHere it is:\n\n```python\n"
        "def add(a, b):\n    return a + b\n```\n\nHope this helps.\n",
        reasoning="Need a code sample.\n\nKeep it short.",
        content="Here it is:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
        "Hope this helps.",
    ),
    case("empty_think", "\n<think></think>\nSure.", reasoning="", content="Sure."),
    case("empty_generation", "", content=""),
    case("whitespace_only", "\n\n  \n", content=""),
    case(
        "thinking_off_plain",
        "Paris is the capital of France.",
        thinking=False,
        content="Paris is the capital of France.",
    ),
    case("thinking_off_newlines", "\nHi there!\n\n", thinking=False, content="Hi there!"),
    case(
        "thinking_off_stray_close",
        "Okay.</think>\nThe answer is 4.",
        thinking=False,
        content="Okay.\nThe answer is 4.",
    ),
    case(
        "thinking_off_reemitted_empty_think",
        "\n<think></think>\nAnswer: 42",
        thinking=False,
        reasoning="",
        content="Answer: 42",
    ),
    case(
        "no_tags_thinking_on",
        "Just an answer, no thinking.",
        content="Just an answer, no thinking.",
    ),
    case(
        "bare_close_think",
        "The user wants a haiku.\nFive, seven, five.</think>\nAutumn moonlight -\n"
        "a worm digs silently\ninto the chestnut.",
        reasoning="The user wants a haiku.\nFive, seven, five.",
        content="Autumn moonlight -\na worm digs silently\ninto the chestnut.",
    ),
    case(
        "unclosed_think",
        "\n<think>\nStep 1: compute 2+2.\nStep 2:",
        reasoning="Step 1: compute 2+2.\nStep 2:",
        malformed="unclosed_think",
    ),
    case(
        "unclosed_think_partial_close_tag",
        "\n<think>almost done</thi",
        reasoning="almost done</thi",
        malformed="unclosed_think",
    ),
    case(
        "stray_close_after_content",
        "\n<think>a</think>\nB</think> C",
        reasoning="a",
        content="B C",
    ),
    case(
        "nested_think_dropped",
        "\n<think>outer <think>inner</think>\nanswer",
        reasoning="outer inner",
        content="answer",
    ),
    case(
        "tool_call_text_inside_reasoning",
        "\n<think>I could use <tool_call>get_time</tool_call> here.</think>\nOK, one moment.",
        tools="basic",
        reasoning="I could use <tool_call>get_time</tool_call> here.",
        content="OK, one moment.",
    ),
    case(
        "angle_brackets_not_tags",
        "\n<think>x</think>\nUse a<b, <div>, <thinking> and <tool> in text; ends with <t",
        reasoning="x",
        content="Use a<b, <div>, <thinking> and <tool> in text; ends with <t",
    ),
    case(
        "truncated_at_tag_prefix",
        "\n<think>Call the tool.</think>\nLet me check.\n<tool_ca",
        reasoning="Call the tool.",
        content="Let me check.\n<tool_ca",
    ),
    # ---- tool calls --------------------------------------------------------------------------
    case(
        "think_single_call",
        "\n<think>The user asks about the weather in Paris. I'll call get_weather.</think>\n"
        + WEATHER_PARIS,
        tools="basic",
        reasoning="The user asks about the weather in Paris. I'll call get_weather.",
        calls=[("get_weather", {"city": "Paris", "days": 3})],
    ),
    case(
        "content_before_call",
        "\n<think>Need weather.</think>\nLet me look that up for you.\n" + WEATHER_PARIS,
        tools="basic",
        reasoning="Need weather.",
        content="Let me look that up for you.",
        calls=[("get_weather", {"city": "Paris", "days": 3})],
    ),
    case(
        "two_calls",
        "\n<think>Two cities.</think>\n" + WEATHER_PARIS + "\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>London</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>",
        tools="basic",
        reasoning="Two cities.",
        calls=[
            ("get_weather", {"city": "Paris", "days": 3}),
            ("get_weather", {"city": "London", "unit": "celsius"}),
        ],
    ),
    case(
        "three_calls_mixed",
        "\n<think>Do all three.</think>\nRunning three tools.\n" + TIME_CALL + "\n"
        "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>mlx glm4 moe</arg_value>\n"
        '<arg_key>filters</arg_key>\n<arg_value>{"site": "github.com", "year": 2025}'
        "</arg_value>\n</tool_call>\n" + WEATHER_PARIS,
        tools="basic",
        reasoning="Do all three.",
        content="Running three tools.",
        calls=[
            ("get_time", {}),
            ("search", {"query": "mlx glm4 moe", "filters": {"site": "github.com", "year": 2025}}),
            ("get_weather", {"city": "Paris", "days": 3}),
        ],
    ),
    case(
        "call_without_think_block",
        "\n" + TIME_CALL,
        tools="basic",
        calls=[("get_time", {})],
    ),
    case(
        "thinking_off_call",
        "I'll check the time.\n" + TIME_CALL,
        tools="basic",
        thinking=False,
        content="I'll check the time.",
        calls=[("get_time", {})],
    ),
    case(
        "content_after_call",
        "\n<think>t</think>\n" + TIME_CALL + "\nWaiting for the result.",
        tools="basic",
        reasoning="t",
        content="Waiting for the result.",
        calls=[("get_time", {})],
    ),
    case(
        "content_around_call",
        "\n<think>t</think>\nBefore.\n" + TIME_CALL + "\nAfter.\n",
        tools="basic",
        reasoning="t",
        content="Before.\n\nAfter.",
        calls=[("get_time", {})],
    ),
    case(
        "multiline_file_value",
        "\n<think>Fix the bug.</think>\n<tool_call>edit_file\n<arg_key>path</arg_key>\n"
        "<arg_value>src/app.py</arg_value>\n<arg_key>old</arg_key>\n"
        "<arg_value>def f():\n    return 0\n</arg_value>\n<arg_key>new</arg_key>\n"
        "<arg_value>def f():\n    # fixed\n    return 1\n\n\n</arg_value>\n</tool_call>",
        tools="basic",
        reasoning="Fix the bug.",
        calls=[
            (
                "edit_file",
                {
                    "path": "src/app.py",
                    "old": "def f():\n    return 0\n",
                    "new": "def f():\n    # fixed\n    return 1\n\n\n",
                },
            )
        ],
    ),
    case(
        "string_value_edge_newlines_and_spaces",
        "<tool_call>edit_file\n<arg_key>path</arg_key>\n<arg_value>\nREADME.md\n</arg_value>\n"
        "<arg_key>old</arg_key>\n<arg_value>  </arg_value>\n<arg_key>new</arg_key>\n"
        "<arg_value></arg_value>\n</tool_call>",
        tools="basic",
        calls=[("edit_file", {"path": "\nREADME.md\n", "old": "  ", "new": ""})],
    ),
    case(
        "unicode_values",
        "\n<think>用户想知道东京的天气。</think>\n好的，我来查一下。🌤\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>東京 (Tōkyō) 🗼</arg_value>\n"
        "</tool_call>",
        tools="basic",
        reasoning="用户想知道东京的天气。",
        content="好的，我来查一下。🌤",
        calls=[("get_weather", {"city": "東京 (Tōkyō) 🗼"})],
    ),
    case(
        "special_chars_in_string",
        "<tool_call>search\n<arg_key>query</arg_key>\n"
        '<arg_value>a < b && c > "d" \'e\' \\n \\u0041 <div class="x">&amp;</div></arg_value>\n'
        "</tool_call>",
        tools="basic",
        calls=[
            ("search", {"query": 'a < b && c > "d" \'e\' \\n \\u0041 <div class="x">&amp;</div>'})
        ],
    ),
    case(
        "json_text_in_string_param",
        "<tool_call>edit_file\n<arg_key>path</arg_key>\n<arg_value>package.json</arg_value>\n"
        '<arg_key>new</arg_key>\n<arg_value>{"name": "x", "version": 1}</arg_value>\n'
        "<arg_key>old</arg_key>\n<arg_value>123</arg_value>\n</tool_call>",
        tools="basic",
        calls=[
            (
                "edit_file",
                {"path": "package.json", "new": '{"name": "x", "version": 1}', "old": "123"},
            )
        ],
    ),
    case(
        "typed_scalars",
        "<tool_call>configure\n<arg_key>count</arg_key>\n<arg_value>7</arg_value>\n"
        "<arg_key>ratio</arg_key>\n<arg_value>0.25</arg_value>\n"
        "<arg_key>enabled</arg_key>\n<arg_value>true</arg_value>\n</tool_call>",
        tools="typed",
        calls=[("configure", {"count": 7, "ratio": 0.25, "enabled": True})],
    ),
    case(
        "typed_object_array",
        "<tool_call>configure\n<arg_key>options</arg_key>\n"
        '<arg_value>{"depth": 2, "names": ["α", "β"], "deep": {"x": null}}'
        "</arg_value>\n"
        '<arg_key>tags</arg_key>\n<arg_value>["a", "b<c", "d&e"]</arg_value>\n</tool_call>',
        tools="typed",
        calls=[
            (
                "configure",
                {
                    "options": {"depth": 2, "names": ["α", "β"], "deep": {"x": None}},
                    "tags": ["a", "b<c", "d&e"],
                },
            )
        ],
    ),
    case(
        "typed_nullable_string",
        "<tool_call>configure\n<arg_key>note</arg_key>\n<arg_value>null</arg_value>\n</tool_call>\n"
        "<tool_call>configure\n<arg_key>note</arg_key>\n<arg_value>123</arg_value>\n</tool_call>\n"
        "<tool_call>configure\n<arg_key>note</arg_key>\n<arg_value>hello</arg_value>\n</tool_call>",
        tools="typed",
        calls=[
            ("configure", {"note": None}),
            ("configure", {"note": "123"}),
            ("configure", {"note": "hello"}),
        ],
    ),
    case(
        "typed_anyof_oneof_enum_null",
        "<tool_call>configure\n<arg_key>mode</arg_key>\n<arg_value>42</arg_value>\n"
        "<arg_key>limit</arg_key>\n<arg_value>null</arg_value>\n"
        "<arg_key>level</arg_key>\n<arg_value>2</arg_value>\n"
        "<arg_key>nothing</arg_key>\n<arg_value>null</arg_value>\n</tool_call>\n"
        "<tool_call>configure\n<arg_key>mode</arg_key>\n<arg_value>fast</arg_value>\n"
        "<arg_key>limit</arg_key>\n<arg_value>10</arg_value>\n</tool_call>",
        tools="typed",
        calls=[
            ("configure", {"mode": 42, "limit": None, "level": 2, "nothing": None}),
            ("configure", {"mode": "fast", "limit": 10}),
        ],
    ),
    case(
        "typed_string_enum",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>fahrenheit</arg_value>\n</tool_call>",
        tools="basic",
        calls=[("get_weather", {"city": "Oslo", "unit": "fahrenheit"})],
    ),
    case(
        "typed_fallbacks",
        "<tool_call>configure\n<arg_key>count</arg_key>\n<arg_value>three</arg_value>\n"
        "<arg_key>enabled</arg_key>\n<arg_value>True</arg_value>\n"
        "<arg_key>ratio</arg_key>\n<arg_value>NaN</arg_value>\n"
        "<arg_key>options</arg_key>\n<arg_value>{bad json</arg_value>\n"
        "<arg_key>tags</arg_key>\n<arg_value> [1, 2] </arg_value>\n"
        "<arg_key>level</arg_key>\n<arg_value>3.0</arg_value>\n</tool_call>",
        tools="typed",
        calls=[
            (
                "configure",
                {
                    "count": "three",
                    "enabled": True,
                    "ratio": "NaN",
                    "options": "{bad json",
                    "tags": [1, 2],
                    "level": 3,
                },
            )
        ],
    ),
    case(
        "typed_integer_from_float_text",
        "<tool_call>configure\n<arg_key>count</arg_key>\n<arg_value>5.0</arg_value>\n</tool_call>",
        tools="typed",
        calls=[("configure", {"count": 5})],
    ),
    case(
        "arg_not_in_schema_best_effort",
        '<tool_call>configure\n<arg_key>payload</arg_key>\n<arg_value>{"k": [1]}</arg_value>\n'
        "<arg_key>extra</arg_key>\n<arg_value>5</arg_value>\n"
        "<arg_key>words</arg_key>\n<arg_value>x y</arg_value>\n</tool_call>",
        tools="typed",
        calls=[("configure", {"payload": {"k": [1]}, "extra": 5, "words": "x y"})],
    ),
    case(
        "no_tools_best_effort",
        "<tool_call>lookup\n<arg_key>id</arg_key>\n<arg_value>3</arg_value>\n"
        "<arg_key>name</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>ids</arg_key>\n<arg_value>[1, 2]</arg_value>\n"
        "<arg_key>flag</arg_key>\n<arg_value>true</arg_value>\n"
        '<arg_key>quoted</arg_key>\n<arg_value>"quoted"</arg_value>\n'
        "<arg_key>big</arg_key>\n<arg_value>1e999</arg_value>\n</tool_call>",
        calls=[
            (
                "lookup",
                {
                    "id": 3,
                    "name": "Paris",
                    "ids": [1, 2],
                    "flag": True,
                    "quoted": "quoted",
                    "big": "1e999",
                },
            )
        ],
    ),
    case(
        "name_trailing_newline_no_args",
        "\n<think></think>\n" + TIME_CALL,
        tools="basic",
        reasoning="",
        calls=[("get_time", {})],
    ),
    case(
        "empty_args_no_newline",
        "<tool_call>get_time</tool_call>",
        tools="basic",
        calls=[("get_time", {})],
    ),
    case(
        "glm47_no_newlines",
        "<think>Berlin weather.</think><tool_call>get_weather<arg_key>city</arg_key>"
        "<arg_value>Berlin</arg_value><arg_key>days</arg_key><arg_value>2</arg_value>"
        "</tool_call>",
        tools="basic",
        reasoning="Berlin weather.",
        calls=[("get_weather", {"city": "Berlin", "days": 2})],
    ),
    case(
        "literal_backslash_n",
        "<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Rome</arg_value>\\n"
        "</tool_call>",
        tools="basic",
        calls=[("get_weather", {"city": "Rome"})],
    ),
    case(
        "loose_whitespace_and_keys",
        "<tool_call> get_weather \n\n<arg_key> city </arg_key>\n\n  <arg_value>Lima</arg_value>"
        "\n\n<arg_key>days\n</arg_key> <arg_value> 4 </arg_value>\n\n</tool_call>",
        tools="basic",
        calls=[("get_weather", {"city": "Lima", "days": 4})],
    ),
    case(
        "duplicate_key_last_wins",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>A</arg_value>\n"
        "<arg_key>city</arg_key>\n<arg_value>B</arg_value>\n</tool_call>",
        tools="basic",
        calls=[("get_weather", {"city": "B"})],
    ),
    case(
        "json_style_call",
        '\n<think>t</think>\n<tool_call>{"name": "get_weather", "arguments": '
        '{"city": "Kyiv", "days": 1}}</tool_call>',
        tools="basic",
        reasoning="t",
        calls=[("get_weather", {"city": "Kyiv", "days": 1})],
    ),
    # ---- malformed -----------------------------------------------------------------------------
    case(
        "truncated_mid_value_after_good_call",
        "\n<think>t</think>\n" + WEATHER_PARIS + "\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Lon",
        tools="basic",
        reasoning="t",
        content="<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lon",
        calls=[("get_weather", {"city": "Paris", "days": 3})],
        malformed="unclosed_tool_call",
    ),
    case(
        "truncated_mid_key",
        "\n<think>t</think>\nChecking.\n<tool_call>get_weather\n<arg_key>ci",
        tools="basic",
        reasoning="t",
        content="Checking.\n<tool_call>get_weather\n<arg_key>ci",
        malformed="unclosed_tool_call",
    ),
    case(
        "truncated_after_open_tag",
        "Sure.\n<tool_call>",
        content="Sure.\n<tool_call>",
        malformed="unclosed_tool_call",
    ),
    case(
        "missing_arg_value_close_at_end",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris\n</tool_call>",
        tools="basic",
        content="<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris\n</tool_call>",
        malformed="missing_arg_value",
    ),
    case(
        "missing_arg_value_close_mid_list",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        tools="basic",
        content="<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        malformed="missing_arg_value",
    ),
    case(
        "key_without_value",
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
        tools="basic",
        content="<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
        malformed="missing_arg_value",
    ),
    case(
        "unclosed_key",
        "<tool_call>get_weather\n<arg_key>city\n<arg_value>Paris</arg_value>\n</tool_call>",
        tools="basic",
        content="<tool_call>get_weather\n<arg_key>city\n<arg_value>Paris</arg_value>\n</tool_call>",
        malformed="bad_arg_key",
    ),
    case(
        "unknown_tool_then_good_call",
        "\n<think>t</think>\n<tool_call>get_stock\n<arg_key>sym</arg_key>\n<arg_value>AAPL"
        "</arg_value>\n</tool_call>\n" + TIME_CALL,
        tools="basic",
        reasoning="t",
        calls=[("get_stock", {"sym": "AAPL"}), ("get_time", {})],
        malformed="unknown_tool",
    ),
    case(
        "missing_tool_name",
        "<tool_call>\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        content="<tool_call>\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        malformed="missing_tool_name",
    ),
    case(
        "bad_tool_name",
        "<tool_call>get weather now</tool_call>",
        content="<tool_call>get weather now</tool_call>",
        malformed="bad_tool_name",
    ),
    case(
        "unexpected_text_in_call",
        "<tool_call>get_weather\nplease\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "</tool_call>",
        tools="basic",
        content="<tool_call>get_weather\nplease\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n</tool_call>",
        malformed="unexpected_text",
    ),
    case(
        "first_flag_wins",
        "<tool_call>nope\n</tool_call>\n<tool_call>get_time\n<arg_key>x</arg_key>",
        tools="basic",
        content="<tool_call>get_time\n<arg_key>x</arg_key>",
        calls=[("nope", {})],
        malformed="unknown_tool",
    ),
    # ---- the prompt decides where the output starts (GLM-4.7 opens <think> in the prompt) ------
    case(
        "glm47_on_reasoning_then_answer",
        "The user greets me.\nReply briefly.</think>Hello! How can I help?",
        prompt=P47_ON,
        reasoning="The user greets me.\nReply briefly.",
        content="Hello! How can I help?",
    ),
    case(
        "glm47_on_call_without_newlines",
        "Paris, three days.</think><tool_call>get_weather<arg_key>city</arg_key>"
        "<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
        tools="basic",
        prompt=P47_ON,
        reasoning="Paris, three days.",
        calls=[("get_weather", {"city": "Paris", "days": 3})],
    ),
    case(
        "glm47_on_zero_argument_calls",
        "Two clocks.</think>Checking.<tool_call>get_time</tool_call>"
        "<tool_call>get_time</tool_call>",
        tools="basic",
        prompt=P47_ON,
        reasoning="Two clocks.",
        content="Checking.",
        calls=[("get_time", {}), ("get_time", {})],
    ),
    case(
        "glm47_on_stopped_inside_reasoning",
        "Let me think about the weather in",
        prompt=P47_ON,
        reasoning="Let me think about the weather in",
        malformed="unclosed_think",
    ),
    case(
        "glm47_on_empty_output",
        "",
        prompt=P47_ON,
        reasoning="",
        malformed="unclosed_think",
    ),
    case(
        "glm47_on_model_repeats_think",
        "<think>plan</think>\nanswer",
        prompt=P47_ON,
        reasoning="plan",
        content="answer",
    ),
    case(
        "glm47_on_call_right_away",
        "</think><tool_call>get_time</tool_call>",
        tools="basic",
        prompt=P47_ON,
        reasoning="",
        calls=[("get_time", {})],
    ),
    case(
        "glm47_off_all_content",
        "Paris is the capital.<tool_call>get_time</tool_call>",
        tools="basic",
        prompt=P47_OFF,
        content="Paris is the capital.",
        calls=[("get_time", {})],
    ),
    case(
        "glm47_off_stray_close",
        "Fine.</think> Done.",
        prompt=P47_OFF,
        content="Fine. Done.",
    ),
    case(
        "glm45_prompt_on_no_think_block",
        "Just an answer, no thinking.",
        prompt=P45_ON,
        content="Just an answer, no thinking.",
    ),
    case(
        "glm45_prompt_on_bare_close_is_stray",
        "Answer part one</think> and two.",
        prompt=P45_ON,
        content="Answer part one and two.",
    ),
    case(
        "glm45_prompt_on_think_block",
        "\n<think>Short.</think>\nLong answer.",
        prompt=P45_ON,
        reasoning="Short.",
        content="Long answer.",
    ),
    case(
        "glm45_prompt_off",
        "\nThe answer is 4.",
        prompt=P45_OFF,
        content="The answer is 4.",
    ),
    # ---- interleaved thinking ----------------------------------------------------------------
    case(
        "interleaved_after_content",
        "\n<think>I'm\nthinking</think>Hello, world!\n<think>Thinking2</think>What's up?\n"
        + TIME_CALL,
        tools="basic",
        reasoning="I'm\nthinking\n\nThinking2",
        content="Hello, world!\nWhat's up?",
        calls=[("get_time", {})],
    ),
    case(
        "interleaved_between_calls",
        "\n<think>First the time.</think>\n" + TIME_CALL + "\n<think>\nNow the weather.\n"
        "</think>\n" + WEATHER_PARIS + "\n<think></think>\nBoth requested.",
        tools="basic",
        reasoning="First the time.\n\nNow the weather.",
        content="Both requested.",
        calls=[("get_time", {}), ("get_weather", {"city": "Paris", "days": 3})],
    ),
    case(
        "interleaved_glm47_prompt",
        "Plan: time first.</think><tool_call>get_time</tool_call><think>Got it; answer now."
        "</think>It is noon.",
        tools="basic",
        prompt=P47_ON,
        reasoning="Plan: time first.\n\nGot it; answer now.",
        content="It is noon.",
        calls=[("get_time", {})],
    ),
    case(
        "interleaved_unclosed",
        "\n<think>a</think>\nPart one.\n<think>still going",
        reasoning="a\n\nstill going",
        content="Part one.",
        malformed="unclosed_think",
    ),
    case(
        "interleaved_thinking_off",
        "Answer.\n<think>second thoughts</think>\nMore.",
        thinking=False,
        reasoning="second thoughts",
        content="Answer.\n\nMore.",
    ),
    # ---- argument typing from JSON schemas ---------------------------------------------------
    case(
        "schema_ref_string_keeps_null_and_number_text",
        "<tool_call>create_user<arg_key>name</arg_key><arg_value>null</arg_value>"
        "<arg_key>nickname</arg_key><arg_value>7</arg_value>"
        "<arg_key>role</arg_key><arg_value>admin</arg_value>"
        '<arg_key>address</arg_key><arg_value>{"zip": "01234"}</arg_value></tool_call>',
        tools="pydantic",
        calls=[
            (
                "create_user",
                {"name": "null", "nickname": "7", "role": "admin", "address": {"zip": "01234"}},
            )
        ],
    ),
    case(
        "schema_ref_optional_and_numbers",
        '<tool_call>create_user<arg_key>age</arg_key><arg_value>"42"</arg_value>'
        '<arg_key>score</arg_key><arg_value>"2.5"</arg_value>'
        "<arg_key>manager</arg_key><arg_value>null</arg_value>"
        "<arg_key>tags</arg_key><arg_value>['a', 'b']</arg_value>"
        "<arg_key>active</arg_key><arg_value>True</arg_value></tool_call>",
        tools="pydantic",
        calls=[
            (
                "create_user",
                {"age": 42, "score": 2.5, "manager": None, "tags": ["a", "b"], "active": True},
            )
        ],
    ),
    case(
        "schema_ref_at_parameters_root",
        "<tool_call>lookup<arg_key>query</arg_key><arg_value>123</arg_value>"
        "<arg_key>limit</arg_key><arg_value>5</arg_value></tool_call>",
        tools="pydantic",
        calls=[("lookup", {"query": "123", "limit": 5})],
    ),
    case(
        "escaped_json_array",
        '<tool_call>configure<arg_key>tags</arg_key><arg_value>[\\"x\\", \\"y\\"]</arg_value>'
        "</tool_call>",
        tools="typed",
        calls=[("configure", {"tags": ["x", "y"]})],
    ),
    case(
        "python_literal_of_the_wrong_type_stays_text",
        "<tool_call>configure<arg_key>count</arg_key><arg_value>'abc'</arg_value>"
        "<arg_key>ratio</arg_key><arg_value>(1, 2)</arg_value>"
        "<arg_key>options</arg_key><arg_value>{'a': (1, None)}</arg_value></tool_call>",
        tools="typed",
        calls=[("configure", {"count": "'abc'", "ratio": "(1, 2)", "options": {"a": [1, None]}})],
    ),
    case(
        "unknown_tool_glm47_typed_best_effort",
        "<tool_call>get_stock<arg_key>symbol</arg_key><arg_value>AAPL</arg_value>"
        "<arg_key>days</arg_key><arg_value>5</arg_value></tool_call>",
        tools="basic",
        calls=[("get_stock", {"symbol": "AAPL", "days": 5})],
        malformed="unknown_tool",
    ),
]


# ---- peers -------------------------------------------------------------------------------------
# Cases from the tool- and reasoning-parser tests of vLLM (tests/reasoning/test_glm4_moe_*,
# test_glm47_*, tests/tool_parsers/test_glm4_moe_tool_parser.py), SGLang
# (test_function_call_parser.py: Glm4MoeDetector, Glm47MoeDetector), mlx-lm
# (tests/test_tool_parsing.py) and llama.cpp (tests/test-chat.cpp, GLM 4.5), with the result
# each peer's test expects, restated as (content, reasoning, calls). They are compared as users
# see them: content and reasoning stripped (we strip, as the template does), None the same as "",
# arguments as JSON values of the same JSON types. Where we differ on purpose, ``differs`` says
# why and ``ours`` holds our result. ``emitted`` is what must have been streamed once the whole
# text was fed, before close(): text may only wait while it can still be the start of a tag.


def _tool(name, properties=None, **extra):
    params = {"type": "object", "properties": properties or {}, **extra}
    return {"type": "function", "function": {"name": name, "parameters": params}}


S = {"type": "string"}
VLLM_TOOLS = [_tool("get_weather", {"city": S})]
SGL_TOOLS = [_tool("get_weather", {"city": S, "date": S}, required=["city", "date"])]
SGL47_TOOLS = [
    _tool(
        "get_weather", {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}
    ),
    _tool("get_time"),
]
TODO_TOOLS = [_tool("todo_write", {"todos": {"type": "array"}})]
CALC_TOOLS = [
    _tool("calculate", {"operation": S, "a": {"type": "number"}, "b": {"type": "number"}})
]
LLAMA_TOOLS = [
    _tool("special_function", {"arg1": {"type": "integer"}}),
    _tool("special_function_with_opt", {"arg1": {"type": "integer"}, "arg2": {"type": "integer"}}),
    _tool(
        "complex_function",
        {
            "name": S,
            "age": {"type": "integer"},
            "active": {"type": "boolean"},
            "score": {"type": "number"},
        },
    ),
    _tool("web_search", {"query": S, "limit": {"type": "integer"}, "type": S}),
]
SPECIAL = (
    "<tool_call>special_function\n<arg_key>arg1</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
)
HELLO = "Hello, world!\nWhat's up?"


def _vllm_weather(city, state, unit, indent="    "):
    body = "".join(
        f"{indent}<arg_key>{k}</arg_key>\n{indent}<arg_value>{v}</arg_value>\n"
        for k, v in (("city", city), ("state", state), ("unit", unit))
    )
    return f"<tool_call>get_current_weather\n{body}{indent}</tool_call>"


def _todos(raw):
    return (
        f"<tool_call>todo_write\n<arg_key>todos</arg_key>\n<arg_value>{raw}</arg_value></tool_call>"
    )


TODO_TASKS = [
    ("1", "Check for hard-coded issues in the backend code", "in_progress"),
    ("2", "Check for hard-coded issues in the frontend code", "pending"),
]
TODO_JSON = (
    "["
    + ", ".join(f'{{"id": "{i}", "task": "{t}", "status": "{s}"}}' for i, t, s in TODO_TASKS)
    + "]"
)
TODO_VALUE = [{"id": i, "task": t, "status": s} for i, t, s in TODO_TASKS]
BUBBLE = 'def bubble_sort(arr):\n    n = len(arr)\n    return arr\n\nprint(f"Sorted: {arr}")\n'


def peer(
    name,
    source,
    text,
    *,
    tools=None,
    prompt=P45_ON,
    content="",
    reasoning=None,
    calls=(),
    emitted=None,
    differs=None,
    ours=None,
):
    return {
        "name": name,
        "source": source,
        "text": text,
        "tools": tools,
        "prompt": prompt,
        "content": content,
        "reasoning": reasoning,
        "calls": list(calls),
        "emitted": emitted,
        "differs": differs,
        "ours": ours,
    }


V47T = "vllm tool_parsers/test_glm47_moe_tool_parser"
SGS = "sglang Glm4MoeDetector streaming/MTP (GLM-4.7)"
SJ = "sgl-jax test_glm4_moe_detector"
V47_TOOLS = [
    {"type": "function", "function": {"name": "get_current_date", "parameters": {}}},
    _tool("get_weather", {"city": S, "date": S}),
]
BASH_TOOLS = [_tool("execute_bash", {"command": S})]
TYPED_TOOLS = [
    _tool(
        "do_thing",
        {
            "n": {"type": "integer"},
            "ratio": {"type": "number"},
            "flag": {"type": "boolean"},
            "obj": {"type": "object"},
        },
    )
]
_OPTION = {"type": "object", "properties": {"label": S, "description": S}}
_QUESTION = {
    "type": "object",
    "properties": {
        "question": S,
        "header": S,
        "multiSelect": {"type": "boolean"},
        "options": {"type": "array", "items": _OPTION},
    },
}
ASK_TOOLS = [
    _tool(
        "ask_user_question",
        {"questions": {"type": "array", "items": _QUESTION}},
        required=["questions"],
    )
]
ASK_QUESTIONS = [
    {
        "question": "您希望使用哪种编程语言？",
        "header": "编程语言",
        "multiSelect": False,
        "options": [
            {"label": "TypeScript", "description": "类型安全的 JavaScript 超集"},
            {"label": "Go", "description": "高性能并发"},
        ],
    },
    {"question": "启用哪些功能？", "header": "功能", "multiSelect": True, "options": []},
]
ASK_CALL = (
    "<tool_call>ask_user_question<arg_key>questions</arg_key><arg_value>"
    + json.dumps(ASK_QUESTIONS, ensure_ascii=False)
    + "</arg_value></tool_call>"
)
V45R = "vllm reasoning/test_glm4_moe_reasoning_parser"
V47R = "vllm reasoning/test_glm47_reasoning_parser"
VT = "vllm tool_parsers/test_glm4_moe_tool_parser"
SG = "sglang test_function_call_parser Glm4MoeDetector"
SG47 = "sglang test_function_call_parser Glm47MoeDetector"
SGF = "sglang Glm4MoeDetector (GLM-4 and GLM-4.7 formats)"
MLX = "mlx-lm tests/test_tool_parsing"
LL = "llama.cpp tests/test-chat GLM 4.5"
THINK_R = "This is a reasoning section"

PEER_CASES = [
    # -- vLLM glm45 reasoning parser: the GLM-4.5 template (prompt ends with <|assistant|>) ----
    peer(
        "v45_with_think",
        V45R,
        f"<think>{THINK_R}</think>This is the rest",
        reasoning=THINK_R,
        content="This is the rest",
    ),
    peer(
        "v45_without_think",
        V45R,
        "This is the rest",
        content="This is the rest",
        emitted={"content": "This is the rest"},
    ),
    peer("v45_complete_reasoning", V45R, f"<think>{THINK_R}</think>", reasoning=THINK_R),
    peer(
        "v45_multiline",
        V45R,
        "<think>This is a reasoning\nsection</think>This is the rest\nThat",
        reasoning="This is a reasoning\nsection",
        content="This is the rest\nThat",
    ),
    peer(
        "v45_empty_think_block", V45R, "<think></think>This is the rest", content="This is the rest"
    ),
    peer("v45_empty_think_block_no_content", V45R, "<think></think>"),
    peer(
        "v45_only_open_tag_stream",
        V45R,
        f"<think>{THINK_R}",
        reasoning=THINK_R,
        emitted={"reasoning": THINK_R},
    ),
    peer(
        "v45_only_open_tag_batch",
        V45R,
        f"<think>{THINK_R}",
        content=f"<think>{THINK_R}",
        differs="vLLM's batch path returns a truncated <think> as content, its streaming path as "
        "reasoning; ours is one machine for both, so it gives the streaming answer",
        ours={"reasoning": THINK_R, "content": ""},
    ),
    # -- vLLM glm47 reasoning parser: the prompt ends with <think> ----------------------------
    peer(
        "v47_simple",
        V47R,
        f"{THINK_R}</think>This is the rest",
        prompt=P47_ON,
        reasoning=THINK_R,
        content="This is the rest",
    ),
    peer("v47_complete", V47R, f"{THINK_R}</think>", prompt=P47_ON, reasoning=THINK_R),
    peer(
        "v47_no_content",
        V47R,
        "This is content",
        prompt=P47_ON,
        reasoning="This is content",
        emitted={"reasoning": "This is content"},
    ),
    peer(
        "v47_multiple_lines",
        V47R,
        "This\nThat</think>This is the rest\nThat",
        prompt=P47_ON,
        reasoning="This\nThat",
        content="This is the rest\nThat",
    ),
    peer(
        "v47_shortest", V47R, "</think>This is the rest", prompt=P47_ON, content="This is the rest"
    ),
    peer(
        "v47_with_think",
        V47R,
        f"<think>{THINK_R}</think>This is the rest",
        prompt=P47_ON,
        reasoning=THINK_R,
        content="This is the rest",
    ),
    peer(
        "v47_complete_with_think",
        V47R,
        f"<think>{THINK_R}</think>",
        prompt=P47_ON,
        reasoning=THINK_R,
    ),
    peer(
        "v47_multiple_lines_with_think",
        V47R,
        "<think>This\nThat</think>This is the rest\nThat",
        prompt=P47_ON,
        reasoning="This\nThat",
        content="This is the rest\nThat",
    ),
    peer("v47_think_no_end", V47R, f"<think>{THINK_R}", prompt=P47_ON, reasoning=THINK_R),
    peer("v47_empty", V47R, "", prompt=P47_ON),
    # -- vLLM glm45 tool parser (its tools list has only get_weather) -------------------------
    peer("vt_no_tools", VT, "This is a test", tools=VLLM_TOOLS, content="This is a test"),
    peer(
        "vt_single_call_unknown_name",
        VT,
        _vllm_weather("Dallas", "TX", "fahrenheit"),
        tools=VLLM_TOOLS,
        calls=[("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})],
    ),
    peer(
        "vt_multiple_calls",
        VT,
        _vllm_weather("Dallas", "TX", "fahrenheit")
        + "\n    "
        + _vllm_weather("Orlando", "FL", "fahrenheit"),
        tools=VLLM_TOOLS,
        calls=[
            ("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}),
            ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "fahrenheit"}),
        ],
    ),
    peer(
        "vt_content_before",
        VT,
        "I'll help you check the weather. " + _vllm_weather("Seattle", "WA", "celsius"),
        tools=VLLM_TOOLS,
        content="I'll help you check the weather. ",
        calls=[("get_current_weather", {"city": "Seattle", "state": "WA", "unit": "celsius"})],
    ),
    peer(
        "vt_mixed_args",
        VT,
        _vllm_weather("New York", "NY", "celsius"),
        tools=VLLM_TOOLS,
        calls=[("get_current_weather", {"city": "New York", "state": "NY", "unit": "celsius"})],
    ),
    peer(
        "vt_content_no_space",
        VT,
        "I will help you get the weather.<tool_call>get_weather\n    <arg_key>city</arg_key>\n"
        "    <arg_value>Beijing</arg_value>\n    <arg_key>date</arg_key>\n"
        "    <arg_value>2025-08-01</arg_value>\n    </tool_call>",
        tools=VLLM_TOOLS,
        content="I will help you get the weather.",
        calls=[("get_weather", {"city": "Beijing", "date": "2025-08-01"})],
    ),
    peer(
        "vt_with_thinking_tags",
        VT + " (with --reasoning-parser glm45)",
        "<think>I want to get the weather.</think>\n\nI will help you get the weather.\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>date</arg_key>\n<arg_value>2025-08-01</arg_value>\n</tool_call>",
        tools=VLLM_TOOLS,
        reasoning="I want to get the weather.",
        content="I will help you get the weather.\n",
        calls=[("get_weather", {"city": "Beijing", "date": "2025-08-01"})],
    ),
    peer(
        "vt_empty_arguments",
        VT,
        "<tool_call>get_current_time\n</tool_call>",
        tools=VLLM_TOOLS,
        calls=[("get_current_time", {})],
    ),
    peer(
        "vt_mixed_content_batch",
        VT,
        "I will help you get the weather info.\n\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Beijing</arg_value>\n</tool_call>\n\nmeaningwhile, I will also check the "
        "weather in Shanghai.\n\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Shanghai</arg_value>\n</tool_call>",
        tools=VLLM_TOOLS,
        content="I will help you get the weather info.\n\n",
        calls=[("get_weather", {"city": "Beijing"}), ("get_weather", {"city": "Shanghai"})],
        differs="vLLM's batch path keeps only the text before the first call; its streaming path "
        "(vt_content_between_calls) keeps the text between calls too, and so do we",
        ours={
            "content": "I will help you get the weather info.\n\n\n\nmeaningwhile, I will also "
            "check the weather in Shanghai."
        },
    ),
    peer(
        "vt_stream_no_calls",
        VT,
        "This is just regular text without any tool calls.",
        tools=VLLM_TOOLS,
        content="This is just regular text without any tool calls.",
        emitted={"content": "This is just regular text without any tool calls."},
    ),
    peer(
        "vt_stream_content_before_open_tag",
        VT,
        "I will help you get the weather.<tool_call>",
        tools=VLLM_TOOLS,
        content="I will help you get the weather.<tool_call>",
        emitted={"content": "I will help you get the weather."},
    ),
    peer(
        "vt_special_characters",
        VT,
        "<tool_call>send_message\n<arg_key>recipient</arg_key>\n<arg_value>Amy</arg_value>\n"
        "<arg_key>message</arg_key>\n<arg_value>It is a nice day</arg_value>\n"
        "<arg_key>priority</arg_key>\n<arg_value>high</arg_value>\n</tool_call>",
        tools=VLLM_TOOLS,
        calls=[
            (
                "send_message",
                {"recipient": "Amy", "message": "It is a nice day", "priority": "high"},
            )
        ],
    ),
    peer(
        "vt_incomplete_call_is_content",
        VT,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>date</arg_key>\n<arg_value>2025-08-01</arg_value>",
        tools=VLLM_TOOLS,
        content="<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>"
        "\n<arg_key>date</arg_key>\n<arg_value>2025-08-01</arg_value>",
    ),
    peer(
        "vt_numeric_deserialization",
        VT,
        "<tool_call>calculate\n<arg_key>operation</arg_key>\n<arg_value>add</arg_value>\n"
        "<arg_key>a</arg_key>\n<arg_value>42</arg_value>\n<arg_key>b</arg_key>\n"
        "<arg_value>3.14</arg_value>\n<arg_key>enabled</arg_key>\n<arg_value>true</arg_value>\n"
        "</tool_call>",
        tools=VLLM_TOOLS,
        calls=[("calculate", {"operation": "add", "a": 42, "b": 3.14, "enabled": True})],
    ),
    peer(
        "vt_whitespace_preserved",
        VT,
        "<tool_call>apply_diff\n<arg_key>s</arg_key>\n<arg_value>    indented code    </arg_value>"
        "\n</tool_call>",
        tools=[_tool("apply_diff", {"s": S})],
        calls=[("apply_diff", {"s": "    indented code    "})],
    ),
    peer(
        "vt_zero_argument_call",
        VT,
        "<tool_call>get_time\n</tool_call>",
        tools=VLLM_TOOLS,
        calls=[("get_time", {})],
    ),
    peer("vt_open_tag_only", VT, "<tool_call>   ", tools=VLLM_TOOLS, content="<tool_call>   "),
    peer(
        "vt_unicode_preserved",
        VT,
        "<tool_call>send_message\n<arg_key>greeting</arg_key>\n<arg_value>你好世界</arg_value>\n"
        "<arg_key>emoji</arg_key>\n<arg_value>🎉</arg_value>\n</tool_call>",
        tools=VLLM_TOOLS,
        calls=[("send_message", {"greeting": "你好世界", "emoji": "🎉"})],
    ),
    peer(
        "vt_json_escape_in_string",
        VT,
        '<tool_call>send_message\n<arg_key>message</arg_key><arg_value>Hello "world"\nNew line'
        "</arg_value></tool_call>",
        tools=VLLM_TOOLS,
        calls=[("send_message", {"message": 'Hello "world"\nNew line'})],
    ),
    peer(
        "vt_long_string_value",
        VT,
        "<tool_call>write_to_file\n<arg_key>file_path</arg_key><arg_value>/tmp/bubble_sort.py"
        "</arg_value><arg_key>content</arg_key><arg_value>" + BUBBLE + "</arg_value></tool_call>",
        tools=[_tool("write_to_file", {"file_path": S, "content": S})],
        calls=[("write_to_file", {"file_path": "/tmp/bubble_sort.py", "content": BUBBLE})],
    ),
    peer(
        "vt_multi_token_typed_args",
        VT,
        "<tool_call>calculate\n<arg_key>operation</arg_key><arg_value>add</arg_value>"
        "<arg_key>a</arg_key><arg_value>42</arg_value><arg_key>b</arg_key><arg_value>3.14"
        "</arg_value></tool_call>",
        tools=CALC_TOOLS,
        calls=[("calculate", {"operation": "add", "a": 42, "b": 3.14})],
    ),
    peer(
        "vt_content_then_call",
        VT,
        "I will check the weather for you.\n<tool_call>get_weather\n<arg_key>city</arg_key>"
        "<arg_value>Beijing</arg_value></tool_call>",
        tools=VLLM_TOOLS,
        content="I will check the weather for you.\n",
        calls=[("get_weather", {"city": "Beijing"})],
    ),
    peer(
        "vt_content_between_calls",
        VT,
        "Checking Beijing.\n<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Beijing"
        "</arg_value></tool_call>\nAlso Shanghai.\n<tool_call>get_weather\n<arg_key>city"
        "</arg_key><arg_value>Shanghai</arg_value></tool_call>",
        tools=VLLM_TOOLS,
        content="Checking Beijing.\n\nAlso Shanghai.\n",
        calls=[("get_weather", {"city": "Beijing"}), ("get_weather", {"city": "Shanghai"})],
    ),
    peer(
        "vt_function_tool_shape",
        VT,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Dallas</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>fahrenheit</arg_value>\n</tool_call>",
        tools=[
            {
                "type": "function",
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": S, "unit": S}},
            }
        ],
        calls=[("get_weather", {"city": "Dallas", "unit": "fahrenheit"})],
    ),
    peer(
        "vt_no_newline_after_name",
        VT,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Seattle</arg_value></tool_call>",
        tools=VLLM_TOOLS,
        calls=[("get_weather", {"city": "Seattle"})],
    ),
    peer(
        "vt_anyof_string",
        VT,
        "<tool_call>configure<arg_key>api_key</arg_key><arg_value>sk-12345678</arg_value>"
        "</tool_call>",
        tools=[_tool("configure", {"api_key": {"anyOf": [S, {"type": "null"}]}})],
        calls=[("configure", {"api_key": "sk-12345678"})],
    ),
    peer(
        "vt_type_list_string",
        VT,
        "<tool_call>log<arg_key>message</arg_key><arg_value>test message</arg_value></tool_call>",
        tools=[_tool("log", {"message": {"type": ["string", "null"]}})],
        calls=[("log", {"message": "test message"})],
    ),
    peer(
        "vt_boolean",
        VT,
        "<tool_call>configure<arg_key>enabled</arg_key><arg_value>true</arg_value></tool_call>",
        tools=[_tool("configure", {"enabled": {"type": "boolean"}})],
        calls=[("configure", {"enabled": True})],
    ),
    peer(
        "vt_python_boolean",
        VT + " (_format_nonstring_value)",
        "<tool_call>test<arg_key>value</arg_key><arg_value>True</arg_value></tool_call>",
        tools=[_tool("test", {"value": {"type": "boolean"}})],
        calls=[("test", {"value": True})],
    ),
    # -- SGLang Glm4MoeDetector / Glm47MoeDetector ---------------------------------------------
    peer(
        "sg_single_call",
        SG,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n</tool_call>",
        tools=SGL_TOOLS,
        calls=[("get_weather", {"city": "Beijing", "date": "2024-06-27"})],
    ),
    peer(
        "sg_multiple_calls",
        SG,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n</tool_call>"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Shanghai</arg_value>\n"
        "<arg_key>date</arg_key>\n<arg_value>2024-06-28</arg_value>\n</tool_call>",
        tools=SGL_TOOLS,
        calls=[
            ("get_weather", {"city": "Beijing", "date": "2024-06-27"}),
            ("get_weather", {"city": "Shanghai", "date": "2024-06-28"}),
        ],
    ),
    peer(
        "sg_invalid_tool",
        SG,
        "<tool_call>invalid_func\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "</tool_call>",
        tools=SGL_TOOLS,
        differs="SGLang drops a call to a function not in tools; vLLM returns it (so the client "
        "can answer with an error the model reads), and so do we, flagged unknown_tool",
        ours={"calls": [("invalid_func", {"city": "Beijing"})]},
    ),
    peer(
        "sg_array_json",
        SG,
        _todos(TODO_JSON),
        tools=TODO_TOOLS,
        calls=[("todo_write", {"todos": TODO_VALUE})],
    ),
    peer(
        "sg_array_escaped_json",
        SG,
        _todos(TODO_JSON.replace('"', '\\"')),
        tools=TODO_TOOLS,
        calls=[("todo_write", {"todos": TODO_VALUE})],
    ),
    peer(
        "sg_array_windows_path",
        SG,
        _todos(
            '[{"id": "1", "task": "Check file at C:\\\\Users\\\\test.txt", "status": "pending"}]'
        ),
        tools=TODO_TOOLS,
        calls=[
            (
                "todo_write",
                {
                    "todos": [
                        {
                            "id": "1",
                            "task": "Check file at C:\\Users\\test.txt",
                            "status": "pending",
                        }
                    ]
                },
            )
        ],
    ),
    peer(
        "sg_array_windows_path_escaped",
        SG,
        _todos(
            '[{\\"id\\": \\"1\\", \\"task\\": \\"Check file at C:\\\\\\\\Users\\\\\\\\test.txt'
            '\\", \\"status\\": \\"pending\\"}]'
        ).replace("\n", "\\n"),
        tools=TODO_TOOLS,
        calls=[
            (
                "todo_write",
                {
                    "todos": [
                        {
                            "id": "1",
                            "task": "Check file at C:\\Users\\test.txt",
                            "status": "pending",
                        }
                    ]
                },
            )
        ],
    ),
    peer(
        "sg_array_literal_backslash_n",
        SG,
        _todos('[{"id": "1", "task": "Print \\\\n to see newline","status": "pending"}]'),
        tools=TODO_TOOLS,
        calls=[
            (
                "todo_write",
                {"todos": [{"id": "1", "task": "Print \\n to see newline", "status": "pending"}]},
            )
        ],
    ),
    peer(
        "sg_whitespace_preserved",
        SG,
        "<tool_call>apply_diff\n<arg_key>old_string</arg_key>\n<arg_value>    indented code"
        "</arg_value>\n<arg_key>new_string</arg_key>\n<arg_value>        also indented"
        "</arg_value>\n</tool_call>",
        tools=[_tool("apply_diff", {"old_string": S, "new_string": S})],
        calls=[
            (
                "apply_diff",
                {"old_string": "    indented code", "new_string": "        also indented"},
            )
        ],
    ),
    peer(
        "sg_quoted_string_value",
        SG,
        '<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>"\\C|\\."</arg_value>\n'
        "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n</tool_call>",
        tools=SGL_TOOLS,
        calls=[("get_weather", {"city": "\\C|\\.", "date": "2024-06-27"})],
        differs="SGLang unquotes a quoted string value; we keep string values byte for byte "
        "(the template writes them raw, so only that round-trips)",
        ours={"calls": [("get_weather", {"city": '"\\C|\\."', "date": "2024-06-27"})]},
    ),
    peer(
        "sg_underscore_string",
        SG + " parse_arguments",
        "<tool_call>f<arg_key>x</arg_key><arg_value>123_456</arg_value></tool_call>",
        tools=[_tool("f", {"x": S})],
        calls=[("f", {"x": "123_456"})],
    ),
    peer(
        "sg_underscore_untyped",
        SG + " parse_arguments",
        "<tool_call>f<arg_key>x</arg_key><arg_value>123_456</arg_value></tool_call>",
        calls=[("f", {"x": 123456})],
        differs="without a schema SGLang reads Python literals (123_456 -> 123456); we read "
        "only JSON there, so text that is not JSON stays text",
        ours={"calls": [("f", {"x": "123_456"})]},
    ),
    peer(
        "sg_python_dict_object",
        SG + " parse_arguments",
        "<tool_call>f<arg_key>x</arg_key><arg_value>{'pattern': '\\d+'}</arg_value></tool_call>",
        tools=[_tool("f", {"x": {"type": "object"}})],
        calls=[("f", {"x": {"pattern": "\\d+"}})],
    ),
    peer(
        "sg47_single_call",
        SG47,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value>"
        "<arg_key>date</arg_key><arg_value>2024-06-27</arg_value></tool_call>",
        tools=SGL_TOOLS,
        calls=[("get_weather", {"city": "Beijing", "date": "2024-06-27"})],
    ),
    peer(
        "sg47_multiple_calls",
        SG47,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value>"
        "<arg_key>date</arg_key><arg_value>2024-06-27</arg_value></tool_call>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Shanghai</arg_value>"
        "<arg_key>date</arg_key><arg_value>2024-06-28</arg_value></tool_call>",
        tools=SGL_TOOLS,
        calls=[
            ("get_weather", {"city": "Beijing", "date": "2024-06-27"}),
            ("get_weather", {"city": "Shanghai", "date": "2024-06-28"}),
        ],
    ),
    peer(
        "sg47_invalid_tool",
        SG47,
        "<tool_call>invalid_func<arg_key>city</arg_key><arg_value>Beijing</arg_value></tool_call>",
        tools=SGL_TOOLS,
        differs="as sg_invalid_tool",
        ours={"calls": [("invalid_func", {"city": "Beijing"})]},
    ),
    peer(
        "sg47_array_escaped_json",
        SG47,
        _todos(TODO_JSON.replace('"', '\\"')).replace("\n", ""),
        tools=TODO_TOOLS,
        calls=[("todo_write", {"todos": TODO_VALUE})],
    ),
    peer(
        "sgf_newline_separator",
        SGF,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>杭州</arg_value>\n</tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_weather", {"city": "杭州"})],
    ),
    peer(
        "sgf_literal_newline_separator",
        SGF,
        "<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>杭州</arg_value>\\n"
        "</tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_weather", {"city": "杭州"})],
    ),
    peer(
        "sgf_no_separator",
        SGF,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>杭州</arg_value></tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_weather", {"city": "杭州"})],
    ),
    peer(
        "sgf_no_args_newline",
        SGF,
        "<tool_call>get_time\n</tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_time", {})],
    ),
    peer(
        "sgf_no_args_literal_newline",
        SGF,
        "<tool_call>get_time\\n</tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_time", {})],
    ),
    peer(
        "sgf_no_args_no_separator",
        SGF,
        "<tool_call>get_time</tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_time", {})],
    ),
    peer(
        "sgf_multiple_args_newlines",
        SGF,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>杭州</arg_value>\n"
        "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_weather", {"city": "杭州", "unit": "celsius"})],
    ),
    peer(
        "sgf_multiple_args_no_separator",
        SGF,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>杭州</arg_value>"
        "<arg_key>unit</arg_key><arg_value>celsius</arg_value></tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_weather", {"city": "杭州", "unit": "celsius"})],
    ),
    peer(
        "sgf_multiple_calls",
        SGF,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>杭州</arg_value></tool_call>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>",
        tools=SGL47_TOOLS,
        calls=[("get_weather", {"city": "杭州"}), ("get_weather", {"city": "北京"})],
    ),
    peer(
        "sgf_text_before_call",
        SGF,
        "让我查询天气<tool_call>get_weather<arg_key>city</arg_key><arg_value>杭州</arg_value>"
        "</tool_call>",
        tools=SGL47_TOOLS,
        content="让我查询天气",
        calls=[("get_weather", {"city": "杭州"})],
    ),
    peer(
        "sgf_no_tool_call",
        SGF,
        "这是普通文本，没有工具调用",
        tools=SGL47_TOOLS,
        content="这是普通文本，没有工具调用",
        emitted={"content": "这是普通文本，没有工具调用"},
    ),
    # -- mlx-lm glm47 tool parser --------------------------------------------------------------
    peer(
        "mlx_glm47_untyped_numbers",
        MLX,
        "<tool_call>multiply<arg_key>a</arg_key><arg_value>12234585</arg_value><arg_key>b"
        "</arg_key><arg_value>48838483920</arg_value></tool_call>",
        calls=[("multiply", {"a": 12234585, "b": 48838483920})],
    ),
    peer(
        "mlx_glm47_union_string",
        MLX,
        "<tool_call>q<arg_key>loc</arg_key><arg_value>12345</arg_value></tool_call>",
        tools=[_tool("q", {"loc": {"type": ["string", "null"]}})],
        calls=[("q", {"loc": "12345"})],
    ),
    peer(
        "mlx_laguna_anyof_string",
        MLX,
        "<tool_call>q<arg_key>loc</arg_key><arg_value>67890</arg_value></tool_call>",
        tools=[_tool("q", {"loc": {"anyOf": [S, {"type": "null"}]}})],
        calls=[("q", {"loc": "67890"})],
    ),
    peer(
        "mlx_glm47_name_newline",
        MLX,
        "<tool_call>get_weather\n<arg_key>zip</arg_key>\n<arg_value>10001</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        tools=[_tool("get_weather", {"zip": S, "days": {"type": "integer"}})],
        calls=[("get_weather", {"zip": "10001", "days": 3})],
    ),
    # -- llama.cpp GLM 4.5 (reasoning format deepseek: reasoning extracted) --------------------
    peer("ll_content", LL, HELLO, tools=LLAMA_TOOLS, content=HELLO, emitted={"content": HELLO}),
    peer(
        "ll_thoughts",
        LL,
        "\n<think>I'm\nthinking</think>\n" + HELLO,
        tools=LLAMA_TOOLS,
        reasoning="I'm\nthinking",
        content=HELLO,
    ),
    peer(
        "ll_call", LL, "\n" + SPECIAL, tools=LLAMA_TOOLS, calls=[("special_function", {"arg1": 1})]
    ),
    peer(
        "ll_call_thoughts",
        LL,
        "\n<think>I'm\nthinking</think>\n" + SPECIAL,
        tools=LLAMA_TOOLS,
        reasoning="I'm\nthinking",
        calls=[("special_function", {"arg1": 1})],
    ),
    peer(
        "ll_call_then_content",
        LL,
        "\n" + SPECIAL + HELLO,
        tools=LLAMA_TOOLS,
        content=HELLO,
        calls=[("special_function", {"arg1": 1})],
    ),
    peer(
        "ll_thoughts_content_call",
        LL,
        "\n<think>I'm\nthinking</think>" + HELLO + "\n" + SPECIAL,
        tools=LLAMA_TOOLS,
        reasoning="I'm\nthinking",
        content=HELLO,
        calls=[("special_function", {"arg1": 1})],
    ),
    peer(
        "ll_call_with_opt",
        LL,
        "\n<think></think>\n<tool_call>special_function_with_opt\n<arg_key>arg1</arg_key>\n"
        "<arg_value>1</arg_value>\n<arg_key>arg2</arg_key>\n<arg_value>2</arg_value>\n"
        "</tool_call>\n",
        tools=LLAMA_TOOLS,
        calls=[("special_function_with_opt", {"arg1": 1, "arg2": 2})],
    ),
    peer(
        "ll_complex_function",
        LL,
        "<tool_call>complex_function\n<arg_key>name</arg_key>\n<arg_value>John Doe</arg_value>\n"
        "<arg_key>age</arg_key>\n<arg_value>30</arg_value>\n<arg_key>active</arg_key>\n"
        "<arg_value>true</arg_value>\n<arg_key>score</arg_key>\n<arg_value>95.5</arg_value>\n"
        "</tool_call>",
        tools=LLAMA_TOOLS,
        calls=[
            ("complex_function", {"name": "John Doe", "age": 30, "active": True, "score": 95.5})
        ],
    ),
    peer(
        "ll_web_search_quotes",
        LL,
        '<tool_call>web_search\n<arg_key>query</arg_key>\n<arg_value>"From Zero" Linkin Park '
        "album tracklist complete songs</arg_value>\n<arg_key>limit</arg_key>\n<arg_value>3"
        "</arg_value>\n<arg_key>type</arg_key>\n<arg_value>text</arg_value>\n</tool_call>",
        tools=LLAMA_TOOLS,
        calls=[
            (
                "web_search",
                {
                    "query": '"From Zero" Linkin Park album tracklist complete songs',
                    "limit": 3,
                    "type": "text",
                },
            )
        ],
    ),
    peer(
        "ll_interleaved_thinking",
        LL,
        "\n<think>I'm\nthinking</think>Hello, world!\n<think>Thinking2</think>What's up?\n"
        + SPECIAL,
        tools=LLAMA_TOOLS,
        reasoning="I'm\nthinkingThinking2",
        content=HELLO,
        calls=[("special_function", {"arg1": 1})],
        differs="llama.cpp runs interleaved reasoning blocks together ('thinkingThinking2'); we "
        "join them with a blank line so words from two blocks do not merge",
        ours={"reasoning": "I'm\nthinking\n\nThinking2"},
    ),
    # -- vLLM glm47 tool parser -----------------------------------------------------------------
    peer(
        "v47t_no_tool_call",
        V47T,
        "This is a plain response.",
        tools=V47_TOOLS,
        content="This is a plain response.",
    ),
    peer(
        "v47t_zero_arg_inline",
        V47T,
        "<tool_call>get_current_date</tool_call>",
        tools=V47_TOOLS,
        calls=[("get_current_date", {})],
    ),
    peer(
        "v47t_zero_arg_newline",
        V47T,
        "<tool_call>get_current_date\n</tool_call>",
        tools=V47_TOOLS,
        calls=[("get_current_date", {})],
    ),
    peer(
        "v47t_args_same_line",
        V47T,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value></tool_call>",
        tools=V47_TOOLS,
        calls=[("get_weather", {"city": "Beijing"})],
    ),
    peer(
        "v47t_args_with_newlines",
        V47T,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
        "</tool_call>",
        tools=V47_TOOLS,
        calls=[("get_weather", {"city": "Beijing"})],
    ),
    peer(
        "v47t_content_before",
        V47T,
        "Checking.<tool_call>get_current_date</tool_call>",
        tools=V47_TOOLS,
        content="Checking.",
        calls=[("get_current_date", {})],
    ),
    peer(
        "v47t_multiple",
        V47T,
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value></tool_call>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Shanghai</arg_value></tool_call>",
        tools=V47_TOOLS,
        calls=[("get_weather", {"city": "Beijing"}), ("get_weather", {"city": "Shanghai"})],
    ),
    peer(
        "v47t_whitespace_content",
        V47T,
        "  \n  <tool_call>get_current_date</tool_call>",
        tools=V47_TOOLS,
        calls=[("get_current_date", {})],
    ),
    # -- SGLang GLM-4.7 streaming and MTP tests (nested array arguments) ----------------------
    peer(
        "sg47_ask_user_after_text",
        SGS,
        "帮助用户做出明确的选择。我来调用 ask_user_question 工具：" + ASK_CALL,
        tools=ASK_TOOLS,
        content="帮助用户做出明确的选择。我来调用 ask_user_question 工具：",
        calls=[("ask_user_question", {"questions": ASK_QUESTIONS})],
    ),
    peer(
        "sg47_ask_user_streamed_text",
        SGS,
        "我来调用工具：" + ASK_CALL,
        tools=ASK_TOOLS,
        content="我来调用工具：",
        calls=[("ask_user_question", {"questions": ASK_QUESTIONS})],
    ),
    peer(
        "sg47_ask_user_text_partial",
        SGS,
        "我来调用工具：",
        tools=ASK_TOOLS,
        content="我来调用工具：",
        emitted={"content": "我来调用工具："},
    ),
    peer(
        "sg47_ask_user_only_call",
        SGS,
        ASK_CALL,
        tools=ASK_TOOLS,
        calls=[("ask_user_question", {"questions": ASK_QUESTIONS})],
    ),
    peer(
        "sg_closing_gt_not_swallowed",
        SGS,
        "</thinking>",
        tools=ASK_TOOLS,
        content="</thinking>",
        emitted={"content": "</thinking>"},
    ),
    # -- sgl-jax Glm4MoeDetector ---------------------------------------------------------------
    peer(
        "sj_no_tool_call",
        SJ,
        "just a normal answer with no tool",
        tools=BASH_TOOLS,
        content="just a normal answer with no tool",
    ),
    peer(
        "sj_single_call",
        SJ,
        "thinking done\n<tool_call>execute_bash\n<arg_key>command</arg_key>\n<arg_value>ls"
        "</arg_value>\n</tool_call>",
        tools=BASH_TOOLS,
        content="thinking done",
        calls=[("execute_bash", {"command": "ls"})],
    ),
    peer(
        "sj_two_calls",
        SJ,
        "<tool_call>execute_bash\n<arg_key>command</arg_key>\n<arg_value>ls</arg_value>\n"
        "</tool_call><tool_call>execute_bash\n<arg_key>command</arg_key>\n<arg_value>pwd"
        "</arg_value>\n</tool_call>",
        tools=BASH_TOOLS,
        calls=[("execute_bash", {"command": "ls"}), ("execute_bash", {"command": "pwd"})],
    ),
    peer(
        "sj_streaming_text_then_call",
        SJ,
        "plain text. <tool_call>execute_bash\n<arg_key>command</arg_key>\n<arg_value>ls"
        "</arg_value>\n</tool_call>",
        tools=BASH_TOOLS,
        content="plain text. ",
        calls=[("execute_bash", {"command": "ls"})],
    ),
    peer(
        "sj_unknown_zero_arg_call_skipped",
        SJ,
        "<tool_call>no_newline_separator</tool_call><tool_call>execute_bash\n<arg_key>command"
        "</arg_key>\n<arg_value>ls</arg_value>\n</tool_call>",
        tools=BASH_TOOLS,
        calls=[("execute_bash", {"command": "ls"})],
        differs="as sg_invalid_tool (the name is not among the tools)",
        ours={"calls": [("no_newline_separator", {}), ("execute_bash", {"command": "ls"})]},
    ),
    peer(
        "sj_unknown_function",
        SJ,
        "<tool_call>mystery\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
        tools=BASH_TOOLS,
        differs="as sg_invalid_tool",
        ours={"calls": [("mystery", {"x": 1})]},
    ),
    peer(
        "sj_literal_newline",
        SJ,
        "<tool_call>execute_bash\\n<arg_key>command</arg_key>\\n<arg_value>ls</arg_value>\\n"
        "</tool_call>",
        tools=BASH_TOOLS,
        calls=[("execute_bash", {"command": "ls"})],
    ),
    peer(
        "sj_param_types",
        SJ,
        "<tool_call>do_thing\n<arg_key>n</arg_key>\n<arg_value>42</arg_value>\n"
        "<arg_key>ratio</arg_key>\n<arg_value>3.14</arg_value>\n<arg_key>flag</arg_key>\n"
        '<arg_value>true</arg_value>\n<arg_key>obj</arg_key>\n<arg_value>{"k": 1}</arg_value>\n'
        "</tool_call>",
        tools=TYPED_TOOLS,
        calls=[("do_thing", {"n": 42, "ratio": 3.14, "flag": True, "obj": {"k": 1}})],
    ),
]


# -- SGLang test_glm47_schema_types.py: one GLM-4.7 call to "inspect" per case ---------------------
SGT = "sglang unit/function_call/test_glm47_schema_types"


def _inspect(test, schema, expected, raw_values=None, **kw):
    """As that file's check_arguments: ``expected`` written raw (strings) or as JSON."""
    pairs = "".join(
        f"<arg_key>{k}</arg_key><arg_value>"
        f"{(raw_values or {}).get(k, v if isinstance(v, str) else json.dumps(v))}</arg_value>"
        for k, v in expected.items()
    )
    tool = {"type": "function", "function": {"name": "inspect", "parameters": schema}}
    n = sum(c["name"].startswith(f"sgt_{test}_") for c in SCHEMA_CASES)
    SCHEMA_CASES.append(
        peer(
            f"sgt_{test}_{n}",
            f"{SGT}::test_{test}",
            f"<tool_call>inspect{pairs}</tool_call>",
            tools=[tool],
            prompt=P47_OFF,
            calls=[("inspect", expected)],
            **kw,
        )
    )


def _value(field):
    return {"type": "object", "properties": {"value": field}}


SCHEMA_CASES: list[dict] = []
for _field, _v in [
    ({"type": ["integer", "string"]}, "auto"),
    ({"type": ["string", "integer"]}, 7),
    ({"type": ["number", "string"]}, "auto"),
    ({"type": ["object", "string"]}, "auto"),
    ({"type": ["string", "object"]}, {"ok": False}),
    ({"type": ["boolean", "string"]}, "auto"),
    ({"type": ["string", "boolean"]}, False),
    ({"type": ["string", "null"]}, None),
    ({"type": ["null"]}, None),
    ({"type": "null"}, None),
    ({"enum": ["ok", None]}, None),
    ({"type": ["string", "null"], "enum": ["ok", None]}, None),
    ({"anyOf": [{"type": "string", "enum": ["auto"]}, {"type": "integer"}]}, 7),
    ({"oneOf": [{"type": "null"}, {"type": "array", "items": {"type": "integer"}}]}, [1, 2]),
    ({"const": 7}, 7),
    ({"const": {"ok": False}}, {"ok": False}),
    ({"const": "null"}, "null"),
    ({"allOf": [{"type": ["integer", "string"]}, {"type": "integer"}]}, 7),
    ({}, "123_456"),
    ({}, {"ok": False}),
    *[(S, v) for v in ("null", "true", "1e2", "123_456", "\\d+", 'line one\n"quoted" \\ café')],
]:
    _inspect("field_types", _value(_field), {"value": _v})
_inspect(
    "field_types",
    _value({"type": ["string", "null"]}),
    {"value": "null"},
    {"value": '"null"'},
    differs="SGLang unquotes a JSON string for a string-or-null field; we keep string values "
    "byte for byte",
    ours={"calls": [("inspect", {"value": '"null"'})]},
)
for _v, _field in [(7, {"type": "integer"}), ({"ok": False}, {"type": "object"}), ("null", S)]:
    for _defs in ("$defs", "definitions"):
        _inspect(
            "local_references_and_cycles",
            {
                _defs: {"a/b~c": _field},
                "type": "object",
                "properties": {"value": {"$ref": f"#/{_defs}/a~1b~0c"}},
            },
            {"value": _v},
        )
_inspect(
    "local_references_and_cycles",
    {"$defs": {"args": _value(S)}, "$ref": "#/$defs/args"},
    {"value": "null"},
)
_inspect(
    "local_references_and_cycles",
    {
        "$defs": {"cycle": {"$ref": "#/$defs/cycle"}},
        "properties": {"value": {"$ref": "#/$defs/cycle"}},
    },
    {"value": "auto"},
)
_TEXT = {"type": "object", "properties": {"kind": {"const": "text"}, "value": S}}
_COUNT = {
    "type": "object",
    "properties": {"kind": {"const": "count"}, "value": {"type": "integer"}},
}
for _kw in ("anyOf", "oneOf"):
    for _branches in ([_TEXT, _COUNT], [_COUNT, _TEXT]):
        _inspect("root_unions", {_kw: _branches}, {"kind": "text", "value": "auto"})
        _inspect("root_unions", {_kw: _branches}, {"kind": "count", "value": 7})
_inspect(
    "root_unions",
    {"allOf": [_COUNT, {"required": ["kind", "value"]}]},
    {"kind": "count", "value": 7},
)
for _field, _v in [
    ({"type": ["string", "object"]}, "7"),
    ({"type": ["object", "string"]}, "7"),
    ({"oneOf": [S, {"type": "object"}]}, "7"),
    ({"type": ["string", "array"]}, "1e2"),
    ({"type": ["string", "integer"]}, "true"),
    ({"type": ["string", "integer"]}, "null"),
    ({"enum": ["7", None]}, "7"),
    ({"enum": ["7", 8]}, "7"),
    ({"enum": ["7", 8]}, 8),
    ({"enum": ["true", 7]}, "true"),
    ({"enum": ["null", 7]}, "null"),
    ({"enum": ["7", False]}, "7"),
    ({"type": ["string", "integer"]}, 7),
    ({"type": ["string", "boolean"]}, True),
    ({"type": ["string", "null"]}, None),
    ({"type": ["string", "object"]}, {"ok": True}),
    ({"type": ["number", "string"], "enum": [1, "auto"]}, 1),
    ({"type": ["number", "string"], "enum": [1, "auto"]}, 1.0),
]:
    _inspect("native_strings_reject_disallowed_types_and_values", _value(_field), {"value": _v})
_inspect(
    "native_strings_reject_disallowed_types_and_values",
    {
        "$defs": {"value": {"type": ["string", "object"]}},
        "properties": {"value": {"$ref": "#/$defs/value"}},
    },
    {"value": "7"},
)
for _v in ('{"a":1}', "[1,2]", '{ "a" : true }'):
    for _field in (S, {"const": _v}):
        _inspect(
            "json_looking_string_bytes_are_preserved",
            {"properties": {"value": _field}},
            {"value": _v},
        )
for _raw in ('"1"', '\\"1\\"'):
    _inspect(
        "nonstream_numeric_strings_with_integer_enum",
        {"properties": {"value": {"type": "number", "enum": [1, 2]}}},
        {"value": 1},
        {"value": _raw},
    )
for _type in ("number", "integer"):
    for _raw, _v in (
        ("123abc", "123abc"),
        ('"123"', 123),
        ('\\"123\\"', 123),
        ("-12", -12),
        ("1.25e2", 125.0),
        ("", ""),
    ):
        _kw = {}
        if _type == "integer" and _raw == "1.25e2":
            _kw = {
                "differs": "an integral number for an integer field becomes an integer (SGLang "
                "keeps 125.0)",
                "ours": {"calls": [("inspect", {"value": 125})]},
            }
        _inspect(
            "numeric_values_are_serialized_after_the_value_closes",
            {"properties": {"value": {"type": _type}}},
            {"value": _v},
            {"value": _raw},
            **_kw,
        )
for _kw in ("oneOf", "anyOf"):
    for _disc in ("const", "enum"):
        _bs = [
            {"properties": {"kind": {_disc: [k] if _disc == "enum" else k}, "value": {"type": t}}}
            for k, t in (("text", "string"), ("count", "integer"))
        ]
        for _ordered in (_bs, list(reversed(_bs))):
            for _schema in (
                {_kw: _ordered},
                {_kw: [{"allOf": [b]} for b in _ordered]},
                {
                    "$defs": {str(i): b for i, b in enumerate(_ordered)},
                    _kw: [{"$ref": f"#/$defs/{i}"} for i in range(2)],
                },
            ):
                for _args in (
                    {"kind": "text", "value": "7"},
                    {"kind": "count", "value": 7},
                    {"value": "7", "kind": "text"},
                    {"value": 7, "kind": "count"},
                ):
                    _inspect("completed_siblings_disambiguate_root_union", _schema, _args)
PEER_CASES += SCHEMA_CASES
_ONEOF = {
    "oneOf": [
        _value_kind
        for _value_kind in (
            {"properties": {"kind": {"const": "text"}, "value": S}},
            {"properties": {"kind": {"const": "count"}, "value": {"type": "integer"}}},
        )
    ]
}
PEER_CASES.append(
    peer(
        "sgt_completed_arguments_reset_between_tool_calls",
        f"{SGT}::test_completed_arguments_reset_between_tool_calls",
        "<tool_call>inspect<arg_key>kind</arg_key><arg_value>text</arg_value><arg_key>value"
        "</arg_key><arg_value>7</arg_value></tool_call><tool_call>inspect<arg_key>value</arg_key>"
        "<arg_value>7</arg_value><arg_key>kind</arg_key><arg_value>count</arg_value></tool_call>"
        "<tool_call>inspect<arg_key>value</arg_key><arg_value>7</arg_value><arg_key>kind"
        "</arg_key><arg_value>text</arg_value></tool_call><tool_call>plain<arg_key>value"
        "</arg_key><arg_value>hello</arg_value></tool_call>",
        tools=[
            {"type": "function", "function": {"name": "inspect", "parameters": _ONEOF}},
            {"type": "function", "function": {"name": "plain", "parameters": _value(S)}},
        ],
        prompt=P47_OFF,
        calls=[
            ("inspect", {"kind": "text", "value": "7"}),
            ("inspect", {"value": 7, "kind": "count"}),
            ("inspect", {"value": "7", "kind": "text"}),
            ("plain", {"value": "hello"}),
        ],
    )
)
