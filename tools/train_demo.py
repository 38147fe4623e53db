"""Train the bundled demo model: a tiny GLM-4.5-shaped MoE, MTP layer included, on offline text.

    python tools/train_demo.py --out /tmp/glm-demo-hf    # 500 steps, about 20 minutes on one core
    python convert.py --hf-path /tmp/glm-demo-hf --mlx-path mlx_glm4moe/default_model

Training-only dependencies: torch and transformers (`Glm4MoeForCausalLM`). The data is the Python
standard library's own documentation (pydoc) plus synthetic conversations in GLM-4.5's chat format,
with thinking and tool calls, rendered through the real chat template. The recipe follows
GLM-4.5 / DeepSeek-V3: sigmoid router with an aux-loss-free correction bias
(bias += u * sign(mean load - load) after each step) and one MTP layer trained on the
next-next token with weight 0.3, sharing the main model's embedding and output head.

Everything is seeded and runs in one thread, so a run is reproducible. The output is a
Hugging Face checkpoint (per-expert tensor names, the MTP layer at index num_hidden_layers,
sharded safetensors with an index, config, generation config, tokenizer with chat template).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pydoc
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, PreTrainedTokenizerFast
from transformers.models.glm4_moe.modeling_glm4_moe import (
    Glm4MoeDecoderLayer,
    Glm4MoeRMSNorm,
    Glm4MoeTopkRouter,
)
from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_glm4moe.evaluate import HELDOUT_MODULES  # noqa: E402
from mlx_glm4moe.synthetic import (  # noqa: E402
    ROLE_TOKENS,
    STOP_TOKENS,
    TAG_TOKENS,
    TEMPLATE_FILE,
    make_config,
    make_tokenizer,
    save_sharded,
)

MODEL = dict(
    hidden_size=128,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=384,
    moe_intermediate_size=128,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    use_qk_norm=False,
    max_position_embeddings=4096,
)
MTP_WEIGHT = 0.3  # GLM-4.5's MTP loss weight
BIAS_UPDATE = 1e-3  # DeepSeek-V3's bias update speed u

DOC_MODULES = """abc argparse array ast asyncio base64 bisect calendar cmath collections
contextlib copy csv dataclasses datetime decimal difflib enum filecmp fnmatch functools getopt
glob gzip hashlib heapq hmac html http io ipaddress itertools json keyword locale logging lzma
math mimetypes numbers operator os pathlib pickle platform pprint queue random re sched secrets
select shelve shlex shutil signal socket sqlite3 string struct subprocess tarfile tempfile
textwrap threading time timeit tokenize traceback types typing unicodedata unittest urllib uuid
warnings weakref zipfile zlib""".split()


# ---------------------------------------------------------------- data


def module_docs(names: list[str], max_chars: int) -> list[str]:
    """The plain-text pydoc page of each module, cut to `max_chars`."""
    docs = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(pydoc.render_doc(mod, "%s", renderer=pydoc.plaintext)[:max_chars])
    return docs


def first_sentence(name: str) -> str | None:
    doc = (importlib.import_module(name).__doc__ or "").strip()
    line = " ".join(doc.split("\n\n")[0].split())
    if not line or len(line) > 160:
        return None
    return line if line.endswith(".") else line + "."


TOOLS = {
    "get_weather": ("Get the current weather for a city.", {"city": "The city name."}),
    "search_docs": ("Search the Python documentation.", {"query": "What to look for."}),
    "calculator": ("Evaluate an arithmetic expression.", {"expression": "The expression."}),
    "get_time": ("Get the current time in a timezone.", {"timezone": "An IANA timezone."}),
    "send_email": (
        "Send an email.",
        {"to": "The recipient's address.", "subject": "The subject line."},
    ),
}
CITIES = "Paris London Tokyo Berlin Madrid Rome Oslo Cairo Lima Seoul Delhi Sydney Boston".split()
ZONES = "Europe/Paris Asia/Tokyo America/New_York Europe/London Australia/Sydney UTC".split()
NAMES = "alice bob carol dave erin frank grace".split()
WEATHER = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]


def tool_schema(name: str) -> dict:
    desc, params = TOOLS[name]
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": "string", "description": v} for k, v in params.items()},
                "required": list(params),
            },
        },
    }


def tool_request(rng: random.Random, name: str) -> tuple[str, dict, str, str]:
    """(user question, arguments, tool result, final answer) for one tool."""
    if name == "get_weather":
        city = rng.choice(CITIES)
        t, sky = rng.randint(-5, 35), rng.choice(WEATHER)
        q = rng.choice(
            [
                f"What is the weather in {city}?",
                f"How is the weather in {city} today?",
                f"Is it cold in {city} right now?",
            ]
        )
        return (
            q,
            {"city": city},
            json.dumps({"temperature": t, "sky": sky}),
            (f"It is {sky} in {city}, {t} degrees."),
        )
    if name == "search_docs":
        mod = rng.choice(DOC_MODULES)
        q = rng.choice([f"Search the docs for {mod}.", f"Find the documentation of {mod}."])
        return (
            q,
            {"query": mod},
            f"Found the page for the {mod} module.",
            (f"I found the documentation page of the {mod} module."),
        )
    if name == "calculator":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        q = rng.choice([f"Use the calculator to compute {a} * {b}.", f"Calculate {a} * {b}."])
        return q, {"expression": f"{a} * {b}"}, str(a * b), f"{a} * {b} = {a * b}."
    if name == "get_time":
        zone = rng.choice(ZONES)
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        q = rng.choice([f"What time is it in {zone}?", f"Tell me the time in {zone}."])
        return q, {"timezone": zone}, f"{hh:02d}:{mm:02d}", f"It is {hh:02d}:{mm:02d} in {zone}."
    who = rng.choice(NAMES)
    subject = rng.choice(["Lunch", "Meeting notes", "Hello", "The report"])
    q = f'Send an email to {who}@example.com with the subject "{subject}".'
    return (
        q,
        {"to": f"{who}@example.com", "subject": subject},
        "sent",
        (f"I sent the email to {who}@example.com."),
    )


def plain_turn(rng: random.Random, summaries: dict[str, str]) -> tuple[str, str, str]:
    """(question, reasoning, answer) without tools."""
    kind = rng.random()
    if kind < 0.25:
        q = rng.choice(
            [
                "Hello! Who are you?",
                "Hi!",
                "Who are you?",
                "Hello, what can you do?",
                "Hey there.",
                "Good morning! Can you introduce yourself?",
            ]
        )
        return (
            q,
            "The user greets me and asks who I am. I should introduce myself briefly.",
            (
                "Hello! I am a tiny GLM-style demo model. I was trained on the Python "
                "documentation, so I can say a little about Python modules, do simple sums, "
                "and call tools."
            ),
        )
    if kind < 0.65:
        mod = rng.choice(list(summaries))
        q = rng.choice(
            [
                f"What does the {mod} module do?",
                f"Tell me about the {mod} module.",
                f"What is {mod} in Python?",
                f"Explain the Python module {mod}.",
            ]
        )
        return (
            q,
            f"The user asks about the {mod} module. Its documentation says: {summaries[mod]}",
            (f"The {mod} module is part of the Python standard library. {summaries[mod]}"),
        )
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    op = rng.choice(["+", "-"])
    c = a + b if op == "+" else a - b
    word = "add" if op == "+" else "subtract"
    q = rng.choice(
        [f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"How much is {a} {op} {b}?"]
    )
    return (
        q,
        f"I need to {word} {b} {'to' if op == '+' else 'from'} {a}. {a} {op} {b} = {c}.",
        (f"{a} {op} {b} = {c}."),
    )


def conversation(rng: random.Random, summaries: dict[str, str]) -> tuple[list, list | None, bool]:
    """(messages, tools, thinking) for one synthetic chat; the last message is the assistant's."""
    thinking = rng.random() < 0.8
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": "You are a helpful assistant."})
    tools = None
    if rng.random() < 0.45:
        names = rng.sample(list(TOOLS), rng.randint(1, 3))
        tools = [tool_schema(n) for n in names]
        name = rng.choice(names)
        q, args, result, answer = tool_request(rng, name)
        messages += [
            {"role": "user", "content": q},
            {
                "role": "assistant",
                "reasoning_content": f"The user asks: {q} I will call {name}.",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}],
            },
        ]
        if rng.random() < 0.5:  # and the answer after the tool's response
            messages += [
                {"role": "tool", "content": result},
                {
                    "role": "assistant",
                    "reasoning_content": f"The tool returned {result}. I can answer now.",
                    "content": answer,
                },
            ]
        return messages, tools, thinking
    for _ in range(rng.choice([1, 1, 1, 2])):
        q, reasoning, answer = plain_turn(rng, summaries)
        messages += [
            {"role": "user", "content": q},
            {"role": "assistant", "reasoning_content": reasoning, "content": answer},
        ]
    return messages, tools, thinking


