"""PromptCache: pinned entries, and the cache on disk (keying, corrupt files, restarts, the
size bound), on the tiny 4-bit Air fixture (the in-memory rules are in test_chat.py)."""

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_glm4moe import prompt_cache
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
    pc.wait_for_writes()  # written on the writer thread
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


def test_copies_in_use_count_against_the_cap(loaded):
    """A copy handed to a request counts against `max_bytes` from `lend` to `release`: room
    for one entry, and a copy of it in use, leaves no room for the entry."""
    model, tok = loaded
    a, b = prompt(tok, "Copied"), prompt(tok, "Stored after")
    size = sum(c.nbytes for c in filled(model, a))
    pc = PromptCache(model, max_bytes=size * 3 // 2)
    pc.store(a, filled(model, a))
    cache, _, n = pc.fetch(a)
    assert n == len(a) - 1 and len(pc) == 1
    lent = pc.lend(cache)
    assert lent == size and pc.lent == size
    assert len(pc) == 0  # the entry went to make room for the copy
    pc.release(lent)
    assert pc.lent == 0
    pc.store(b, filled(model, b))
    assert len(pc) == 1 and pc.nbytes == size


def test_eviction_writes_on_a_thread_of_its_own(loaded, tmp_path, monkeypatch):
    """An evicted entry is written by the writer thread: `store` returns while the write waits,
    the entry is still served from memory meanwhile, and `flush` waits for every write."""
    model, tok = loaded
    a, b = prompt(tok, "Evicted"), prompt(tok, "Evicting")
    go, writers = threading.Event(), []
    save = prompt_cache.save_prompt_cache

    def held(*args, **kwargs):
        writers.append(threading.current_thread().name)
        assert go.wait(10)
        time.sleep(0.1)  # a slow disk: flush must wait for it
        save(*args, **kwargs)

    monkeypatch.setattr(prompt_cache, "save_prompt_cache", held)
    pc = PromptCache(model, max_entries=1, directory=tmp_path)
    pc.store(a, filled(model, a))
    pc.store(b, filled(model, b))  # evicts a: its write waits for `go`
    assert len(pc) == 1 and pc.fetch(a)[2] == len(a) - 1
    assert not list(tmp_path.glob("*/*.safetensors"))
    go.set()
    pc.flush()
    assert writers == ["prompt-cache-writer"] * 2
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 2


def test_an_entry_extending_a_pinned_prefix_keeps_the_pin(loaded):
    """A plain request that continues a pinned prefix replaces its entry and keeps its pin (and
    a pinned store that an entry already covers pins that entry): plain entries go first."""
    model, tok = loaded
    plain = [prompt(tok, t) for t in ("Plain one", "Plain two")]
    for first_pinned in (True, False):
        a = prompt(tok, "Pinned prefix")
        longer = a + [5, 6, 7]
        pc = PromptCache(model, max_entries=2)
        if first_pinned:
            pc.store(a, filled(model, a), pinned=True)
            pc.store(longer, filled(model, longer))  # covers a: takes its place
        else:
            pc.store(longer, filled(model, longer))
            assert not pc.store(a, filled(model, a), pinned=True)  # covered: pins `longer`
        for p in plain:
            pc.store(p, filled(model, p))  # over the cap: a plain entry goes, not `longer`
        assert len(pc) == 2 and pc.fetch(longer)[2] == len(longer) - 1, first_pinned


def test_a_write_cut_short_is_never_an_entry(loaded, tmp_path, monkeypatch):
    """The process dying halfway through writing an entry leaves no file by an entry's name (the
    data goes to a hidden temporary file, renamed into place once whole), and the next start
    removes the leftover."""
    model, tok = loaded
    tokens = prompt(tok, "Written when it died")
    save = prompt_cache.save_prompt_cache

    class Died(BaseException):
        pass

    def dies_halfway(path, *args, **kwargs):
        save(path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise Died

    pc = PromptCache(model, directory=tmp_path)
    monkeypatch.setattr(prompt_cache, "save_prompt_cache", dies_halfway)
    with pytest.raises(Died):
        pc.disk.save(np.asarray(tokens), filled(model, tokens))
    monkeypatch.undo()
    left = list(pc.disk.folder.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".")  # only the temporary file
    again = PromptCache(model, directory=tmp_path)
    assert not list(again.disk.folder.iterdir()) and again.fetch(tokens)[2] == 0


def test_disk_bound_counts_every_model_in_the_folder(loaded, tmp_path):
    """Two models' caches (other KV bits: another key) in one folder: the bound is on the
    folder, and the least recently used file goes whichever model wrote it."""
    model, tok = loaded
    prompts = [prompt(tok, f"Shared folder {i}") for i in range(3)]
    probe = PromptCache(model, directory=tmp_path / "probe")
    probe.store(prompts[0], filled(model, prompts[0]))
    probe.flush()
    size = next((tmp_path / "probe").glob("*/*.safetensors")).stat().st_size
    bound = size * 5 // 2
    theirs = PromptCache(model, max_entries=1, directory=tmp_path / "c", kv_bits=4)
    ours = PromptCache(model, max_entries=1, directory=tmp_path / "c", max_disk_bytes=bound)
    for p in prompts[:2]:
        theirs.store(p, filled(model, p))
        theirs.flush()
        time.sleep(0.02)  # distinct modification times
    oldest = min(theirs.disk.folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
    ours.store(prompts[2], filled(model, prompts[2]))
    ours.flush()  # three files in the folder over a bound of two and a half: theirs, oldest
    files = list((tmp_path / "c").glob("*/*.safetensors"))
    assert len(files) == 2 and oldest not in files
    assert len(list(ours.disk.folder.glob("*.safetensors"))) == 1
