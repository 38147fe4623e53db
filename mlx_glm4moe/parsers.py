r"""Reasoning and tool-call parsing for GLM-4.5 / 4.6 / 4.7 (``glm4_moe``) generations.

The model writes (GLM-4.5/4.6, thinking on)::

    \n<think>REASONING</think>\nANSWER\n<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>

GLM-4.7 drops the newlines inside calls (``<tool_call>NAME<arg_key>K</arg_key>…``, and
``<tool_call>NAME</tool_call>`` without arguments) and its template ends the generation prompt with
``<think>`` (thinking on: the output starts inside the reasoning, the first tag it writes is
``</think>``) or ``</think>`` (thinking off).

:class:`StreamParser` is one small state machine over the generated text; :func:`parse_assistant`
is literally "feed the whole text, close, take the result", so streaming and batch parsing agree
exactly by construction, whatever way the text is cut into pieces.

Rules (chosen so they can be applied incrementally; they match the chat template, which
renders ``reasoning.strip()`` and ``content.strip()``):

* Where the output starts comes from the rendered ``prompt``: after a prompt ending with an open
  ``<think>`` the output is reasoning from its first character until ``</think>``; after any other
  prompt it is content. Without a prompt (``thinking=True``) the parser cannot know whether the
  template opened ``<think>``: the leading text is undecided and held back until ``<think>``,
  ``</think>`` or ``<tool_call>`` decides it (text before a bare ``</think>`` is reasoning), or the
  generation ends (it is content). ``thinking=False`` without a prompt starts in content.
* Every ``<think>…</think>`` block is reasoning, also after content or between tool calls
  (interleaved thinking): ``reasoning_content`` is the blocks, each stripped, joined by a blank
  line; ``content`` is the text outside them and outside tool calls. A ``<think>`` inside
  reasoning and a ``</think>`` outside it are stray and dropped.
* ``reasoning_content`` and ``content`` are ``str.strip()``-ed: leading whitespace is dropped,
  trailing whitespace is held back until non-whitespace text follows (so it is dropped at the
  end). Whitespace between two pieces survives only when text follows it:
  ``"A\n<tool_call>…</tool_call>\nB"`` gives content ``"A\n\nB"``. ``reasoning_content`` is
  ``None`` when no reasoning section was seen, ``""`` for ``<think></think>``.
* Text is emitted as soon as it cannot be the start of a tag; only a possible tag prefix (and
  trailing whitespace) waits for the next piece.
* String arguments are kept byte-exact (no stripping, no unquoting): the template writes string
  values raw, so exact is the only rule that round-trips values such as file contents ending in
  "\n". Other arguments are typed from the tool's JSON schema (local ``$ref`` into ``$defs`` /
  ``definitions``, ``anyOf``/``oneOf``/``allOf``, type lists, ``enum``/``const``, and a
  discriminated union at the root of ``parameters``): JSON, a quoted JSON scalar (``"123"``
  for an integer), JSON-escaped JSON, or a Python literal (``True``, ``{'a': 1}``), whichever
  first fits the schema. Without a schema a value is JSON (or a JSON-escaped object or array)
  if it parses as such, else the text.
* A broken call is kept verbatim in ``content`` (its trailing whitespace aside, by the rule
  above) and ``malformed`` names the first problem met: ``unclosed_tool_call`` (truncated),
  ``missing_arg_value`` (no ``<arg_value>…</arg_value>`` after a key, e.g. a lost
  ``</arg_value>``), ``bad_arg_key``, ``unexpected_text``, ``missing_tool_name``,
  ``bad_tool_name``, ``bad_json_call``; also ``unclosed_think`` (truncated reasoning; nothing
  is moved to content). A call to a function missing from a non-empty ``tools`` is returned as a
  tool call all the same (the client can answer it with an error the model reads) and flagged
  ``unknown_tool``. Well-formed calls before or after a broken one are still returned. Nothing
  ever raises on model output.
* A ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` JSON-style call is accepted too.
* Tool calls are emitted whole when ``</tool_call>`` arrives. Ids hash (``id_salt``, index,
  name, arguments): deterministic, so streaming and batch agree. Pass a per-request
  ``id_salt`` to make ids unique across requests.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from typing import Any

__all__ = ["StreamParser", "normalize_messages", "parse_assistant"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"

# Tags the machine looks for in each state. "pre" = no prompt given, nothing decided yet.
_TAGS = {
    "pre": (THINK_OPEN, THINK_CLOSE, CALL_OPEN),
    "reasoning": (THINK_CLOSE, THINK_OPEN),
    "content": (CALL_OPEN, THINK_OPEN, THINK_CLOSE),
}


def _start_state(prompt: str | None, thinking: bool) -> str:
    """The state the rendered prompt leaves the output in (see the module docstring)."""
    if prompt is None:
        return "pre" if thinking else "content"
    return "reasoning" if prompt.rstrip().endswith(THINK_OPEN) else "content"


class _Stripper:
    """Incremental ``str.strip()``: the returned pieces join to ``"".join(pushed).strip()``,
    or, with sections, to the non-empty stripped sections joined by blank lines."""

    def __init__(self) -> None:
        self.started = False  # has a non-whitespace character been emitted (in this section)?
        self.held = ""  # trailing whitespace, emitted only if more text follows
        self.sep = ""  # put before the next section's first text
        self.parts: list[str] = []  # everything emitted so far

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
            text, self.sep = self.sep + text, ""
        body = self.held + text
        out = body.rstrip()
        self.held = body[len(out) :]
        self.parts.append(out)
        return out

    def section(self) -> None:
        """Strip what follows on its own; join it to the text so far with a blank line."""
        if self.parts:
            self.started, self.held, self.sep = False, "", "\n\n"


def _held_suffix(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that could still grow into one of ``tags``."""
    longest = max(len(t) for t in tags) - 1
    for k in range(min(len(buf), longest), 0, -1):
        tail = buf[-k:]
        if any(t.startswith(tail) for t in tags):
            return k
    return 0


