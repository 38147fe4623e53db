"""PromptCache: pinned entries, and the cache on disk (keying, corrupt files, restarts, the
size bound), on the tiny 4-bit Air fixture (the in-memory rules are in test_chat.py)."""

import json
import logging
import os
import shutil
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_glm4moe.chat import PromptCache, chat, encode_messages
from mlx_glm4moe.loading import load

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours and explain why the sky is blue."},
]


@pytest.fixture(scope="module")
def folder(air_q4, tmp_path_factory):
    """A private copy of the checkpoint (tests change its files)."""
    out = tmp_path_factory.mktemp("model") / "air"
    shutil.copytree(air_q4, out)
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


def prompt(tok, text: str) -> list[int]:
    return encode_messages(tok, [{"role": "user", "content": text}])


def filled(model, tokens):
    cache = model.make_cache()
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def recording(sink):
    def sample(logprobs):
        sink.append(np.array(logprobs))
        return mx.argmax(logprobs, axis=-1)

    return sample


def test_pinned_entries_outlive_plain_ones(loaded):
    model, tok = loaded
    a, b, c = (prompt(tok, t) for t in ("Pinned prefix", "Plain one", "Plain two"))
    pc = PromptCache(model, max_entries=2)
    pc.store(a, filled(model, a), pinned=True)
    pc.store(b, filled(model, b))
    pc.store(c, filled(model, c))  # over the cap: the plain LRU entry goes, not the older pin
    assert pc.fetch(a)[2] == len(a) - 1
    assert pc.fetch(b)[2] < len(b) - 1
    assert pc.fetch(c)[2] == len(c) - 1
    # Only pinned entries left: the least recently used of them goes.
    pc = PromptCache(model, max_entries=2)
    for p in (a, b, c):
        pc.store(p, filled(model, p), pinned=True)
    assert [pc.fetch(p)[2] == len(p) - 1 for p in (a, b, c)] == [False, True, True]


@pytest.mark.parametrize("mtp", [False, True])
def test_restart_finds_the_entry_and_output_is_identical(loaded, tmp_path, mtp):
    model, tok = loaded
    cold_logits = []
    cold = chat(model, tok, MESSAGES, max_tokens=8, sampler=recording(cold_logits), mtp=mtp)

    pc = PromptCache(model, mtp=mtp, directory=tmp_path)
    first = chat(model, tok, MESSAGES, max_tokens=8, prompt_cache=pc, mtp=mtp)
    assert first["usage"]["cache_creation_tokens"] == first["usage"]["prompt_tokens"]
    pc.flush()
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 1

    restarted = PromptCache(model, mtp=mtp, directory=tmp_path)  # a new server, same folder
    logits = []
    again = chat(
        model,
        tok,
        MESSAGES,
        max_tokens=8,
        prompt_cache=restarted,
        sampler=recording(logits),
        mtp=mtp,
    )
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert (again["content"], again["reasoning_content"]) == (
        cold["content"],
        cold["reasoning_content"],
    )
    assert len(logits) == len(cold_logits)
    for x, y in zip(logits, cold_logits, strict=True):
        assert np.array_equal(x, y)


def test_evicted_entries_go_to_disk_and_come_back(loaded, tmp_path):
    model, tok = loaded
    a, b = prompt(tok, "First question"), prompt(tok, "Second question")
    pc = PromptCache(model, max_entries=1, directory=tmp_path)
    pc.store(a, filled(model, a))
    pc.store(b, filled(model, b))  # evicts a to disk
    assert len(pc) == 1 and len(pc.disk.index) == 1
    cache, rest, n = pc.fetch(a + [5])
    assert (n, rest) == (len(a), [5])
    ref = np.array(model(mx.array([5])[None], cache=filled(model, a))[0, -1])
    assert np.array_equal(np.array(model(mx.array(rest)[None], cache=cache)[0, -1]), ref)


