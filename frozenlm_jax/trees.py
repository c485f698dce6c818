"""Parameter trees as nested dicts: flatten to "a/b/c" paths, split by label into trainable and frozen, merge."""

from __future__ import annotations

from flax import traverse_util


def flatten(tree) -> dict:
    """{"a/b/c": leaf} of a nested dict (a dict is never a leaf)."""
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: not isinstance(x, dict))


def split_params(params, labels):
    """(trainable, frozen): two nested dicts holding the leaves labelled trainable and `frozen`."""
    flat, flat_labels = flatten(params), flatten(labels)
    trainable = {p: v for p, v in flat.items() if flat_labels[p] != "frozen"}
    frozen = {p: v for p, v in flat.items() if flat_labels[p] == "frozen"}
    return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge_params(*trees):
    """One nested dict of the leaves of `trees` (a later tree's leaf wins at the same path)."""
    merged = {}
    for tree in trees:
        merged.update(flatten(tree))
    return traverse_util.unflatten_dict(merged, sep="/")