class StreamParser:
    """Incremental parser for one assistant generation.

    ``feed(piece)`` returns events ``{"type": "reasoning"|"content", "delta": str}`` and
    ``{"type": "tool_call", "tool_call": {..., "index": n}}``; ``close()`` flushes what was
    held back (a trailing tag prefix, an unfinished call, undecided text without a prompt).
    After ``close()``, ``result()`` equals ``parse_assistant(full_text, tools, ...)`` with the
    same arguments. Never emits a partial tag. Arguments as for :func:`parse_assistant`.
    """

    def __init__(
        self,
        tools: list | None = None,
        *,
        prompt: str | None = None,
        thinking: bool = True,
        id_salt: str = "",
    ) -> None:
        self._schemas = _tool_schemas(tools)
        self._salt = id_salt
        self._state = _start_state(prompt, thinking)  # "pre"|"reasoning"|"content"|"call"
        self._buf = ""  # unprocessed text: a possible tag prefix, or the body of an open call
        self._scanned = 0  # in "call": how much of _buf is known to hold no CALL_CLOSE
        self._pre: list[str] = []  # "pre" text: reasoning if a bare </think> follows, else content
        self._content = _Stripper()
        # One stripper for all reasoning blocks, one section each.
        self._reasoning = _Stripper() if self._state == "reasoning" else None
        self._calls: list[dict] = []
        self._malformed: str | None = None
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    def feed(self, piece: str) -> list[dict]:
        """Consume the next piece of generated text; return the events it completes."""
        if self._closed:
            raise RuntimeError("StreamParser.feed() after close()")
        events: list[dict] = []
        self._buf += piece
        while self._step(events):
            pass
        return events

    def close(self) -> list[dict]:
        """End of generation: flush held-back text, flag truncation. Idempotent."""
        events: list[dict] = []
        if self._closed:
            return events
        self._closed = True
        rest, self._buf = self._buf, ""
        if self._state == "pre":  # no tag at all: everything is content
            self._to_content("".join(self._pre) + rest, events)
        elif self._state == "reasoning":  # truncated inside <think>
            self._to_reasoning(rest, events)
            self._flag("unclosed_think")
        elif self._state == "call":  # truncated inside <tool_call>: keep it verbatim
            self._to_content(CALL_OPEN + rest, events)
            self._flag("unclosed_tool_call")
        else:
            self._to_content(rest, events)
        return events

    def result(self) -> dict:
        """The parse so far; exactly ``parse_assistant``'s answer once ``close()`` was called."""
        return {
            "content": self._content.text,
            "reasoning_content": None if self._reasoning is None else self._reasoning.text,
            "tool_calls": [_strip_index(c) for c in self._calls],
            "malformed": self._malformed,
        }

    # -- machine --------------------------------------------------------------------------------

    def _step(self, events: list[dict]) -> bool:
        """Handle the first tag in the buffer, or flush the tag-free part. True = call again."""
        buf = self._buf
        if self._state == "call":
            end = buf.find(CALL_CLOSE, self._scanned)
            if end < 0:
                # Only the last len(CALL_CLOSE)-1 chars can start a CALL_CLOSE later.
                self._scanned = max(0, len(buf) - len(CALL_CLOSE) + 1)
                return False
            self._buf, self._scanned, self._state = buf[end + len(CALL_CLOSE) :], 0, "content"
            self._finish_call(buf[:end], events)
            return True

        tags = _TAGS[self._state]
        hits = [(i, t) for t in tags if (i := buf.find(t)) >= 0]
        if not hits:
            keep = _held_suffix(buf, tags)
            self._text(buf[: len(buf) - keep], events)
            self._buf = buf[len(buf) - keep :]
            return False
        pos, tag = min(hits)  # tags never share a start, so this is the leftmost tag
        self._text(buf[:pos], events)
        self._buf = buf[pos + len(tag) :]
        self._tag(tag, events)
        return True

    def _text(self, text: str, events: list[dict]) -> None:
        if not text:
            return
        if self._state == "pre":
            self._pre.append(text)  # undecided: held until a tag or close() tells what it is
        elif self._state == "reasoning":
            self._to_reasoning(text, events)
        else:
            self._to_content(text, events)

    def _tag(self, tag: str, events: list[dict]) -> None:
        if self._state == "pre":
            pre, self._pre = "".join(self._pre), []
            if tag == THINK_OPEN:  # normal case: pre is the "\n" before <think>
                self._to_content(pre, events)
                self._state = "reasoning"
            elif tag == THINK_CLOSE:  # the prompt already opened <think>
                self._to_reasoning(pre, events)
                self._state = "content"
            else:  # CALL_OPEN: no reasoning section at all
                self._to_content(pre, events)
                self._state = "call"
        elif self._state == "reasoning":
            if tag == THINK_CLOSE:
                self._state = "content"
            # a nested <think> is stray: dropped
        elif tag == CALL_OPEN:
            self._state = "call"
        elif tag == THINK_OPEN:  # interleaved thinking: after content or between tool calls
            self._state = "reasoning"
            if self._reasoning is not None:
                self._reasoning.section()
        # a stray </think> in content: dropped
        if self._state == "reasoning" and self._reasoning is None:
            self._reasoning = _Stripper()

    def _to_reasoning(self, text: str, events: list[dict]) -> None:
        if self._reasoning is None:
            self._reasoning = _Stripper()
        delta = self._reasoning.push(text)
        if delta:
            events.append({"type": "reasoning", "delta": delta})

    def _to_content(self, text: str, events: list[dict]) -> None:
        delta = self._content.push(text)
        if delta:
            events.append({"type": "content", "delta": delta})

    def _flag(self, why: str) -> None:
        if self._malformed is None:  # keep the first problem: later ones are often its echo
            self._malformed = why

    def _finish_call(self, body: str, events: list[dict]) -> None:
        name, args, why = _parse_call_body(body, self._schemas)
        if why is not None:
            self._flag(why)
            self._to_content(CALL_OPEN + body + CALL_CLOSE, events)
            return
        if self._schemas is not None and name not in self._schemas:
            self._flag("unknown_tool")  # still a call (as vLLM): the client can answer it
        index = len(self._calls)
        arguments = json.dumps(args, ensure_ascii=False)
        digest = hashlib.sha256(f"{self._salt}\0{index}\0{name}\0{arguments}".encode()).hexdigest()
        call = {
            "id": f"call_{digest[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
            "index": index,
        }
        self._calls.append(call)
        events.append({"type": "tool_call", "tool_call": copy.deepcopy(call)})


