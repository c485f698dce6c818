"""Caption accuracy on the shapes world: do generated captions name colours and shapes that are in the image?

For held-out scenes (regenerated from the `frozen_shapes` seeds, so no dataset needs preparing), the
model captions each image greedily from its visual prefix alone; a colour (shape) word counts as right
when some object in the image has that colour (kind). Chance is the rate a uniformly random colour
(shape) word would be right on the same images.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.decode import greedy_from_embeddings
from frozenlm_jax.models.frozen import Frozen

WORD = re.compile(r"[a-z]+")
KIND_WORDS = {**{k: k for k in world.KINDS}, **{world.plural(k): k for k in world.KINDS}}


def generate_captions(model: Frozen, params, images: np.ndarray, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy captions of images [N, H, W, 3] (normalised), prompted by each image's prefix alone."""
    n, count = model.num_prefix_tokens, len(images)
    prompt = {"tokens": np.full((count, n), tokenizer.pad_id, np.int32), "images": images[:, None],
              "image_mask": np.ones((count, 1), bool), "image_positions": np.zeros((count, 1), np.int32)}
    embeds = jax.jit(lambda p, b: model.apply({"params": p}, b, method=Frozen.embed_inputs))(params, prompt)
    outputs = greedy_from_embeddings(model.lm_config, params["lm"], embeds, np.ones((count, n), bool),
                                     max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
    return [tokenizer.decode(tokens) for tokens in outputs]


def heldout_scenes(count: int, image_size: int, split: str = "validation", seed: int = 0):
    """(scenes, images float32 [N, S, S, 3] normalised to [-1, 1]) of the first `count` examples of `split`."""
    scenes = [world.sample_scene(np.random.default_rng([seed, world.SPLIT_IDS[split], i])) for i in range(count)]
    images = np.stack([world.render(s, image_size) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return scenes, images


def word_accuracy(captions: list[str], scenes) -> dict[str, float]:
    """Colour and shape word precision of `captions` against `scenes`, with chance levels and coverage."""
    totals = dict(color_right=0, color_words=0, shape_right=0, shape_words=0, color_named=0, shape_named=0)
    chance_color, chance_shape = [], []
    for caption, scene in zip(captions, scenes):
        colors = {s.color for s in scene.shapes}
        kinds = {s.kind for s in scene.shapes}
        words = WORD.findall(caption.lower())
        said_colors = [w for w in words if w in world.COLORS]
        said_kinds = [KIND_WORDS[w] for w in words if w in KIND_WORDS]
        totals["color_words"] += len(said_colors)
        totals["color_right"] += sum(c in colors for c in said_colors)
        totals["shape_words"] += len(said_kinds)
        totals["shape_right"] += sum(k in kinds for k in said_kinds)
        totals["color_named"] += bool(said_colors)
        totals["shape_named"] += bool(said_kinds)
        chance_color.append(len(colors) / len(world.COLORS))
        chance_shape.append(len(kinds) / len(world.KINDS))
    n = max(len(captions), 1)
    return {
        "color_accuracy": totals["color_right"] / max(totals["color_words"], 1),
        "shape_accuracy": totals["shape_right"] / max(totals["shape_words"], 1),
        "color_chance": float(np.mean(chance_color)) if chance_color else 0.0,
        "shape_chance": float(np.mean(chance_shape)) if chance_shape else 0.0,
        "captions_naming_a_color": totals["color_named"] / n,
        "captions_naming_a_shape": totals["shape_named"] / n,
    }


def evaluate(model: Frozen, params, tokenizer, image_size: int, count: int = 64, max_new_tokens: int = 16) -> dict:
    """Caption accuracy of `model` on `count` held-out validation scenes; also returns a few captions."""
    scenes, images = heldout_scenes(count, image_size)
    captions = generate_captions(model, params, images, tokenizer, max_new_tokens)
    return {**word_accuracy(captions, scenes), "examples": captions[:4]}
