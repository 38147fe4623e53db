"""Chat: messages → chat template → generation → parsed assistant message, with prompt reuse.

`chat` / `stream_chat` are the Python API (and what the server and the command line build on);
`PromptCache` keeps KV caches across turns and requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .generate import encode, stream_generate
from .models import Model
from .mtp import make_cache
from .parsers import StreamParser, normalize_messages
from .prompt_cache import PromptCache

ROLES = ("system", "user", "assistant", "tool")


# apply_chat_template's own arguments: template variables must not replace them.
_RESERVED = {
    "conversation",
    "messages",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_dict",
}


def render_prompt(
    tokenizer: TokenizerWrapper,
    messages: list[dict],
    tools: list[dict] | None = None,
    enable_thinking: bool = True,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text for `messages` (OpenAI shape) through the model's chat template, ending
    with the assistant generation prompt. `chat_template_kwargs` are extra template variables
    (GLM-4.7's `clear_thinking`, ...); an `enable_thinking` among them wins over the argument."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] needs a 'role' among {', '.join(ROLES)}")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ValueError("tools must be a list of OpenAI tool objects")
    extra = chat_template_kwargs or {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise ValueError("chat_template_kwargs must be an object with string keys")
    if reserved := sorted(_RESERVED.intersection(extra)):
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
    try:
        return tokenizer.apply_chat_template(
            normalize_messages(messages),
            tools=tools or None,
            add_generation_prompt=True,
            tokenize=False,
            **{"enable_thinking": enable_thinking, **extra},
        )
    except Exception as e:  # jinja errors on malformed messages; say which call failed
        raise ValueError(f"The chat template could not render these messages: {e}") from e


def encode_messages(
    tokenizer: TokenizerWrapper,
    messages: list[dict],
    tools: list[dict] | None = None,
    enable_thinking: bool = True,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Prompt token ids for `render_prompt`'s text (same arguments)."""
    prompt = render_prompt(
        tokenizer, messages, tools, enable_thinking, chat_template_kwargs=chat_template_kwargs
    )
    return encode(tokenizer, prompt)


class StopText:
    """Cuts a text stream before the first of the `stops` strings, holding back any tail that
    could still grow into one. `matched` is the stop string found, if any."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that is safe to emit, whether a stop string was found)."""
        text = self.held + text
        hits = sorted((i, s) for s in self.stops if (i := text.find(s)) >= 0)
        if hits:
            self.held, self.matched = "", hits[0][1]
            return text[: hits[0][0]], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Reply:
    """One generation's text → chat events, and at the end the assistant message.

    `feed(text)` returns the parser's events (`reasoning` / `content` deltas, whole
    `tool_call`s) with stop strings cut from the content (`stopped` turns true at the first
    one: the caller ends the generation) and, without `parallel`, only the first tool call.
    `close(finish_reason, usage)` returns what was held back and then the `done` event:
    `{"type": "done", "message", "finish_reason", "stop_sequence", "usage", "malformed"}`.
    `stream_chat` and the server both assemble replies with it.
    """

    def __init__(
        self,
        tools: list[dict] | None,
        prompt: str | None,
        *,
        stop: list[str] | None = None,
        parallel: bool = True,
        id_salt: str | None = None,
    ) -> None:
        salt = uuid.uuid4().hex if id_salt is None else id_salt
        self.parser = StreamParser(tools, prompt=prompt, id_salt=salt)
        self.stop = StopText(stop or [])
        self.parallel = parallel
        self.stopped = False
        self.content: list[str] = []
        self.calls: list[dict] = []

    def feed(self, text: str) -> list[dict]:
        return self._kept(self.parser.feed(text))

    def close(self, finish_reason: str | None, usage: dict) -> list[dict]:
        events = self._kept(self.parser.close())
        if not self.stopped and self.stop.held:
            text = self.stop.flush()
            self.content.append(text)
            events.append({"type": "content", "delta": text})
        result = self.parser.result()
        finish = "stop" if self.stopped else finish_reason or "length"
        if finish == "stop" and self.calls:
            finish = "tool_calls"
        message = {
            "role": "assistant",
            "content": "".join(self.content),
            "reasoning_content": result["reasoning_content"],
            "tool_calls": self.calls,
        }
        done = {"type": "done", "message": message, "finish_reason": finish}
        done |= {"stop_sequence": self.stop.matched, "usage": usage}
        return events + [{**done, "malformed": result["malformed"]}]

    def _kept(self, events: list[dict]) -> list[dict]:
        out = []
        for e in events:
            if self.stopped:
                break
            if e["type"] == "content" and self.stop.stops:
                text, self.stopped = self.stop.feed(e["delta"])
                e = {"type": "content", "delta": text}
            if e["type"] == "content":
                if not e["delta"]:
                    continue
                self.content.append(e["delta"])
            elif e["type"] == "tool_call":
                if self.calls and not self.parallel:
                    continue
                self.calls.append({k: v for k, v in e["tool_call"].items() if k != "index"})
            out.append(e)
        return out


