"""Model quality: perplexity, KL divergence against a reference model, MTP acceptance.

    python -m mlx_glm4moe.evaluate --model DST [--reference REF] [--data-path FILE]

Perplexity and KL are measured on held-out text (by default the documentation of standard-library
modules the demo model never saw), teacher-forced, in windows of `--sequence-length` tokens.
KL is KL(reference || model) of the next-token distributions, averaged over tokens.

MTP acceptance is measured on the model's own greedy continuations of the first tokens of each
window, where teacher forcing is exactly greedy speculative decoding: the draft for position k
(k = 1 is the MTP layer on the main model's hidden state, k = 2 chains the layer on its own draft
and hidden output) is accepted when it equals the main model's greedy token. The rate for
position k is counted over the positions where drafts 1..k-1 were accepted.
"""

from __future__ import annotations

import argparse
import importlib
import pydoc
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .generate import generate_step
from .models import Model

# Never in the demo model's training data (tools/train_demo.py excludes them).
HELDOUT_MODULES = ("statistics", "fractions", "graphlib", "zoneinfo", "colorsys")


def heldout_text() -> str:
    """The plain-text pydoc pages of `HELDOUT_MODULES`."""
    return "\n".join(
        pydoc.render_doc(importlib.import_module(m), "%s", renderer=pydoc.plaintext)
        for m in HELDOUT_MODULES
    )


def windows(tokenizer: TokenizerWrapper, text: str, length: int, n: int) -> list[list[int]]:
    """`n` windows of `length` tokens, spread evenly over the text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    count = len(ids) // length
    if count == 0:
        raise ValueError(f"The text has {len(ids)} tokens, fewer than one window of {length}")
    picks = sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(min(n, count))})
    return [ids[i * length : (i + 1) * length] for i in picks]


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def mtp_accepts(
    model: Model, ids: list[int], draft_tokens: int, start: int = 0
) -> list[tuple[int, int]]:
    """(accepted, tried) per draft position over `ids`, greedy from index `start` on (earlier
    tokens only fill the caches)."""
    logits, hidden = model(mx.array(ids)[None], return_hidden=True)
    greedy = mx.argmax(logits[0], axis=-1).tolist()
    counts = [[0, 0] for _ in range(draft_tokens)]
    cache = KVCache()
    # Entry i joins token i+1 to the hidden state at i; its draft is for token i+2.
    for i in range(len(ids) - 1):
        tok, h = mx.array([[ids[i + 1]]]), hidden[:, i : i + 1]
        if i + 1 < start:
            model.mtp.predict(tok, h, cache)
            continue
        for k in range(draft_tokens):
            target = i + 1 + k  # greedy[target] is the main model's token i+2+k
            if target >= len(ids) - 1:
                break
            draft_logits, h = model.mtp.predict(tok, h, cache)
            draft = mx.argmax(draft_logits[0, -1]).item()
            counts[k][1] += 1
            if draft != greedy[target]:
                break
            counts[k][0] += 1
            tok = mx.array([[draft]])
        # Only the first entry (real token, real hidden) stays in the MTP layer's cache.
        cache.trim(cache.offset - (i + 1))
    return [tuple(c) for c in counts]


@dataclass
class Report:
    tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    kl: float | None = None
    acceptance: list[float] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"tokens: {self.tokens}", f"perplexity: {self.perplexity:.3f}"]
        if self.kl is not None:
            out += [
                f"reference perplexity: {self.reference_perplexity:.3f}",
                f"KL(reference || model): {self.kl:.5f} nats/token",
            ]
        out += [f"MTP acceptance, draft {k + 1}: {a:.1%}" for k, a in enumerate(self.acceptance)]
        return out


def evaluate(
    model: Model,
    tokenizer: TokenizerWrapper,
    reference: Model | None = None,
    text: str | None = None,
    sequence_length: int = 256,
    num_samples: int = 16,
    draft_tokens: int = 2,
    prompt_tokens: int = 32,
) -> Report:
    """Perplexity and KL on `text` (default: `heldout_text()`); MTP acceptance per draft
    position on greedy continuations (empty when the model has no MTP layer)."""
    if reference is not None and reference.args.vocab_size != model.args.vocab_size:
        raise ValueError("The reference model has a different vocabulary")
    samples = windows(tokenizer, text or heldout_text(), sequence_length, num_samples)
    nll = ref_nll = kl = 0.0
    n = 0
    for ids in samples:
        x, y = mx.array(ids[:-1])[None], mx.array(ids[1:])[None]
        lp = _logprobs(model(x))
        nll += -mx.take_along_axis(lp, y[..., None], axis=-1).sum().item()
        if reference is not None:
            ref = _logprobs(reference(x))
            ref_nll += -mx.take_along_axis(ref, y[..., None], axis=-1).sum().item()
            kl += (mx.exp(ref) * (ref - lp)).sum().item()
        n += y.size
    report = Report(tokens=n, perplexity=float(mx.exp(mx.array(nll / n)).item()))
    if reference is not None:
        report.reference_perplexity = float(mx.exp(mx.array(ref_nll / n)).item())
        report.kl = kl / n
    if model.mtp is not None and draft_tokens > 0:
        totals = [[0, 0] for _ in range(draft_tokens)]
        for ids in samples:
            prompt = ids[:prompt_tokens]
            steps = generate_step(mx.array(prompt), model, max_tokens=sequence_length - len(prompt))
            sequence = prompt + [t for t, _ in steps]
            accepts = mtp_accepts(model, sequence, draft_tokens, start=len(prompt))
            for k, (accepted, tried) in enumerate(accepts):
                totals[k][0] += accepted
                totals[k][1] += tried
        report.acceptance = [a / t if t else 0.0 for a, t in totals]
    return report


def main(argv: list[str] | None = None) -> None:
    from .loading import load

    p = argparse.ArgumentParser(description="Perplexity, KL to a reference, MTP acceptance.")
    p.add_argument("--model", help="Model to evaluate (default: the bundled demo).")
    p.add_argument("--reference", help="Reference model for KL (same tokenizer).")
    p.add_argument("--data-path", help="Text file to evaluate on (default: held-out docs).")
    p.add_argument("--sequence-length", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=16, help="Windows of text.")
    p.add_argument("--num-draft-tokens", type=int, default=2, help="MTP draft positions.")
    a = p.parse_args(argv)
    if a.sequence_length < 8 or a.num_samples < 1 or a.num_draft_tokens < 0:
        p.error("need --sequence-length >= 8, --num-samples >= 1, --num-draft-tokens >= 0")
    try:
        text = Path(a.data_path).read_text() if a.data_path else None
        model, tokenizer = load(a.model)
        reference = load(a.reference)[0] if a.reference else None
        report = evaluate(
            model,
            tokenizer,
            reference,
            text,
            a.sequence_length,
            a.num_samples,
            a.num_draft_tokens,
            prompt_tokens=a.sequence_length // 8,
        )
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as e:
        sys.exit(f"error: {e}")
    print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
