"""Prefill progress, opt-in: the engine's ``prefill`` events, and each API's shape of them on
its stream (`return_progress`), read with the OpenAI and Anthropic SDKs."""

import queue
import uuid

import anthropic
import openai
import pytest
from test_server import serving

from mlx_glm4moe.batch import BatchEngine, Request
from mlx_glm4moe.chat import PromptCache
from mlx_glm4moe.loading import load
from mlx_glm4moe.server import core, create_app

pytestmark = pytest.mark.usefixtures("cpu")

STEP = 16


@pytest.fixture(scope="module")
def loaded(air_q4):
    return load(air_q4)


def run(engine, tokens, **kwargs):
    """A request's events up to its last."""
    events = queue.SimpleQueue()
    engine.submit(Request(tokens, 3, events.put, **kwargs))
    out = [events.get(timeout=120)]
    while out[-1]["type"] in ("prefill", "token"):
        out.append(events.get(timeout=120))
    return out


def prefill_events(events):
    """The ``prefill`` events, checked to come before the first token."""
    kinds = [e["type"] for e in events]
    n = kinds.count("prefill")
    assert kinds[:n] == ["prefill"] * n and "prefill" not in kinds[n:]
    return events[:n]


@pytest.mark.parametrize("path", ["chunked", "mtp", "streamed"])
def test_prefill_events_count_up_to_the_prompt(air_q4, loaded, path):
    """Chunk by chunk (mlx-lm's batch and MTP's prefill: after each chunk but the last token,
    then that token), or layer by layer (the layer-major prefill): from the cached tokens up to
    the whole prompt, before the first token; again from the prompt cache's share."""
    model, tokenizer = load(air_q4, expert_slots=2) if path == "streamed" else loaded
    mtp = path == "mtp"
    tokens = tokenizer.encode("the lazy dog " * 70)[:200]
    engine = BatchEngine(
        model,
        tokenizer,
        prefill_step_size=STEP,
        mtp=mtp,
        prompt_cache=PromptCache(model, mtp=mtp),
    )
    try:
        first = prefill_events(run(engine, tokens, progress=True))
        again = run(engine, tokens + tokenizer.encode(" and the quick fox"), progress=True)
    finally:
        engine.close()
    done = [e["done"] for e in first]
    assert all(e["total"] == 200 and e["cached"] == 0 for e in first)
    if path == "streamed":  # one per layer, the last token through the batch
        layers = len(model.layers)
        assert done == [0] + [199 * (i + 1) // layers for i in range(layers)] + [200]
    else:
        assert done == [0, *range(STEP, 199, STEP), 199, 200]
    times = [e["time_ms"] for e in first]
    assert times == sorted(times)

    cached = again[-1]["usage"]["cached_tokens"]
    second = prefill_events(again)
    assert cached > 0 and second[0]["done"] == second[0]["cached"] == cached
    assert second[-1]["done"] == second[-1]["total"] == again[-1]["usage"]["prompt_tokens"]
    steps = [e["done"] for e in second]
    assert steps == sorted(steps)


def test_no_prefill_events_without_the_opt_in(loaded):
    model, tokenizer = loaded
    engine = BatchEngine(model, tokenizer, prefill_step_size=STEP)
    try:
        events = run(engine, tokenizer.encode("the lazy dog " * 20))
    finally:
        engine.close()
    assert [e["type"] for e in events] == ["token"] * 3 + ["done"]


# -- on the wire ----------------------------------------------------------------------------------

LONG = "read all of this: " + "the lazy dog " * 40


@pytest.fixture(scope="module")
def url(loaded):
    model, tokenizer = loaded
    app = create_app(model, tokenizer, model_id="tiny", max_tokens=4, prefill_step_size=STEP)
    # No keep-alive pings (Anthropic's open a block, Responses' are events) on a busy machine:
    # the order asserted here is the progress events' own.
    with pytest.MonkeyPatch.context() as patch, serving(app) as url:
        patch.setattr(core.Engine, "keepalive_interval", 600)
        yield url


def counted(progress, prompt_tokens):
    """llama.cpp's `prompt_progress` objects of one request: from the cached tokens up to the
    whole prompt, a chunk at a time."""
    processed = [p["processed"] for p in progress]
    cache = progress[0]["cache"]
    assert all(p["total"] == prompt_tokens and p["cache"] == cache for p in progress)
    assert processed[0] == cache and processed[-1] == prompt_tokens
    assert processed == sorted(processed) and len(processed) > (prompt_tokens - cache) // STEP
    assert all(isinstance(p["time_ms"], int) for p in progress)


def prompt(tag):
    """A long prompt that no other test sends (the prompt cache holds what they did)."""
    return f"{tag} {uuid.uuid4().hex} {LONG}"


@pytest.mark.parametrize("progress", [True, False])
def test_openai_chat_streams_progress_chunks(url, progress):
    """`return_progress`: chunks with no choices and a `prompt_progress` object, between the
    role's chunk and the first token's; the SDK's stream helper still builds the answer."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        chunks = list(
            c.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": prompt("chat")}],
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"return_progress": progress},
            )
        )
        with c.chat.completions.stream(
            model="tiny",
            messages=[{"role": "user", "content": prompt("helper")}],
            extra_body={"return_progress": progress},
        ) as stream:
            events = [e.type for e in stream]
            # (get_final_completion refuses an answer cut for length, which these are)
            final = stream.current_completion_snapshot
    marks = [getattr(chunk, "prompt_progress", None) is not None for chunk in chunks]
    n = sum(marks)
    assert marks[1 : n + 1] == [True] * n and not any(marks[n + 1 :])
    assert all(chunk.choices == [] for chunk, mark in zip(chunks, marks, strict=True) if mark)
    if progress:
        counted([chunks[i + 1].prompt_progress for i in range(n)], chunks[-1].usage.prompt_tokens)
    else:
        assert n == 0
    assert final.choices[0].finish_reason == "length" and "content.done" in events


def test_openai_completions_stream_progress(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        chunks = list(
            c.completions.create(
                model="tiny",
                prompt=prompt("text"),
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"return_progress": True},
            )
        )
    progress = [chunk.prompt_progress for chunk in chunks if chunk.model_extra]
    assert all(chunk.choices == [] for chunk in chunks[: len(progress)])
    counted(progress, chunks[-1].usage.prompt_tokens)


@pytest.mark.parametrize("progress", [True, False])
def test_anthropic_streams_progress_events(url, progress):
    """``event: prompt_progress`` after message_start, before the first block; the SDK's
    message stream passes it on and still builds the message."""
    with anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=60) as c:
        with c.messages.stream(
            model="tiny",
            max_tokens=4,
            messages=[{"role": "user", "content": prompt("messages")}],
            extra_body={"return_progress": progress},
        ) as stream:
            events = list(stream)
            final = stream.get_final_message()
    kinds = [e.type for e in events]
    n = kinds.count("prompt_progress")
    assert kinds[0] == "message_start" and kinds[1 : n + 1] == ["prompt_progress"] * n
    if progress:
        u = final.usage
        prompt_tokens = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
        counted([e.prompt_progress for e in events[1 : n + 1]], prompt_tokens)
    else:
        assert n == 0
    assert final.stop_reason == "max_tokens" and kinds[-1] == "message_stop"


@pytest.mark.parametrize("progress", [True, False])
def test_responses_streams_progress_events(url, progress):
    """``response.prompt_progress`` after response.in_progress, numbered with the rest; the
    SDK's response stream passes it on and still builds the response."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        with c.responses.stream(
            model="tiny",
            input=prompt("responses"),
            max_output_tokens=4,
            extra_body={"return_progress": progress},
        ) as stream:
            events = list(stream)
    final = events[-1].response  # response.incomplete (cut for length): the SDK's last word
    kinds = [e.type for e in events]
    n = kinds.count("response.prompt_progress")
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2 : n + 2] == ["response.prompt_progress"] * n
    assert [e.sequence_number for e in events] == list(range(len(events)))
    if progress:
        counted([e.prompt_progress for e in events[2 : n + 2]], final.usage.input_tokens)
    else:
        assert n == 0
    assert final.status == "incomplete" and kinds[-1] == "response.incomplete"


def test_no_progress_without_a_stream(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        reply = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt("whole")}],
            extra_body={"return_progress": True},
        )
    assert reply.choices[0].finish_reason == "length" and "prompt_progress" not in reply.model_extra
