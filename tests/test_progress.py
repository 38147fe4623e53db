"""Prefill progress, opt-in: the engine's ``prefill`` events, and each API's shape of them on
its stream (`return_progress`), read with the OpenAI and Anthropic SDKs."""

import queue

import pytest

from mlx_glm4moe.batch import BatchEngine, Request
from mlx_glm4moe.chat import PromptCache
from mlx_glm4moe.loading import load

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