def render_chats(n: int, seed: int) -> list[str]:
    """Synthetic conversations as the model sees them, each ended by the stop token the model
    must emit: <|observation|> after a tool call, <|user|> after an answer."""
    rng = random.Random(seed)
    template = TEMPLATE_FILE.read_text()
    summaries = {m: s for m in DOC_MODULES if (s := first_sentence(m))}
    texts = []
    for _ in range(n):
        messages, tools, thinking = conversation(rng, summaries)
        if not thinking:
            for m in messages:
                m.pop("reasoning_content", None)
        (text,), _ = render_jinja_template(
            [messages], tools=tools, chat_template=template, enable_thinking=thinking
        )
        stop = "<|observation|>" if messages[-1].get("tool_calls") else "<|user|>"
        texts.append(text + stop)
    return texts


def tokenizer_corpus(docs: list[str], chats: list[str]) -> str:
    text = "\n".join(docs + chats)
    for t in ROLE_TOKENS + TAG_TOKENS:
        text = text.replace(t, "\n")
    return text


# ---------------------------------------------------------------- model


class MTP(nn.Module):
    """The nextn layer: eh_proj(cat(enorm(embed(t[i+1])), hnorm(h[i]))) -> decoder layer ->
    shared_head.norm -> head, predicting t[i+2]. Embedding and head are the main model's
    (shared, as in DeepSeek-V3); the checkpoint stores copies under the layer's own names."""

    def __init__(self, config: Glm4MoeConfig):
        super().__init__()
        H = config.hidden_size
        self.enorm = Glm4MoeRMSNorm(H, eps=config.rms_norm_eps)
        self.hnorm = Glm4MoeRMSNorm(H, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.layer = Glm4MoeDecoderLayer(config, layer_idx=config.num_hidden_layers)
        self.head_norm = Glm4MoeRMSNorm(H, eps=config.rms_norm_eps)

    def forward(self, main: Glm4MoeForCausalLM, next_tokens: torch.Tensor, hidden: torch.Tensor):
        e = main.model.embed_tokens(next_tokens)
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))
        positions = torch.arange(x.shape[1])[None]
        x = self.layer(x, position_embeddings=main.model.rotary_emb(x, positions))
        return main.lm_head(self.head_norm(x))


