"""What trains and how: every parameter gets a label from path regexes, and `optax.multi_transform` gives
each trainable label AdamW (with its own schedule and gradient clipping) and `frozen` `set_to_zero`.

Labels: `vision` (the encoder, at `learning_rate`), `prefix` (the prefix projection when it has a rate of
its own, `prefix_learning_rate`: `with_prefix_rule`), `lm` (a trained LM, at `lm_learning_rate`), `frozen`."""

from __future__ import annotations

import re
from collections.abc import Sequence

import optax
from flax import traverse_util

LABELS = ("vision", "prefix", "lm", "frozen")
PREFIX_RULE = ("^vision/prefix_proj/", "prefix")

# Which parameters train in each of the paper's variants (first matching regex wins).
VARIANT_LABEL_RULES = {
    "frozen": (("^vision/", "vision"), ("^lm/", "frozen")),
    "train_blind": (("^vision/", "vision"), ("^lm/", "frozen")),
    "finetuned": (("^vision/", "vision"), ("^lm/", "lm")),
    "scratch": (("^vision/", "vision"), ("^lm/", "lm")),
}


def with_prefix_rule(rules: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """`rules` with the prefix projection labelled `prefix` first, so it gets `prefix_learning_rate`."""
    return (PREFIX_RULE,) + tuple(tuple(rule) for rule in rules)


def param_labels(params, rules: Sequence[tuple[str, str]]):
    """A tree of labels, one per leaf of `params`, from (regex, label) rules matched against 'a/b/c' paths."""
    for _, label in rules:
        if label not in LABELS:
            raise ValueError(f"unknown parameter label {label!r}; labels are {', '.join(LABELS)}")
    compiled = [(re.compile(pattern), label) for pattern, label in rules]
    flat = traverse_util.flatten_dict(params, sep="/", is_leaf=lambda _, x: not isinstance(x, dict))
    labels = {}
    for path in flat:
        label = next((lab for pattern, lab in compiled if pattern.search(path)), None)
        if label is None:
            raise ValueError(f"parameter {path!r} matches no rule in {[p for p, _ in rules]}; "
                             f"add a rule that labels it {', '.join(LABELS)}")
        labels[path] = label
    return traverse_util.unflatten_dict(labels, sep="/")


def schedule(learning_rate: float, warmup_steps: int, total_steps: int, kind: str) -> optax.Schedule:
    """Linear warmup, then cosine decay to 0 at `total_steps` or a constant rate."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 0),
                                                  max(total_steps, warmup_steps + 1))
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                                     optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
    raise ValueError(f"unknown learning-rate schedule {kind!r}; supported: cosine, constant")


def make_optimizer(labels, *, learning_rate: float, lm_learning_rate: float = 1e-5, prefix_learning_rate: float = 0.0,
                   warmup_steps: int = 0, total_steps: int = 1000, schedule_kind: str = "cosine",
                   weight_decay: float = 0.0, grad_clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999):
    """AdamW per trainable label (`vision` at `learning_rate`, `prefix` at `prefix_learning_rate` or else
    `learning_rate`, `lm` at `lm_learning_rate`), zero for `frozen`."""

    def adamw(rate):
        clip = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
        return optax.chain(*clip, optax.adamw(schedule(rate, warmup_steps, total_steps, schedule_kind),
                                              b1=b1, b2=b2, weight_decay=weight_decay))

    transforms = {"vision": adamw(learning_rate), "prefix": adamw(prefix_learning_rate or learning_rate),
                  "lm": adamw(lm_learning_rate), "frozen": optax.set_to_zero()}
    return optax.multi_transform(transforms, labels)
