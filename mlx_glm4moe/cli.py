"""The command lines: `glm4moe-generate` (one reply, or an interactive chat with `--chat`) and
`glm4moe-convert`. They sit above the library and nothing in the library imports them."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import distributed, streaming
from .chat import PromptCache, stream_chat
from .convert import DTYPES, Q_BITS, Q_GROUP_SIZES, convert
from .generate import MTP_BY_DEFAULT
from .loading import load
from .models import ACTIVATIONS, Model
from .progress import Progress, ndjson
from .recipes import RECIPES
from .upload import UploadError, publish
from .weights import read_config, resolve


def generate_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate text with a GLM-4.5 or GLM-4.7-Flash model.")
    p.add_argument("--model", help="Model folder or Hugging Face repo (default: bundled demo).")
    p.add_argument("--prompt", "-p", default="Hello! Who are you?")
    p.add_argument("--system", help="System message.")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-think", action="store_true", help="Turn thinking off.")
    p.add_argument("--tools", help="JSON file with an OpenAI tools list to offer the model.")
    p.add_argument("--chat", action="store_true", help="Interactive multi-turn chat.")
    p.add_argument(
        "--mtp",
        action=argparse.BooleanOptionalAction,
        help="Speculative decoding with the checkpoint's MTP layer (default: "
        + ("on when it has one)." if MTP_BY_DEFAULT else "off)."),
    )
    p.add_argument(
        "--num-draft", "--num-draft-tokens", type=int, default=1, help="Tokens drafted per step."
    )
    experts = p.add_mutually_exclusive_group()
    experts.add_argument(
        "--expert-slots",
        type=int,
        help="Keep the routed experts on disk, at most N per MoE layer in memory.",
    )
    experts.add_argument(
        "--expert-cache-gb", type=float, help="As --expert-slots, with as many as fit in G GB."
    )
    p.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default="auto",
        help="Activation dtype: auto (float32 on the CPU, the weights' elsewhere), native (the "
        "weights' everywhere: the GPU code path) or float32. For debugging.",
    )
    p.add_argument(
        "--parallel",
        choices=distributed.MODES,
        default="tensor",
        help="How to split the model when started by mlx.launch over several ranks.",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="Seconds a rank waits on the others before exiting with an error (mlx.launch).",
    )
    a = p.parse_args(argv)
    if a.max_tokens < 1 or a.num_draft < 1:
        p.error("--max-tokens and --num-draft must be at least 1")
    if a.temp < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or not 0 <= a.min_p <= 1:
        p.error("need --temp >= 0, 0 < --top-p <= 1, --top-k >= 0, 0 <= --min-p <= 1")

    group = mx.distributed.init()
    ranks = group.size()
    if ranks > 1 and (a.chat or a.mtp or a.expert_slots or a.expert_cache_gb):
        p.error("--chat, --mtp and expert streaming run in a single process, not under mlx.launch")
    show = group.rank() == 0  # rank 0 prints; the others compute the same tokens
    try:
        tools = load_tools(a.tools) if a.tools else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    if a.model is None and show:
        print(
            "[Using the bundled demo model: a 4M-parameter GLM-4.5-shaped MoE trained for about "
            "20 minutes on one CPU core (Python docs, synthetic chats); expect simple answers. "
            "Pass --model for a real one.]",
            file=sys.stderr,
        )
    try:
        path = resolve(a.model)
        slots = a.expert_slots
        if a.expert_cache_gb is not None:
            slots = streaming.slots_for_budget(path, read_config(path), a.expert_cache_gb)
        # Under mlx.launch each rank keeps only its share: the whole need not fit in one.
        model, tokenizer = load(
            path, expert_slots=slots, activations=a.activations, force=ranks > 1
        )
        if ranks > 1:
            distributed.setup(model, group, a.parallel)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        sys.exit(f"error: {e}")
    if a.mtp and model.mtp is None:
        sys.exit("error: --mtp: this checkpoint has no MTP layer")
    mtp = a.mtp if a.mtp is not None else MTP_BY_DEFAULT and model.mtp is not None and ranks == 1
    sampling = dict(max_tokens=a.max_tokens, seed=a.seed, mtp=mtp, num_draft=a.num_draft)
    watchdog = None
    if ranks > 1:
        watchdog = distributed.Watchdog(a.dist_timeout, group.rank())
        distributed.barrier(group)
        agreeing = distributed.agreeing_sampler(
            make_sampler(a.temp, a.top_p, a.min_p, top_k=a.top_k), group
        )

        def sampler(logprobs: mx.array) -> mx.array:
            watchdog.beat()  # one draw per decode step: progress
            return agreeing(logprobs)

        sampling["sampler"] = sampler
    else:
        sampling.update(temp=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p)
    if a.chat:
        interactive(
            model,
            tokenizer,
            system=a.system,
            tools=tools,
            enable_thinking=not a.no_think,
            **sampling,
        )
        return
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
        {"role": "user", "content": a.prompt}
    ]
    events = stream_chat(
        model, tokenizer, messages, tools, enable_thinking=not a.no_think, **sampling
    )
    try:
        done = print_reply(events) if show else [e for e in events if e["type"] == "done"][-1]
    except RuntimeError as e:
        if ranks == 1:
            raise
        # The ring backend raises this way when a peer's connection drops (a rank died).
        sys.exit(f"error: rank {group.rank()} lost the other ranks: {e}")
    if watchdog:
        watchdog.stop()
    if not show:
        return
    u, stats = done["usage"], done["stats"]
    print(
        f"Prompt: {u['prompt_tokens']} tokens, {stats['prompt_tps']:.3g} tokens/s\n"
        f"Generation: {u['completion_tokens']} tokens, {stats['generation_tps']:.3g} tokens/s\n"
        f"Peak memory: {stats['peak_memory']:.3f} GB",
        file=sys.stderr,
    )
    if stats["mtp"]:
        rates = ", ".join(f"{x:.0%}" for x in stats["mtp"]["acceptance_per_position"])
        print(
            f"MTP: acceptance {rates} per draft position, "
            f"{stats['mtp']['tokens_per_pass']:.2f} tokens per forward pass",
            file=sys.stderr,
        )
    if slots is not None:  # prompt reads included
        disk = streaming.disk_read_gbs(path, limit=256 << 20)
        print(
            streaming.summary(streaming.stats(model), u["completion_tokens"], disk),
            file=sys.stderr,
        )


def convert_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert a GLM-4.5 or GLM-4.7-Flash checkpoint to MLX.")
    p.add_argument("--hf-path", help="Local folder or Hugging Face repo id.")
    p.add_argument("--mlx-path", required=True, help="Output folder.")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize (4-bit by default).")
    p.add_argument("--q-bits", type=int, default=4, choices=Q_BITS)
    p.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES)
    p.add_argument(
        "--quant-recipe",
        choices=list(RECIPES),
        help="Quantize with per-module bits (see mlx_glm4moe.recipes); overrides --q-bits.",
    )
    p.add_argument("--dtype", choices=DTYPES, help="Weights dtype (default: the source's).")
    p.add_argument("--upload-repo", help="Hugging Face repo to upload the result to.")
    p.add_argument("--force", action="store_true", help="Replace an existing --mlx-path.")
    p.add_argument(
        "--upload-only", action="store_true", help="Upload --mlx-path, already converted."
    )
    _progress_flag(p)
    a = p.parse_args(argv)
    progress = ndjson() if a.progress == "json" else None
    if a.upload_only:
        return _upload(a.mlx_path, a.upload_repo, progress)
    if a.hf_path is None:
        p.error("the following arguments are required: --hf-path")
    try:
        out = convert(
            a.hf_path,
            a.mlx_path,
            a.quantize,
            a.q_bits,
            a.q_group_size,
            a.dtype,
            a.upload_repo,
            a.force,
            quant_recipe=a.quant_recipe,
            progress=progress,
        )
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, UploadError) as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {out}", file=sys.stderr)


def upload_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Upload a folder converted by convert.py to the Hugging Face Hub."
    )
    p.add_argument(
        "--mlx-path", "--path", dest="mlx_path", required=True, help="The converted folder."
    )
    p.add_argument("--upload-repo", required=True, help="ORG/NAME on the Hub; created if needed.")
    _progress_flag(p)
    a = p.parse_args(argv)
    _upload(a.mlx_path, a.upload_repo, ndjson() if a.progress == "json" else None)


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        choices=["json"],
        help='Print progress on stdout as NDJSON: {"event": "progress", "stage", "done", "total"}.',
    )


def _upload(mlx_path: str, repo: str | None, progress: Progress | None = None) -> None:
    """`publish`, with one line on stderr and exit status 1 when it fails."""
    try:
        publish(mlx_path, repo, progress)
    except UploadError as e:
        sys.exit(f"error: {e}")


# -- the interactive chat ---------------------------------------------------------------------

DIM, RESET = "\033[2m", "\033[0m"


def load_tools(path: str | Path) -> list[dict]:
    """An OpenAI tools list from a JSON file (a list, or an object with a "tools" list)."""
    try:
        tools = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"Cannot read the tools file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"The tools file {path} is not valid JSON: {e}") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise ValueError(f"The tools file {path} must hold a list of OpenAI tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(
                f'Tool {i} in {path} needs {{"type": "function", "function": {{"name": ...}}}}'
            )
    return tools


class ReplyPrinter:
    """Writes `stream_chat` events as they come: reasoning dimmed on a terminal (after
    "Thinking: " otherwise), content as is, each tool call as one line of JSON."""

    def __init__(self, out: TextIO | None = None, dim: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.dim = self.out.isatty() if dim is None else dim
        self._section: str | None = None
        self._line_start = True

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "reasoning":
            if self._section != "reasoning":
                self._newline()
                if not self.dim:
                    self._write("Thinking: ")
            self._write(f"{DIM}{event['delta']}{RESET}" if self.dim else event["delta"])
        elif kind == "content":
            if self._section == "reasoning":
                self._write("\n\n")
            self._write(event["delta"])
        elif kind == "tool_call":
            fn = event["tool_call"]["function"]
            self._newline()
            call = {"name": fn["name"], "arguments": json.loads(fn["arguments"])}
            self._write(f"Tool call: {json.dumps(call, ensure_ascii=False)}\n")
        else:
            return
        self._section = kind

    def finish(self) -> None:
        """End the reply on a fresh line."""
        self._newline()
        self._section = None

    def _newline(self) -> None:
        if not self._line_start:
            self._write("\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._line_start = text.endswith("\n")


def print_reply(events: Iterator[dict], out: TextIO | None = None) -> dict:
    """Print a `stream_chat` reply as it is generated; return its done event."""
    printer = ReplyPrinter(out)
    done: dict = {}
    for event in events:
        if event["type"] == "done":
            done = event
        printer(event)
    printer.finish()
    return done


def interactive(
    model: Model,
    tokenizer: TokenizerWrapper,
    *,
    system: str | None = None,
    tools: list[dict] | None = None,
    enable_thinking: bool = True,
    prompt_cache: PromptCache | None = None,
    **sampling: Any,
) -> None:
    """A multi-turn chat on the terminal. History is kept (the template drops earlier
    reasoning); `/think` and `/nothink` toggle thinking; Ctrl-C stops a reply; Ctrl-D exits.
    The KV cache of the conversation is reused from turn to turn."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    with _ctrl_c_reaches_main_thread():
        if prompt_cache is None:
            prompt_cache = PromptCache(model, mtp=sampling.get("mtp", False))
        cache = prompt_cache
        messages = [{"role": "system", "content": system}] if system else []
        cancel = threading.Event()
        _note("/think, /nothink: thinking on/off. Ctrl-C stops a reply, Ctrl-D quits.")
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if line.strip() in ("/think", "/nothink"):
                enable_thinking = line.strip() == "/think"
                _note(f"Thinking {'on' if enable_thinking else 'off'}.")
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            cancel.clear()
            previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
            try:
                done = print_reply(
                    stream_chat(
                        model,
                        tokenizer,
                        messages,
                        tools,
                        enable_thinking,
                        prompt_cache=cache,
                        cancel=cancel,
                        **sampling,
                    )
                )
            finally:
                signal.signal(signal.SIGINT, previous)
            messages.append(done["message"])
            u = done["usage"]
            _note(
                ("[reply stopped] " if done["finish_reason"] == "cancelled" else "")
                + f"{u['prompt_tokens']} prompt tokens ({u['cached_tokens']} cached), "
                f"{u['completion_tokens']} generated, "
                f"{done['stats']['generation_tps']:.1f} tokens/s"
            )


@contextmanager
def _ctrl_c_reaches_main_thread() -> Iterator[None]:
    """The terminal's SIGINT may land on a native thread (MLX's streams, the tokenizer's pool)
    while the main thread waits in input(), which then never wakes to raise KeyboardInterrupt.
    Every signal writes its number to the wakeup fd; for SIGINT, a watcher pokes the main thread
    with SIGUSR1 (a no-op handler), whose interruption makes input() run the pending handler. It
    pokes three times, 50 ms apart: a poke (or the SIGINT itself) that lands while the main
    thread is between printing the prompt and blocking in read() interrupts nothing."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    old_usr1 = signal.signal(signal.SIGUSR1, lambda *_: None)
    main = threading.main_thread().ident

    def watch() -> None:
        while byte := os.read(read, 1):  # b"" once the write end is closed
            if byte[0] == signal.SIGINT:
                for _ in range(3):
                    signal.pthread_kill(main, signal.SIGUSR1)
                    time.sleep(0.05)
        os.close(read)

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old_usr1)
        os.close(write)


def _note(text: str) -> None:
    """A status line on stderr, dimmed on a terminal."""
    print(f"{DIM}{text}{RESET}" if sys.stderr.isatty() else text, file=sys.stderr, flush=True)