def build(config_dict: dict, seed: int) -> tuple[Glm4MoeForCausalLM, MTP]:
    torch.manual_seed(seed)
    config = Glm4MoeConfig(**config_dict)
    config._attn_implementation = "sdpa"
    main = Glm4MoeForCausalLM(config)
    main.set_experts_implementation("grouped_mm")  # ~15% faster than the loop over experts
    mtp = MTP(config)
    mtp.apply(main._init_weights)
    return main, mtp


class LoadCounter:
    """Counts how many tokens each router sends to each expert during a step."""

    def __init__(self, routers: list[Glm4MoeTopkRouter]):
        self.routers = routers
        self.loads = [torch.zeros(r.num_experts) for r in routers]
        for r, load in zip(routers, self.loads, strict=True):
            r.register_forward_hook(self._counter(load))

    @staticmethod
    def _counter(load: torch.Tensor):
        def hook(_module, _inputs, out) -> None:
            load.add_(torch.bincount(out[2].flatten(), minlength=load.numel()).float())

        return hook

    @torch.no_grad()
    def update_bias(self) -> float:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded.
        Returns the worst max/mean load ratio seen, as a balance indicator."""
        worst = 0.0
        for r, load in zip(self.routers, self.loads, strict=True):
            r.e_score_correction_bias += BIAS_UPDATE * torch.sign(load.mean() - load)
            worst = max(worst, (load.max() / load.mean().clamp(min=1)).item())
            load.zero_()
        return worst


# ---------------------------------------------------------------- checkpoint


def hf_weights(main: Glm4MoeForCausalLM, mtp: MTP, config: dict) -> dict[str, np.ndarray]:
    """The published checkpoints' names: per-expert tensors (transformers v5 fuses them in
    memory) and the MTP layer at index num_hidden_layers."""
    out = {}

    def add(prefix: str, state: dict) -> None:
        I = config["moe_intermediate_size"]
        for name, t in state.items():
            t = t.detach().float().numpy()
            if name.endswith("experts.gate_up_proj"):
                base = name[: -len("gate_up_proj")]
                for e in range(t.shape[0]):
                    out[f"{prefix}{base}{e}.gate_proj.weight"] = t[e, :I]
                    out[f"{prefix}{base}{e}.up_proj.weight"] = t[e, I:]
            elif name.endswith("experts.down_proj"):
                base = name[: -len("down_proj")]
                for e in range(t.shape[0]):
                    out[f"{prefix}{base}{e}.down_proj.weight"] = t[e]
            else:
                out[prefix + name] = t

    add("", main.state_dict())
    n = f"model.layers.{config['num_hidden_layers']}."
    add(n, mtp.layer.state_dict())
    add(n, {"enorm.weight": mtp.enorm.weight, "hnorm.weight": mtp.hnorm.weight})
    add(n, {"eh_proj.weight": mtp.eh_proj.weight, "shared_head.norm.weight": mtp.head_norm.weight})
    add(n, {"embed_tokens.weight": main.model.embed_tokens.weight})
    add(n, {"shared_head.head.weight": main.lm_head.weight})
    return out


def save_checkpoint(out: Path, main: Glm4MoeForCausalLM, mtp: MTP, config: dict) -> None:
    save_sharded(hf_weights(main, mtp, config), out, num_shards=2, dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": eos[0]}, indent=2)
    )


@torch.no_grad()
def check_roundtrip(out: Path, main: Glm4MoeForCausalLM) -> None:
    """The written checkpoint must load in transformers and give the trained model's logits."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # it reports the MTP layer's tensors as unused, as expected
    ids = torch.arange(32)[None]
    again = Glm4MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = (again(ids).logits - main.eval()(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"checkpoint round trip differs by {diff}")


# ---------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Folder for the Hugging Face checkpoint.")
    p.add_argument(
        "--steps", type=int, default=500, help="Optimizer steps (about 20 minutes on one core)."
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--chat-fraction", type=float, default=0.8)
    p.add_argument("--chats", type=int, default=10_000, help="Synthetic conversations.")
    p.add_argument("--heldout-chats", help="Also write 200 unseen conversations to this file.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty")
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    tic = time.perf_counter()

    docs = module_docs([m for m in DOC_MODULES if m not in HELDOUT_MODULES], 30_000)
    chats = render_chats(a.chats, a.seed)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = make_tokenizer(out, a.vocab_size, tokenizer_corpus(docs, chats[:3000]))
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    doc_ids = tok([d + "<|endoftext|>" for d in docs])["input_ids"]
    chat_ids = tok(chats, add_special_tokens=False)["input_ids"]
    streams = [torch.tensor([i for ids in s for i in ids]) for s in (doc_ids, chat_ids)]
    if a.heldout_chats:
        Path(a.heldout_chats).write_text("".join(render_chats(200, a.seed + 1)))
    print(
        f"data: {len(streams[0])} doc tokens, {len(streams[1])} chat tokens, "
        f"vocab {n_tokens} ({time.perf_counter() - tic:.0f}s)",
        flush=True,
    )

    eos = [tok.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    config = make_config(
        "air", vocab_size=-(-n_tokens // 64) * 64, **MODEL, eos_token_id=eos, pad_token_id=eos[0]
    )
    main_model, mtp = build(config, a.seed)
    params = list(main_model.parameters()) + list(mtp.parameters())
    print(
        f"parameters: {sum(p.numel() for p in params) / 1e6:.2f}M "
        f"(+ MTP copies of embedding and head in the checkpoint)",
        flush=True,
    )
    routers = [
        m for m in [*main_model.modules(), *mtp.modules()] if isinstance(m, Glm4MoeTopkRouter)
    ]
    loads = LoadCounter(routers)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(a.seed)
    T = a.seq_len
    train_tic = time.perf_counter()
    for step in range(1, a.steps + 1):
        # Linear warmup, then cosine decay to a tenth.
        cosine = 0.5 * (1 + math.cos(math.pi * step / a.steps))
        lr = a.lr * min(1.0, step / 50) * (0.1 + 0.9 * cosine)
        for g in opt.param_groups:
            g["lr"] = lr
        n_chat = int(round(a.batch_size * a.chat_fraction))
        rows = []
        for i in range(a.batch_size):
            s = streams[1 if i < n_chat else 0]
            start = torch.randint(0, len(s) - T - 2, (1,), generator=gen).item()
            rows.append(s[start : start + T + 2])
        batch = torch.stack(rows)
        x = batch[:, :T]
        main_model.train()
        hidden = main_model.model(input_ids=x).last_hidden_state
        logits = main_model.lm_head(hidden)
        loss_main = F.cross_entropy(logits.flatten(0, 1), batch[:, 1 : T + 1].flatten())
        mtp_logits = mtp(main_model, batch[:, 1 : T + 1], hidden)
        loss_mtp = F.cross_entropy(mtp_logits.flatten(0, 1), batch[:, 2 : T + 2].flatten())
        loss = loss_main + MTP_WEIGHT * loss_mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        imbalance = loads.update_bias()
        if step % 25 == 0 or step == 1:
            print(
                f"step {step}/{a.steps} loss {loss_main.item():.3f} mtp {loss_mtp.item():.3f} "
                f"max/mean expert load {imbalance:.2f} lr {lr:.2e} "
                f"{time.perf_counter() - train_tic:.0f}s",
                flush=True,
            )
    train_s = time.perf_counter() - train_tic

    main_model.eval()
    save_checkpoint(out, main_model, mtp, config)
    check_roundtrip(out, main_model)
    print(
        f"trained {a.steps} steps ({a.steps * a.batch_size * T / 1e6:.1f}M tokens) "
        f"in {train_s:.0f}s; "
        f"total {time.perf_counter() - tic:.0f}s; wrote {out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
