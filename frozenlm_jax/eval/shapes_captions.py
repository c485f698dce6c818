"""Caption accuracy on the shapes world: do generated captions name colours and shapes that are in the image?

For held-out scenes (regenerated from the `frozen_shapes` seeds, so no dataset needs preparing), the
model captions each image greedily from its visual prefix alone; a colour (shape) word counts as right
when some object in the image has that colour (kind). Chance is the rate a uniformly random colour
(shape) word would be right on the same images.
"""

from __future__ import annotations

import re

import numpy as np

from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.eval.task import Column, Evaluator, answerer

WORD = re.compile(r"[a-z]+")
KIND_WORDS = {**{k: k for k in world.KINDS}, **{world.plural(k): k for k in world.KINDS}}


def heldout_scenes(count: int, image_size: int, split: str = "validation", seed: int = 0):
    """(scenes, uint8 images [N, S, S, 3]) of the first `count` examples of `split`."""
    scenes = [world.sample_scene(np.random.default_rng([seed, world.SPLIT_IDS[split], i])) for i in range(count)]
    return scenes, np.stack([world.render(s, image_size) for s in scenes])


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


class ShapesCaptions(Evaluator):
    """Columns "shapes_captions colour" and "... shape": the word accuracy of greedy captions (at most
    `eval.caption_tokens` tokens, prompted by the image alone, as training sequences start) of the first
    `eval.num_examples` validation scenes. Only the model and its blind copy caption; chance as above."""

    COLUMNS = (("colour", "color"), ("shape", "shape"))

    def __init__(self, name, settings, image_size):
        super().__init__(name, settings, image_size)
        self.scenes, self.images = heldout_scenes(settings.num_examples, image_size)

    def columns(self) -> list[Column]:
        return [Column(f"{self.name} {what}", self.name, self.name, None) for what, _ in self.COLUMNS]

    def chance(self) -> dict[str, float]:
        found = word_accuracy([""] * len(self.scenes), self.scenes)
        return {f"{self.name} {what}": found[f"{key}_chance"] for what, key in self.COLUMNS}

    def _run(self, model, mode: str) -> dict:
        if mode not in ("model", "blind"):
            return self.not_applicable("the LM alone has no image to caption")
        captions = []
        for start in range(0, len(self.images), self.settings.batch_size):
            batch = self.images[start:start + self.settings.batch_size]
            captions += answerer(model, mode).generate([[image] for image in batch],
                                                        max_new_tokens=self.settings.caption_tokens)
        found = word_accuracy(captions, self.scenes)
        common = {"captions": len(captions), "examples": captions[:4]}
        return {f"{self.name} {what}": (found[f"{key}_accuracy"], {"named": found[f"captions_naming_a_{key}"], **common})
                for what, key in self.COLUMNS}
