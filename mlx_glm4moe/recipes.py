"""Quantization recipes: which bits each weight gets (`convert.py --quant-recipe`).

A recipe is a `QuantPredicate`, `(name, shape) -> {bits, group_size, mode} | None`, over our
tensor names. In a GLM-4.5 checkpoint the routed experts are nearly all the bytes (about 97%),
and each token reads only a few of them; everything else (attention, the shared expert, the
dense layers, embeddings and heads) is small and read for every token. So the mixed recipes spend
their bits there and squeeze the routed experts; the router is never quantized.
"""

from __future__ import annotations

from .weights import QuantPredicate, uniform_quant

# 5, not 6: with 6 the mixed 4-bit recipe is 14% larger than uniform 4-bit on the demo model,
# where the non-expert weights are a third of the bytes; with 5 it is 7% larger.
HIGH_BITS = 5


def is_routed_expert(name: str) -> bool:
    return ".mlp.switch_mlp." in name


def mixed_quant(
    expert_bits: int, high_bits: int = HIGH_BITS, group_size: int = 64
) -> QuantPredicate:
    """Routed experts at `expert_bits`; attention, shared experts, dense MLPs, embeddings, heads
    (the MTP layer's too) at `high_bits`; the router unquantized."""
    experts = uniform_quant(expert_bits, group_size)
    others = uniform_quant(high_bits, group_size)  # which, like `experts`, skips the router

    def predicate(name: str, shape: tuple) -> dict | None:
        return (experts if is_routed_expert(name) else others)(name, shape)

    return predicate


RECIPES: dict[str, QuantPredicate] = {
    "4bit": uniform_quant(4, 64),
    "mixed-4": mixed_quant(4),
    "mixed-3": mixed_quant(3),
    "mixed-2": mixed_quant(2),
}


def recipe(name: str) -> QuantPredicate:
    """The recipe called `name` (one of `RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"Unknown quantization recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]