def test_an_entry_from_another_model_is_never_used(loaded, folder, tmp_path):
    model, tok = loaded
    tokens = prompt(tok, "Shared question")
    pc = PromptCache(model, directory=tmp_path)
    pc.store(tokens, filled(model, tokens))
    pc.flush()
    assert PromptCache(model, directory=tmp_path).fetch(tokens)[2] == len(tokens) - 1

    # Other KV bits, the MTP layer's part: other keys.
    assert PromptCache(model, directory=tmp_path, kv_bits=4).fetch(tokens)[2] == 0
    assert PromptCache(model, mtp=True, directory=tmp_path).fetch(tokens)[2] == 0
    # Other weights (the file changed) or another config: a miss.
    other = folder.parent / "other"
    shutil.copytree(folder, other)
    weights = next(other.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert PromptCache(load(other)[0], directory=tmp_path).fetch(tokens)[2] == 0
    shutil.copystat(next(folder.glob("*.safetensors")), weights)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 12345.0}))
    assert PromptCache(load(other)[0], directory=tmp_path).fetch(tokens)[2] == 0
    # A file of another model with the same layout (only the key differs), moved into this
    # model's folder, is not read either: its header is refused when the folder is opened...
    theirs = PromptCache(load(other)[0], directory=tmp_path)
    theirs.store(tokens, filled(model, tokens))
    theirs.flush()
    [their_file] = theirs.disk.folder.glob("*.safetensors")
    mine = pc.disk.folder
    [ours] = mine.glob("*.safetensors")
    shutil.copy(their_file, mine / "moved.safetensors")
    opened = PromptCache(model, directory=tmp_path)
    assert list(opened.disk.index) == [ours] and not (mine / "moved.safetensors").exists()
    # ... and its contents, put in place of an indexed file after that, when they are loaded.
    shutil.copy(their_file, ours)
    assert opened.fetch(tokens)[2] == 0
    assert not ours.exists()  # and it was removed


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_file_is_skipped_with_a_warning_and_removed(loaded, tmp_path, caplog, damage):
    model, tok = loaded
    tokens = prompt(tok, "Soon broken")
    pc = PromptCache(model, directory=tmp_path)
    pc.store(tokens, filled(model, tokens))
    pc.flush()
    [path] = tmp_path.glob("*/*.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncate" else os.urandom(len(data)))
    with caplog.at_level(logging.WARNING, logger="mlx_glm4moe.prompt_cache"):
        again = PromptCache(model, directory=tmp_path)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not path.exists()
    cache, rest, n = again.fetch(tokens)
    assert (n, rest) == (0, tokens)


def test_an_unusable_folder_is_a_warning(loaded, tmp_path, caplog):
    model, tok = loaded
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="mlx_glm4moe.prompt_cache"):
        pc = PromptCache(model, directory=blocker)
    assert pc.disk is None and "not usable" in caplog.text
    tokens = prompt(tok, "Still works")
    pc.store(tokens, filled(model, tokens))
    assert pc.fetch(tokens)[2] == len(tokens) - 1


def test_disk_bound_drops_the_least_recently_used(loaded, tmp_path):
    model, tok = loaded
    prompts = [prompt(tok, f"Question number {i}") for i in range(3)]
    probe = PromptCache(model, max_entries=1, directory=tmp_path / "probe")
    probe.store(prompts[0], filled(model, prompts[0]))
    probe.flush()
    size = next((tmp_path / "probe").glob("*/*.safetensors")).stat().st_size
    pc = PromptCache(model, max_entries=1, directory=tmp_path / "c", max_disk_bytes=size * 5 // 2)
    for p in prompts[:2]:
        pc.store(p, filled(model, p))
        pc.flush()
        time.sleep(0.02)  # distinct modification times
    pc.fetch(prompts[0])  # memory holds prompts[1]: loads prompts[0] and touches its file
    time.sleep(0.02)
    pc.store(prompts[2], filled(model, prompts[2]))
    pc.flush()  # three files over a bound of two and a half: the least recent (1) goes
    files = list((tmp_path / "c").glob("*/*.safetensors"))
    assert len(files) == 2
    fresh = PromptCache(model, max_entries=1, directory=tmp_path / "c")
    assert [fresh.fetch(p)[2] == len(p) - 1 for p in prompts] == [True, False, True]