def stream_chat(
    model: Model,
    tokenizer: TokenizerWrapper,
    messages: list[dict],
    tools: list[dict] | None = None,
    enable_thinking: bool = True,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    prompt_cache: PromptCache | None = None,
    id_salt: str | None = None,
    **sampling: Any,
) -> Iterator[dict]:
    """Generate the next assistant message, yielding the parser's events as they complete:
    `{"type": "reasoning" | "content", "delta": str}`, `{"type": "tool_call", "tool_call": {...}}`,
    then one `{"type": "done", "message", "finish_reason", "usage", "malformed", "stats"}`.

    `message` is `{"role": "assistant", "content", "reasoning_content", "tool_calls"}`, ready to
    append to `messages`. `finish_reason` is "stop", "tool_calls", "length" or "cancelled";
    `usage` is `{prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens}` (prompt
    tokens read from and newly written to `prompt_cache`). `tools` (OpenAI list) is offered to
    the model and types the call arguments. `enable_thinking` and `chat_template_kwargs` go to
    the chat template (see `render_prompt`); the parser starts where the rendered prompt leaves
    off (inside reasoning after GLM-4.7's `<think>`, in content after `</think>`).
    `prompt_cache` reuses and keeps KV caches.
    `id_salt` makes tool-call ids unique per request (random when None). `**sampling` goes to
    `stream_generate` (max_tokens, temp, top_p, top_k, min_p, seed, sampler, cancel, ...).
    Closing the generator early stops generation (the cache is still kept).
    """
    prompt = render_prompt(
        tokenizer, messages, tools, enable_thinking, chat_template_kwargs=chat_template_kwargs
    )
    tokens = encode(tokenizer, prompt)
    if prompt_cache is not None:
        cache, rest, cached = prompt_cache.fetch(tokens)
    else:
        cache, rest, cached = make_cache(model, sampling.get("mtp", False)), tokens, 0
    reply = Reply(tools, prompt, id_salt=id_salt)
    generated: list[int] = []

    stored = False

    def keep_cache() -> None:
        nonlocal stored
        if prompt_cache is not None:
            stored = prompt_cache.store(tokens + generated, cache)

    r = None
    try:
        for r in stream_generate(model, tokenizer, rest, prompt_cache=cache, **sampling):
            generated.append(r.token)
            yield from reply.feed(r.text)
    except GeneratorExit:
        keep_cache()  # stopped between tokens, so the cache is consistent
        raise
    keep_cache()
    usage = {"prompt_tokens": len(tokens), "completion_tokens": len(generated)}
    created = len(tokens) - cached if stored else 0
    usage |= {"cached_tokens": cached, "cache_creation_tokens": created}
    *events, done = reply.close(r.finish_reason if r else None, usage)
    yield from events
    stats = {
        "prompt_tps": r.prompt_tps if r else 0.0,
        "generation_tps": r.generation_tps if r else 0.0,
        "peak_memory": r.peak_memory if r else 0.0,
        "mtp": r.mtp_stats if r else None,
    }
    yield {**done, "stats": stats}


def chat(
    model: Model,
    tokenizer: TokenizerWrapper,
    messages: list[dict],
    tools: list[dict] | None = None,
    enable_thinking: bool = True,
    **kwargs: Any,
) -> dict:
    """The next assistant message: `{"role", "content", "reasoning_content", "tool_calls",
    "finish_reason", "usage", "malformed"}`. Arguments as for `stream_chat`."""
    for event in stream_chat(model, tokenizer, messages, tools, enable_thinking, **kwargs):
        if event["type"] == "done":
            return {
                **event["message"],
                "finish_reason": event["finish_reason"],
                "usage": event["usage"],
                "malformed": event["malformed"],
            }
    raise AssertionError("stream_chat ended without a done event")