def parse_assistant(
    text: str,
    tools: list | None = None,
    *,
    prompt: str | None = None,
    thinking: bool = True,
    id_salt: str = "",
) -> dict:
    """Parse one generated assistant turn (the text after the prompt).

    Returns ``{"content": str, "reasoning_content": str | None, "tool_calls": [OpenAI calls],
    "malformed": None | str}``. ``tools`` (OpenAI tools list) types the arguments and flags
    unknown names. ``prompt`` is the rendered prompt the text continues: its end (an open
    ``<think>`` or not) says where the output starts. Without it, ``thinking=False`` means the
    prompt ended with ``<think></think>``, ``thinking=True`` that it is not known whether it
    opened ``<think>``. Never raises on model output. See the module docstring for the rules.
    """
    parser = StreamParser(tools, prompt=prompt, thinking=thinking, id_salt=id_salt)
    parser.feed(text)
    parser.close()
    return parser.result()


def _strip_index(call: dict) -> dict:
    out = copy.deepcopy(call)
    out.pop("index", None)
    return out


# -- tool-call bodies ---------------------------------------------------------------------------


def _tool_schemas(tools: list | None) -> dict[str, dict] | None:
    """name -> parameters schema; None when no tools were given (then any name is accepted)."""
    if not tools:
        return None
    schemas: dict[str, dict] = {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function", tool)  # OpenAI wrapper, or a bare function object
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            schemas[fn["name"].strip()] = params if isinstance(params, dict) else {}
    return schemas


def _skip_separators(s: str, i: int) -> int:
    """Skip whitespace and literal backslash-n pairs (vLLM accepts both between tags)."""
    while i < len(s):
        if s[i].isspace():
            i += 1
        elif s.startswith("\\n", i):
            i += 2
        else:
            break
    return i


def _parse_call_body(
    body: str, schemas: dict[str, dict] | None
) -> tuple[str, dict[str, Any], str | None]:
    """Parse the text between <tool_call> and </tool_call> into (name, args, why_malformed)."""
    stripped = body.strip()
    if stripped.startswith("{"):  # the model slipped into JSON tool calls (a known GLM drift)
        return _parse_json_call(stripped, schemas)

    # Name: up to the first newline, literal "\n", or <arg_key> (GLM-4.7 has no newline),
    # after any whitespace the model put right after <tool_call>.
    start = len(body) - len(body.lstrip())
    cuts = [body.find(sep, start) for sep in ("\n", "\\n", KEY_OPEN)]
    end = min([i for i in cuts if i >= 0], default=len(body))
    name = body[start:end].strip()
    if not name:
        return name, {}, "missing_tool_name"
    if any(c.isspace() or c in "<>" for c in name):
        return name, {}, "bad_tool_name"
    pairs: list[tuple[str, str]] = []  # (key, raw value text)
    i = _skip_separators(body, end)
    while i < len(body):
        if not body.startswith(KEY_OPEN, i):
            return name, {}, "unexpected_text"
        k_end = body.find(KEY_CLOSE, i)
        key = body[i + len(KEY_OPEN) : k_end].strip() if k_end >= 0 else ""
        if not key or KEY_OPEN in key or VALUE_OPEN in key:
            return name, {}, "bad_arg_key"
        i = _skip_separators(body, k_end + len(KEY_CLOSE))
        if not body.startswith(VALUE_OPEN, i):
            return name, {}, "missing_arg_value"
        v_start = i + len(VALUE_OPEN)
        v_end = body.find(VALUE_CLOSE, v_start)
        raw = body[v_start:v_end] if v_end >= 0 else ""
        # A value running into the next <arg_key>/<arg_value> lost its </arg_value>.
        if v_end < 0 or KEY_OPEN in raw or VALUE_OPEN in raw:
            return name, {}, "missing_arg_value"
        pairs.append((key, raw))
        i = _skip_separators(body, v_end + len(VALUE_CLOSE))
    root = schemas.get(name) if schemas is not None else None  # None: untyped
    props = _property_schemas(root, pairs)
    return name, {k: _read(raw, props.get(k), root)[0] for k, raw in pairs}, None


def _parse_json_call(
    text: str, schemas: dict[str, dict] | None
) -> tuple[str, dict[str, Any], str | None]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""
    obj = _loads(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return "", {}, "bad_json_call"
    name = obj["name"].strip()
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(args, dict):
        return name, {}, "bad_json_call"
    return name, args, None


def _property_schemas(root: Any, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Argument name -> property schema, for one call to the tool whose ``parameters`` schema is
    ``root`` (empty: untyped). A union at the root (``anyOf``/``oneOf`` of objects: a
    discriminated union) is narrowed to the branches whose ``const``/``enum`` properties the
    arguments fit."""
    branches = _branches(root, root)
    if len(branches) > 1:
        fitting = [
            b
            for b in branches
            if all(
                _read(raw, b[k], root)[1]
                for k, raw in pairs
                if k in b and _schema_enum(b[k], root) is not None
            )
        ]
        branches = fitting or branches
    merged: dict[str, list] = {}
    for branch in branches:
        for key, schema in branch.items():
            merged.setdefault(key, []).append(schema)
    return {k: s[0] if len(s) == 1 else {"anyOf": s} for k, s in merged.items()}


def _branches(schema: Any, root: Any, depth: int = 0) -> list[dict[str, Any]]:
    """The property maps an object schema allows: one per ``anyOf``/``oneOf`` branch, with the
    schema's own ``properties`` and its ``allOf`` parts merged in."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > 16:
        return []
    own = schema.get("properties")
    found = isinstance(own, dict)
    base = dict(own) if found else {}
    parts = schema.get("allOf")
    for part in parts if isinstance(parts, list) else ():
        for branch in _branches(part, root, depth + 1):
            base.update(branch)
            found = True
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(alternatives, list):
        out = [{**base, **b} for alt in alternatives for b in _branches(alt, root, depth + 1)]
        if out:
            return out
    return [base] if found else []


def _resolve(schema: Any, root: Any) -> Any:
    """Follow local ``$ref`` pointers (``#/$defs/X``, ``#/definitions/X``) within ``root``;
    None for a reference that cannot be followed."""
    for _ in range(16):  # a reference cycle ends here
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str):
            return schema
        if not ref.startswith("#"):
            return None  # remote references are not fetched
        schema = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            schema = schema.get(part) if isinstance(schema, dict) else None
    return None


# -- argument typing ----------------------------------------------------------------------------

_FAIL = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # NaN/Infinity would make json.dumps emit invalid JSON


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # "1e999"
        raise ValueError(text)
    return value


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return _FAIL


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _schema_types(schema: Any, root: Any, depth: int = 0) -> set[str] | None:
    """JSON types a property schema allows; None = unknown (anything goes)."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > 16:
        return None
    types: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        types.add(t)
    elif isinstance(t, list):
        types.update(x for x in t if isinstance(x, str))
    if types and schema.get("nullable") is True:  # OpenAPI 3.0's spelling of ["T", "null"]
        types.add("null")
    for key in ("anyOf", "oneOf", "allOf"):
        subs = schema.get(key)
        for sub in subs if isinstance(subs, list) else ():
            sub_types = _schema_types(sub, root, depth + 1)
            if sub_types is None:  # an untyped branch accepts anything
                return None
            types |= sub_types
    if not types:
        values = schema["enum"] if isinstance(schema.get("enum"), list) else []
        if "const" in schema:
            values = [schema["const"]]
        types = {_json_type(v) for v in values}
    if not types and "properties" in schema:
        types = {"object"}
    return types or None


def _schema_enum(schema: Any, root: Any, depth: int = 0) -> list | None:
    """The values a property schema lists (``enum``, ``const``, across ``anyOf``/``oneOf``);
    None when it does not restrict the values."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return schema["enum"]
    subs = schema.get("anyOf") or schema.get("oneOf")
    if not isinstance(subs, list) or not subs:
        return None
    values: list = []
    for sub in subs:
        sub_values = _schema_enum(sub, root, depth + 1)
        if sub_values is None:
            return None
        values += sub_values
    return values


def _read(raw: str, schema: Any, root: Any) -> tuple[Any, bool]:
    """Type one raw <arg_value> text by its property schema: (value, whether it fits).

    A value that may be a string stays byte-exact unless it is JSON of another allowed type
    (``7`` for ``["string", "integer"]``). Other values are read as JSON, a quoted JSON scalar
    (``"123"``), JSON-escaped JSON (``[{\"id\": 1}]``, seen from GLM-4.6) or a Python literal
    (``True``, ``{'a': 1}``), whichever first fits the schema's types and listed values.
    """
    types = _schema_types(schema, root)
    if types is None:  # no schema: JSON, else the text
        value = _loads(raw)
        if value is _FAIL:
            value = _escaped_json(raw)
            value = value if isinstance(value, (dict, list)) else _FAIL
        return (raw if value is _FAIL else value), True
    allowed = _schema_enum(schema, root)

    def fits(value: Any) -> bool:
        return _type_ok(_json_type(value), types) and (
            allowed is None or any(_same(value, a) for a in allowed)
        )

    text_ok = "string" in types
    if types != {"string"}:
        for value in _readings(raw, plain=text_ok):
            if value is _FAIL or isinstance(value, str):
                continue
            if isinstance(value, float) and value.is_integer() and "number" not in types:
                value = int(value)  # 3.0 for an integer field
            if fits(value):
                return value, True
    if text_ok:
        return raw, fits(raw)
    value = _loads(raw)  # nothing fits: the JSON reading, else the text
    return (raw if value is _FAIL else value), False


def _readings(raw: str, plain: bool) -> Iterator[Any]:
    """Ways to read a non-string value, most literal first (may yield _FAIL); only plain JSON
    when the value may also be a string."""
    value = _loads(raw)
    yield value
    if plain:
        return
    if isinstance(value, str):  # a quoted scalar or double-encoded JSON: "123"
        yield _loads(value.strip())
    value = _escaped_json(raw)
    yield value
    if isinstance(value, str):
        yield _loads(value.strip())
    yield _python_literal(raw)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _type_ok(jt: str, types: set[str]) -> bool:
    return jt in types or (jt == "integer" and "number" in types)


def _escaped_json(raw: str) -> Any:
    """The JSON value of text written JSON-escaped (``[{\"id\": 1}]``, ``\"123\"``)."""
    text = _loads(f'"{raw.strip()}"')
    return _loads(text) if isinstance(text, str) and text != raw.strip() else _FAIL


def _python_literal(raw: str) -> Any:
    """The JSON value of a Python literal (``True``, ``None``, ``{'a': (1, 2)}``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes such as '\d' warn
            value = ast.literal_eval(raw.strip())
        return json.loads(json.dumps(value, allow_nan=False))  # tuples become lists
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAIL  # not a literal, or sets, bytes, complex, NaN


# -- request side -------------------------------------------------------------------------------


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Copies of OpenAI chat ``messages`` made safe for the GLM-4.5 chat template.

    * assistant ``tool_calls[*].function.arguments`` given as a JSON string (OpenAI wire shape)
      become dicts, since the template calls ``.items()``; dicts are left as they are; an empty
      string or None becomes ``{}``; anything that is not a JSON object becomes
      ``{"raw_arguments": <the string>}``.
    * ``content: None`` becomes ``""`` (the template would otherwise render the word "None").
    The input list and its messages are not modified.
    """
    out = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        if isinstance(msg, dict):
            if "content" in msg and msg["content"] is None:
                msg["content"] = ""
            calls = msg.get("tool_calls")
            if msg.get("role") == "assistant" and isinstance(calls, list):
                for call in calls:
                    if not isinstance(call, dict):
                        continue
                    fn = call["function"] if isinstance(call.get("function"), dict) else call
                    if "arguments" in fn:
                        fn["arguments"] = _arguments_dict(fn["arguments"])
        out.append(msg)
    return out


def _arguments_dict(arguments: Any) -> Any:
    if arguments is None:
        return {}
    if not isinstance(arguments, str):
        return arguments  # already a dict (or something the caller chose); leave it alone
    if not arguments.strip():
        return {}
    value = _loads(arguments)
    return value if isinstance(value, dict) else {"raw_arguments": arguments}
