"""Where is shape lost? Linear probes on a trained Frozen run's encoder features and prefix embeddings.

    python experiments/feature_probe.py --workdir=/tmp/frozen_shapes

Fits a multi-label logistic regression (which shape kinds and colours a scene holds) on `--train` fresh
shapes-world scenes, from three representations: the encoder's pooled features in the run's latest
checkpoint, the same encoder at a random initialisation, and the run's prefix embeddings (features after
the prefix projection, both slots concatenated). Prints how often the top-scoring shape (colour) is in the
image on 512 held-out scenes (chance: shape 0.254, colour 0.236), to compare with the caption accuracy the
run reached: docs/training.md, "The default run, measured".
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from frozenlm_jax import load_frozen
from frozenlm_jax.models.vision import build_encoder
from shape_probe import scenes_and_labels


def probe_accuracy(train_x, train_y, test_x, test_kinds, test_colors, steps: int = 1500):
    """Top-1 shape and colour hit rates of a standardised, lightly L2-regularised linear probe."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    optimizer = optax.adam(1e-2)
    params = (jnp.zeros((train_x.shape[1], train_y.shape[1])), jnp.zeros(train_y.shape[1]))
    opt_state = optimizer.init(params)

    def loss_fn(p):
        logits = train_x @ p[0] + p[1]
        return optax.sigmoid_binary_cross_entropy(logits, train_y).mean() + 1e-4 * (p[0] ** 2).sum()

    @jax.jit
    def step(p, opt_state):
        grads = jax.grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(p, updates), opt_state

    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    logits = np.asarray(test_x @ params[0] + params[1])
    rows, k = np.arange(len(test_x)), test_kinds.shape[1]
    return test_kinds[rows, logits[:, :k].argmax(1)].mean(), test_colors[rows, logits[:, k:].argmax(1)].mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training workdir or an --export directory")
    parser.add_argument("--train", type=int, default=4000, help="scenes to fit each probe on")
    args = parser.parse_args()
    frozen = load_frozen(args.workdir, step="latest")
    vision = frozen.params["vision"]
    encoder = build_encoder(frozen.model.vision_config)
    size = frozen.image_size
    images, kinds, colors = scenes_and_labels(args.train, 5, size, None)
    test_images, test_kinds, test_colors = scenes_and_labels(512, 1, size, None)
    labels = np.concatenate([kinds, colors], axis=1)
    features = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
    random_init = nn.unbox(encoder.init(jax.random.key(3), images[:2])["params"])
    kernel, bias = (np.asarray(vision["prefix_proj"][name]) for name in ("kernel", "bias"))
    for name, params, project in (("trained encoder", vision["encoder"], False),
                                  ("random-init encoder", random_init, False),
                                  ("trained prefix", vision["encoder"], True)):
        train_x = np.concatenate([np.asarray(features(params, images[i:i + 500]))
                                  for i in range(0, len(images), 500)])
        test_x = np.asarray(features(params, test_images))
        if project:
            train_x, test_x = train_x @ kernel + bias, test_x @ kernel + bias
        shape, color = probe_accuracy(train_x, labels, test_x, test_kinds, test_colors)
        print(f"{name} ({train_x.shape[1]} dims): shape {shape:.3f} colour {color:.3f}", flush=True)


if __name__ == "__main__":
    main()
