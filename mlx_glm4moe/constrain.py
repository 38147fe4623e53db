r"""Constrained decoding: structured output and forced tool calls, enforced while sampling.

A request's constraint is one llguidance grammar (Lark syntax with inline ``%json`` schemas),
built from what it asks for:

* ``response_format`` ``json_object`` / ``json_schema`` (OpenAI's shape): the answer is JSON that
  fits the schema, written as ``json.dumps`` writes it (``", "`` and ``": "``, no other
  whitespace, so a sampled answer cannot drift into endless blank space);
* ``tool_choice`` ``"required"`` or a function's name: the answer is one ``<tool_call>`` (or
  several, when parallel calls are allowed) of a function in ``tools``, in GLM's own format
  (``<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>``; GLM-4.7's
  template writes it without the newlines, and the grammar follows the template);
* ``strict`` function tools under ``tool_choice`` auto: free text, then calls that fit.

A call's arguments are the function's declared keys in declaration order, the required ones
present; a string value is raw text (as the template writes it and `parsers` reads it back),
held to its ``enum``/``const``, ``pattern`` and length bounds; any other value is JSON of its
schema. `parsers` decides which values are raw (its `_schema_types`), so the grammar writes what
the parser reads back. ``format`` on a raw string is an annotation (JSON Schema's default) and
is not checked. Schemas the grammar cannot hold (a union at the root of ``parameters``, keywords
llguidance does not implement) raise `ConstraintError`: the server answers 400, never ignores.

Reasoning stays free: the mask applies from where the answer starts (after ``</think>``; at once
when the prompt closed thinking; with GLM-4.5's template, which leaves opening ``<think>`` to
the model, an answer that starts without it is held from its first token).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .parsers import _branches, _resolve, _schema_enum, _schema_types

__all__ = ["ConstraintError", "Constraints", "ConstrainedSampler"]

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Raw text (string values, free answers) may hold no tag text: the parser would cut it there.
TAG_FREE = r"/(?s:.*)/ & ~/(?s:.*)<\/?(tool_call|arg_key|arg_value|think)>(?s:.*)/"


class ConstraintError(ValueError):
    """A constraint that cannot be enforced; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


# What a schema that passes JSON Schema's own check can still raise while its grammar is built
# (a keyword of an unexpected type that the meta-schema leaves open, nesting past the stack).
_BAD_SCHEMA = (ValueError, TypeError, AttributeError, KeyError, RecursionError)


