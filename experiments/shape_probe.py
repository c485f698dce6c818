"""How many examples does an encoder need to tell shapes apart when supervised directly (no LM)?

    python experiments/shape_probe.py [--encoder=nf_resnet_small] [--lr=3e-3] [--batch=16] [--steps=3000]
    python experiments/shape_probe.py --encoder=convnet_small --overrides='{}' --lr=1e-3 --steps=600

Trains `encoder` + a linear head with multi-label cross-entropy on which colours and shape kinds a
shapes-world scene contains (fresh scenes, each seen once), and prints every `steps // 6` steps how often
the top-scoring shape (colour) is one of the image's, on 512 held-out scenes (chance: shape 0.254, colour
0.236 for 1-3 objects). This bounds what the caption loss through a frozen LM can teach in a given
number of examples: docs/training.md, "The default run, measured".
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.models.vision import build_encoder, vision_config
from frozenlm_jax.train.step import merge_params


def scenes_and_labels(count: int, stream: int, image_size: int, num_objects: int | None):
    scenes = [world.sample_scene(np.random.default_rng([9, stream, i]), num_objects) for i in range(count)]
    images = np.stack([world.render(s, image_size) for s in scenes]).astype(np.float32) / 127.5 - 1
    kinds, colors = np.zeros((count, len(world.KINDS)), np.float32), np.zeros((count, len(world.COLORS)), np.float32)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            kinds[i, world.KINDS.index(s.kind)] = 1
            colors[i, list(world.COLORS).index(s.color)] = 1
    return images, kinds, colors


class Probe(nn.Module):
    encoder: object
    outputs: int

    @nn.compact
    def __call__(self, images):
        return nn.Dense(self.outputs)(build_encoder(self.encoder)(images))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="nf_resnet_small")
    parser.add_argument("--overrides", default='{"skip_gain_init": 1.0}', help="JSON of vision config fields")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num_objects", type=int, default=None, help="default: 1-3 per scene, as in training")
    args = parser.parse_args()

    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.overrides).items()}
    config = vision_config(args.encoder, **overrides)
    images, kinds, colors = scenes_and_labels(args.steps * args.batch, 0, args.image_size, args.num_objects)
    test_images, test_kinds, test_colors = scenes_and_labels(512, 1, args.image_size, args.num_objects)
    probe = Probe(config, len(world.KINDS) + len(world.COLORS))
    params = {"params": nn.unbox(probe.init(jax.random.key(0), images[:2])["params"])}
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, labels):
        # A training pass: batch-normalised encoders (convnet_*) also return their updated running statistics.
        logits, updated = probe.apply(params, x, mutable=["batch_stats"])
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updated.get("batch_stats", {})

    @jax.jit
    def step(params, opt_state, x, labels):
        (loss, running_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return merge_params(params, {"params": running_stats}), opt_state, loss

    predict = jax.jit(probe.apply)
    start = time.perf_counter()
    for i in range(args.steps):
        rows = slice(i * args.batch, (i + 1) * args.batch)
        labels = np.concatenate([kinds[rows], colors[rows]], axis=1)
        params, opt_state, loss = step(params, opt_state, images[rows], labels)
        if (i + 1) % max(args.steps // 6, 1) == 0:
            logits = np.asarray(predict(params, test_images))
            k = len(world.KINDS)
            shape = test_kinds[np.arange(512), logits[:, :k].argmax(1)].mean()
            color = test_colors[np.arange(512), logits[:, k:].argmax(1)].mean()
            print(f"step {i + 1} examples {(i + 1) * args.batch} loss {float(loss):.3f} shape {shape:.3f} "
                  f"colour {color:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
