"""Why shape is slow to learn: a plain CNN classifying one shape per image sits at chance for hundreds of
steps unless its convolutions are batch-normalised.

    python experiments/shape_plateau.py --image_size=32 --steps=1000 --norm=none
    python experiments/shape_plateau.py --image_size=32 --steps=500 --norm=batch   # also: group, layer

A VGG-style CNN (three stages of two 3x3 convs + ReLU, 2x2 max-pool; 32/64/128 channels; mean-pooled,
then a 7-way linear head) trained with softmax cross-entropy on the kind of the single object in fresh
shapes-world scenes (batch 32, Adam 1e-3); prints five times the accuracy on 512 held-out scenes
(chance 1/7). docs/training.md, "The default run, measured", records what it printed.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from shape_probe import scenes_and_labels

NORMS = {
    "none": lambda x: x,
    "batch": lambda x: nn.BatchNorm(use_running_average=False)(x),  # statistics of the batch, train and test
    "group": lambda x: nn.GroupNorm(8)(x),
    "layer": lambda x: nn.LayerNorm()(x),
}


class ShapeCNN(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x):
        norm = NORMS[self.norm]
        for width in (32, 64, 128):
            x = nn.relu(norm(nn.Conv(width, (3, 3))(x)))
            x = nn.relu(norm(nn.Conv(width, (3, 3))(x)))
            x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(7)(x.mean((1, 2)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--norm", choices=tuple(NORMS), default="none")
    args = parser.parse_args()
    batch = 32
    images, kinds, _ = scenes_and_labels(args.steps * batch, 0, args.image_size, 1)
    test_images, test_kinds, _ = scenes_and_labels(512, 1, args.image_size, 1)
    labels, test_labels = kinds.argmax(1), test_kinds.argmax(1)
    model = ShapeCNN(args.norm)
    variables = model.init(jax.random.key(0), images[:2])
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(variables)
    logits = lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0]  # noqa: E731

    @jax.jit
    def step(variables, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda v: optax.softmax_cross_entropy_with_integer_labels(logits(v, x), y).mean())(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    start = time.perf_counter()
    for i in range(args.steps):
        rows = slice(i * batch, (i + 1) * batch)
        variables, opt_state, loss = step(variables, opt_state, images[rows], labels[rows])
        if (i + 1) % (args.steps // 5) == 0:
            accuracy = (np.asarray(logits(variables, test_images)).argmax(1) == test_labels).mean()
            print(f"step {i + 1} examples {(i + 1) * batch} loss {float(loss):.3f} shape accuracy {accuracy:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
