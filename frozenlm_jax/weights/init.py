"""A Frozen model's parameters created in their shardings: the vision side initialised (its encoder optionally
from pretrained weights), the LM loaded or randomly initialised."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from frozenlm_jax.models.frozen import Frozen, abstract_frozen_params, vision_prefix
from frozenlm_jax.models.lm import DecoderLM, LMConfig
from frozenlm_jax.weights.vision import load_encoder_weights


def init_lm_params(config: LMConfig, rng, shardings=None):
    """A randomly initialised LM's params (the `scratch` variant, `lm.source=random`), each leaf in its sharding."""
    lm = DecoderLM(config)
    return jax.jit(lambda r: nn.unbox(lm.init(r, jnp.zeros((1, 1), jnp.int32))["params"]),
                   out_shardings=shardings)(rng)


def init_model_params(model: Frozen, rng, shardings, image_shape, lm_params=None, vision_init: str | None = None,
                      shared_lm_leaves=None):
    """`{"vision", "lm"}` params of `model`, each leaf created directly in its sharding (`shardings`, the same tree;
    None: the default device).

    The vision params are initialised from `rng`, the encoder's then replaced by the weights of the safetensors
    file `vision_init` if given; the LM params are `lm_params` (from `load_lm`, ideally loaded onto the same
    mesh) or, if None, randomly initialised. `shared_lm_leaves` (a tree of bools like the LM's) marks the LM leaves
    that may share memory with `lm_params` (frozen ones: a copy would hold a frozen LM twice); the others are
    copied (a training step donates them).
    """
    vision = vision_prefix(model)
    images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    vision_rng, lm_rng = jax.random.split(rng)
    if shardings is None:  # the default device
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nn.unbox(abstract_frozen_params(model, image_shape)))
    vision_params = jax.jit(lambda r: nn.unbox(vision.init(r, images)["params"]),
                            out_shardings=shardings["vision"])(vision_rng)
    if vision_init:
        encoder = load_encoder_weights(vision_init, model.vision_config, vision_params["encoder"])
        encoder = jax.tree.map(lambda v, s: jax.make_array_from_callback(v.shape, s, lambda idx: v[idx]),
                               encoder, shardings["vision"]["encoder"])
        vision_params = dict(vision_params, encoder=encoder)
    if lm_params is None:
        lm_params = init_lm_params(model.lm_config, lm_rng, shardings["lm"])
    else:
        shared = shared_lm_leaves if shared_lm_leaves is not None else jax.tree.map(lambda _: False, lm_params)
        lm_params = jax.tree.map(lambda x, s, alias: jax.device_put(x, s, may_alias=alias),
                                 lm_params, shardings["lm"], shared)
    return {"vision": vision_params, "lm": lm_params}
