"""Thinking budgets: a request's reasoning ends after a set number of tokens, and its answer
follows.

GLM reasons between ``<think>`` and ``</think>``. `ThinkingBudget` wraps a request's sampler:
once the reasoning holds `budget` tokens, the next draw is ``</think>`` (the log-probabilities
handed on allow only it, so a wrapped sampler, a grammar's included, sees the token it drew).
Each generated token is one draw, in order, in plain, batched and MTP decoding alike, so the
count is exact everywhere.

Reasoning starts where the prompt opened it (GLM-4.7's template ends with ``<think>``), or where
the model opens it as its first token that is not blank (GLM-4.5's leaves that to the model);
``</think>`` at the end of the prompt (thinking off) leaves nothing to count.

Budgets come from Anthropic's ``thinking.budget_tokens``, from a reasoning effort (OpenAI's
``reasoning_effort``, the Responses API's ``reasoning.effort``; `EFFORT_BUDGETS`) or from the
server's default, and `budget_for` keeps room for a constrained answer.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

Sampler = Callable[[mx.array], mx.array]

# Reasoning tokens per effort: Anthropic's smallest budget (1024) for "low", then four times
# more per step. The efforts in THINKING_OFF turn thinking off instead.
EFFORT_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}
THINKING_OFF = ("none", "minimal")


def budget_for(
    requested: int | None, default: int | None, max_tokens: int, constrained: bool
) -> int | None:
    """The budget a request runs with: its own, else the server's `default` (None: no limit).
    A constrained answer (a forced tool call, a response format) keeps at least half of
    `max_tokens`: its reasoning gets at most the other half."""
    budget = requested if requested is not None else default
    if constrained:
        budget = min(max_tokens if budget is None else budget, max_tokens // 2)
    return budget


class ThinkingBudget:
    """`sampler` with the reasoning cut to `budget` tokens (see the module docstring).

    `prompt` is the request's prompt tokens (where reasoning starts). Each call first reads the
    token drawn last time: a sync per step that only requests with a budget pay.
    """

    def __init__(
        self, sampler: Sampler, budget: int, tokenizer: TokenizerWrapper, prompt: list[int]
    ) -> None:
        self.sampler, self.budget, self.tokenizer = sampler, budget, tokenizer
        self.open = tokenizer.convert_tokens_to_ids("<think>")
        self.close = tokenizer.convert_tokens_to_ids("</think>")
        last = prompt[-1] if prompt else None
        self.state = {self.open: "reasoning", self.close: "answer"}.get(last, "opening")
        self.spent = 0  # reasoning tokens so far
        self.last: mx.array | None = None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.last is not None and self.state != "answer":
            self._advance(int(self.last.item()))
        if self.state == "reasoning" and self.spent >= self.budget:
            only = mx.arange(logprobs.shape[-1]) == self.close
            logprobs = mx.where(only, mx.array(0.0, logprobs.dtype), -mx.inf)
        self.last = self.sampler(logprobs)
        return self.last

    def _advance(self, token: int) -> None:
        if self.state == "opening":
            if token == self.open:
                self.state = "reasoning"
            elif self.tokenizer.decode([token]).strip():
                self.state = "answer"
        elif token == self.close:
            self.state = "answer"
        else:
            self.spent += 1