def check_schema(schema: Any, what: str, param: str) -> None:
    """Raise `ConstraintError` naming `what` when `schema` is not a valid JSON schema (Draft
    2020-12's meta-schema): checked before a grammar is built from it."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in e.path)
        raise ConstraintError(
            f"{what} is not a valid JSON schema: {e.message} (at '{where or '.'}').", param
        ) from None
    except RecursionError:
        raise ConstraintError(f"{what} is nested too deep.", param) from None


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _json(schema: dict, root: Any = None) -> str:
    """An inline ``%json`` rule; `root`'s definitions come along for local references."""
    extra = {k: root[k] for k in ("$defs", "definitions") if isinstance(root, dict) and k in root}
    return "%json " + json.dumps({**extra, **schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


class _Grammar:
    """A Lark grammar under construction: named rules and terminals."""

    def __init__(self, sep: str) -> None:
        self.sep = f"{_lit(sep)} " if sep else ""  # between the parts of a call
        self.lines = [f"RAW: {TAG_FREE}"]

    def add(self, name: str, body: str) -> str:
        self.lines.append(f"{name}: {body}")
        return name

    def text(self, start: str) -> str:
        return "\n".join([f"start: {start}", *self.lines])

    def raw_string(self, name: str, key: str, schema: Any, root: Any) -> str:
        """A string value written raw: its pattern and length bounds, no tag text."""
        schema = _resolve(schema, root) or {}
        parts = []
        if "pattern" in schema:
            if not isinstance(schema["pattern"], str):
                raise ValueError(f"the pattern of '{key}' is not a string")
            # Matched whole: text that fits the anchored pattern fits it unanchored too.
            pattern = schema["pattern"].removeprefix("^").removesuffix("$")
            parts.append("/" + llguidance.regex_to_lark(pattern, "dw") + "/")
        if "minLength" in schema or "maxLength" in schema:
            low, high = schema.get("minLength", 0), schema.get("maxLength", "")
            if not all(isinstance(n, int) and n >= 0 for n in (low, high or 0)):
                raise ValueError(f"minLength and maxLength of '{key}' must be counts")
            parts.append(f"/(?s:.{{{low},{high}}})/")
        if not parts:
            return "RAW"
        return self.add(name.upper(), " & ".join([*parts, "RAW"]))

    def call(self, i: int, fn: dict) -> str:
        """The rule for one call to `fn` (an OpenAI function object)."""
        root = fn.get("parameters") or {}
        top = _resolve(root, root)
        if not isinstance(top, dict) or top.get("type", "object") != "object":
            raise ValueError("the parameters are not an object schema")
        branches = _branches(root, root)
        if len(branches) > 1:
            raise ValueError("a union at the root of the parameters cannot be held to")
        props = branches[0] if branches else {}
        required = set(top.get("required") or ())
        for part in top.get("allOf") or ():
            required |= set((_resolve(part, root) or {}).get("required") or ())
        if missing := sorted(required - set(props)):
            raise ValueError(f"required arguments without a schema: {missing}")
        body = [f"<tool_call> {_lit(fn['name'])}"]
        for j, (key, schema) in enumerate(props.items()):
            types = _schema_types(schema, root)
            values = _schema_enum(schema, root)
            if values is not None:  # strings raw, other values JSON, as the template writes
                if not values:
                    raise ValueError(f"'{key}' has an empty enum")
                texts = [v if isinstance(v, str) else json.dumps(v) for v in values]
                value = "(" + " | ".join(_lit(t) for t in texts) + ")"
            elif types == {"string"}:
                value = self.raw_string(f"v{i}_{j}", key, schema, root)
            elif types is None or "string" in types:
                value = "RAW"  # the parser reads JSON of another allowed type, else the text
            else:
                value = self.add(f"v{i}_{j}", _json(schema, root))
            arg = self.add(
                f"a{i}_{j}",
                f"<arg_key> {_lit(key)} </arg_key> {self.sep}<arg_value> {value} </arg_value>",
            )
            body.append(f"({self.sep}{arg})" + ("" if key in required else "?"))
        body.append(f"{self.sep}</tool_call>")
        return self.add(f"call{i}", " ".join(body))


class Constraints:
    """Builds and compiles the grammars of one model's requests (see the module docstring) and
    makes their samplers. The llguidance tokenizer is built once, on first use; compiled
    grammars are kept (least recently used first out) for requests that ask the same."""

    def __init__(self, tokenizer: TokenizerWrapper, vocab_size: int, keep: int = 64) -> None:
        self.tokenizer, self.vocab_size, self.keep = tokenizer, vocab_size, keep
        template = getattr(tokenizer, "chat_template", None) or ""
        self.sep = "" if "{function-name}<arg_key>" in template else "\n"
        self.think_open = tokenizer.convert_tokens_to_ids("<think>")
        self.think_close = tokenizer.convert_tokens_to_ids("</think>")
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = llguidance.hf.from_tokenizer(
                    self.tokenizer._tokenizer,
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self.tokenizer.eos_token_ids),
                )
            return self._ll

    def grammar(
        self,
        response_format: dict | None,
        tools: list[dict] | None,
        tool_choice: str | None,
        parallel: bool = True,
    ) -> str | None:
        """The grammar a request's answer must follow, None when nothing is enforced.
        `tool_choice` is None (auto), "none", "required" or a function name. Raises
        `ConstraintError` for what cannot be enforced."""
        answer = _answer_schema(response_format)
        forced = tool_choice not in (None, "none")
        strict = tool_choice is None and any(t["function"].get("strict") for t in tools or ())
        if answer is None and not forced and not strict:
            return None
        g = _Grammar(self.sep)
        calls = None
        if tools and tool_choice != "none":
            rules = []
            for i, tool in enumerate(tools):
                fn = tool["function"]
                if forced and tool_choice != "required" and fn["name"] != tool_choice:
                    continue
                param, what = f"tools[{i}].function.parameters", f"tools[{i}] ('{fn['name']}')"
                check_schema(fn.get("parameters") or {}, f"The parameters of {what}", param)
                try:
                    rules.append(g.call(i, fn))
                except _BAD_SCHEMA as e:
                    raise ConstraintError(f"{what}: {e}.", param) from None
            call = g.add("call", " | ".join(rules))
            more = f" ({g.sep}{call})*" if parallel else ""
            calls = g.add("calls", f"{call}{more}")
        if forced:
            return g.text(f'"\\n"? {calls}')
        if answer is not None:
            param = "response_format.json_schema.schema"
            check_schema(answer, "The response format's schema", param)
            try:
                json_rule = g.add("answer", _json(answer))
            except _BAD_SCHEMA as e:
                raise ConstraintError(f"The response format's schema: {e}.", param) from None
            return g.text(f'"\\n"? ({json_rule} | {calls})' if calls else f'"\\n"? {json_rule}')
        return g.text(f"RAW {calls}?")

    def check(
        self,
        response_format: dict | None,
        tools: list[dict] | None,
        tool_choice: str | None,
        parallel: bool = True,
    ) -> llguidance.LLMatcher | None:
        """Check a request's schemas (JSON Schema's meta-schema first, then whether llguidance
        can hold them) and compile its grammar: the errors a request should get before it runs.
        Returns the matcher its sampler starts from (the request's own: compiled here, in the
        request's thread, never on the engine's), None when nothing is enforced."""
        grammar = self.grammar(response_format, tools, tool_choice, parallel)
        if grammar is None:
            return None
        try:
            return self._matcher(grammar)
        except ValueError as e:
            raise ConstraintError(*self._blame(str(e), response_format, tools)) from None

    def sampler(
        self,
        grammar: str | llguidance.LLMatcher,
        sampler: Any,
        prompt: str | None,
        thinking: bool,
    ) -> ConstrainedSampler:
        """`sampler` held to `grammar` (its text, or a matcher from `check`) from where the
        answer starts (see `ConstrainedSampler`)."""
        matcher = self._matcher(grammar) if isinstance(grammar, str) else grammar
        end = (prompt or "").rstrip()
        if end.endswith("<think>"):
            start = "reasoning"
        elif end.endswith("</think>") or not thinking:
            start = "answer"
        else:
            start = "opening"
        return ConstrainedSampler(self, matcher, sampler, start)

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar`; raises ValueError with llguidance's message."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(_message(matcher.get_error()))
        with self._lock:
            self._compiled[grammar] = matcher
            if len(self._compiled) > self.keep:
                self._compiled.popitem(last=False)
        return matcher.deep_copy()

    def _blame(self, error: str, response_format: dict | None, tools: list[dict] | None):
        """(message, param) for a grammar that did not compile: the part that fails alone."""
        for i, tool in enumerate(tools or ()):
            try:
                self._matcher(self.grammar(None, [tool], tool["function"]["name"]))
            except (ValueError, ConstraintError) as e:
                return f"tools[{i}]: the parameters cannot be enforced: {e}", (
                    f"tools[{i}].function.parameters"
                )
        if response_format is not None and response_format.get("type") == "json_schema":
            param = "response_format.json_schema.schema"
            return f"The JSON schema cannot be enforced: {error}", param
        return f"The request cannot be enforced: {error}", "response_format"


def _answer_schema(response_format: dict | None) -> dict | None:
    """The JSON schema of the answer that chat completions' `response_format` asks for."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ConstraintError(f"Unknown response_format type '{kind}'.", "response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ConstraintError(
            "response_format.json_schema must be an object.", "response_format.json_schema"
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ConstraintError(
            "response_format.json_schema.schema must be a JSON schema object.",
            "response_format.json_schema.schema",
        )
    return schema


def _message(error: str) -> str:
    """llguidance's error without its position and the grammar listing that follows it."""
    text = re.sub(r"^at \d+\(\d+\): ", "", error.strip())
    text = re.split(r"\n\s*\d+ \| ", text)[0]  # the listing of our grammar
    return " ".join(text.split()) or "invalid grammar"


class ConstrainedSampler:
    """A request's sampler held to its grammar: the tokens the matcher does not allow are
    masked out of the log-probabilities before `sampler` draws.

    It starts in one of three states: "reasoning" (free until ``</think>``), "opening" (the
    answer's grammar, with ``<think>`` allowed too while only whitespace came; taking it starts
    free reasoning) or "answer". Each call first hands the matcher the token drawn last time:
    reading it waits for that token, a sync per step that only constrained requests pay.
    """

    def __init__(self, owner: Constraints, matcher: Any, sampler: Any, start: str) -> None:
        self.owner, self.matcher, self.sampler, self.state = owner, matcher, sampler, start
        self.last: mx.array | None = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.last is not None:
            self._advance(int(self.last.item()))
        if self.state == "reasoning":
            y = self.sampler(logprobs)
        else:
            y = self.sampler(mx.where(self._allowed(logprobs.shape[-1]), logprobs, -mx.inf))
        self.last = y
        return y

    def _advance(self, token: int) -> None:
        if self.state == "reasoning":
            if token == self.owner.think_close:
                self.state = "answer"
            return
        if self.state == "opening" and token == self.owner.think_open:
            self.matcher.reset()
            self.state = "reasoning"
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        if self.state == "opening" and self.owner.ll_tokenizer.decode_str([token]).strip():
            self.state = "answer"

    def _allowed(self, vocab: int) -> mx.array:
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[:vocab]
        if self.state == "opening":
            bits[self.owner.think_open] = 1
        # llguidance.mlx applies masks with a Metal kernel; this runs on every backend.
        return mx.array(bits.astype(bool))
