"""The training state (step count, trainable params, optimizer state) and its initialisation."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from frozenlm_jax.trees import merge_params, split_params
from frozenlm_jax.weights.init import init_model_params


@flax.struct.dataclass
class TrainState:
    """What a step updates (and donates): the step count, the trainable params and their optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_train_state(train_step, rng, lm_params=None, image_shape=None, vision_init: str | None = None):
    """(TrainState, frozen params) for `train_step` (a `TrainStep`), each leaf created directly in its sharding;
    params as `init_model_params` makes them."""
    shardings = merge_params(train_step.state_shardings.params, train_step.frozen_shardings)
    shared = jax.tree.map(lambda label: label == "frozen", train_step.labels["lm"])
    params = init_model_params(train_step.model, rng, shardings, image_shape, lm_params, vision_init, shared)
    trainable, frozen = split_params(params, train_step.labels)
    opt_state = jax.jit(train_step.optimizer.init, out_shardings=train_step.state_shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), train_step.state_shardings.step)
    return TrainState(step=step, params=trainable, opt_state=opt_state), frozen
