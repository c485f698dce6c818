"""The batch-normalised ConvNet: training passes normalise by the batch and update the running statistics,
which the step writes into the params; every other pass uses the running statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_apply
from flax import traverse_util

from frozenlm_jax.models.convnet import ConvNet
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import DecoderLM, LMConfig
from frozenlm_jax.models.vision import build_encoder, encoder_config
from frozenlm_jax.parallel import make_mesh
from frozenlm_jax.config import default_config
from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
from frozenlm_jax.train.state import init_train_state
from frozenlm_jax.train.step import make_trainer
from frozenlm_jax.build import encoder_config_for

CONFIG = encoder_config("convnet_tiny")
LM = LMConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=64)
IMAGE = (16, 16, 3)
B, T, N = 8, 8, 2


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def images(seed, count=B):
    return np.random.default_rng(seed).uniform(-1, 1, (count,) + IMAGE).astype(np.float32)


def test_inference_uses_running_statistics_and_training_updates_them():
    model = build_encoder(CONFIG)
    assert isinstance(model, ConvNet)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images(0, 1))["params"])
    x = images(1)
    # Inference: an image's features do not depend on the rest of its batch.
    alone = jit_apply(model, {"params": params}, x[:1])
    np.testing.assert_allclose(jit_apply(model, {"params": params}, x)[:1], alone, rtol=1e-5, atol=1e-6)
    # Training: batch statistics, and running statistics moved towards the batch's by 1 - momentum.
    train_features, updated = jit_apply(model, {"params": params}, x, mutable=["batch_stats"])
    assert not np.allclose(train_features[:1], alone, atol=1e-4)
    stats = flat(updated["batch_stats"])
    conv = jax.lax.conv_general_dilated(x, params["stage0_conv0"]["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    keep = CONFIG.bn_momentum
    np.testing.assert_allclose(stats["stage0_conv0_bn/running_mean"], (1 - keep) * conv.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["stage0_conv0_bn/running_var"], keep + (1 - keep) * conv.var((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    assert set(stats) == {f"stage{s}_conv{c}_bn/running_{m}" for s in (0, 1) for c in (0, 1) for m in ("mean", "var")}


def make_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, LM.vocab_size, (B, T)).astype(np.int32)
    tokens[:, :N] = 0
    return dict(tokens=tokens, images=images(seed)[:, None], image_mask=np.ones((B, 1), bool),
                image_positions=np.zeros((B, 1), np.int32), loss_mask=np.arange(T)[None].repeat(B, 0) >= N)


def test_step_writes_the_running_statistics_of_its_training_pass():
    grad_accum_steps = 2  # two microbatches: each moves the statistics, the step keeps the mean of the moves
    model = Frozen(LM, CONFIG, N)
    lm_params = nn.unbox(jax.jit(DecoderLM(LM).init)(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"])
    trainer = make_trainer(model, make_mesh({"data": 2}, devices=jax.devices()[:2]),
                           label_rules=VARIANT_LABEL_RULES["frozen"], image_shape=IMAGE,
                           optimizer_kwargs=dict(learning_rate=1e-2, total_steps=10),
                           grad_accum_steps=grad_accum_steps)
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    before = jax.tree.map(np.asarray, state.params)
    batch = make_batch(3)
    # The running statistics a training pass over each microbatch computes, from the params before the step.
    expected = []
    for rows in (np.arange(a, B, grad_accum_steps) for a in range(grad_accum_steps)):  # the step's microbatches
        micro = {k: v[rows] for k, v in batch.items()}
        _, updated = jit_apply(model, {"params": {**before, "lm": lm_params}}, micro, method=Frozen.loss,
                                 mutable=["batch_stats"])
        expected.append(flat(updated["batch_stats"]))
    state, _ = trainer.step(state, frozen, trainer.shard_batch(batch))
    after = flat(jax.tree.map(np.asarray, state.params))
    for path in expected[0]:
        mean_of_micro = np.mean([e[path] for e in expected], axis=0)
        np.testing.assert_allclose(after[path], mean_of_micro, rtol=1e-5, atol=1e-6, err_msg=path)
        assert not np.allclose(after[path], flat(before)[path])
    # The other vision params trained.
    assert not np.allclose(after["vision/encoder/stage0_conv0/kernel"],
                           flat(before)["vision/encoder/stage0_conv0/kernel"])


@pytest.mark.parametrize("name", ["convnet_tiny", "nf_resnet_tiny"])
def test_max_pool_takes_the_largest_activation_of_the_same_feature_map(name):
    mean_model, max_model = build_encoder(encoder_config(name)), build_encoder(encoder_config(name, pool="max"))
    params = {"params": nn.unbox(jax.jit(mean_model.init)(jax.random.key(0), images(0, 1))["params"])}
    x = images(2)
    mean, top = jit_apply(mean_model, params, x), jit_apply(max_model, params, x)
    assert top.shape == mean.shape
    assert np.all(top >= mean - 1e-6) and np.mean(top > mean + 1e-3) > 0.5
    # One bright corner on a blank image moves the max-pooled features at least as much as the mean-pooled.
    blank, spot = np.zeros((1,) + IMAGE, np.float32), np.zeros((1,) + IMAGE, np.float32)
    spot[0, :3, :3] = 1.0
    moved = lambda model: np.abs(model.apply(params, spot) - model.apply(params, blank)).max()  # noqa: E731
    assert moved(max_model) >= moved(mean_model)


def test_pool_choice_is_checked():
    with pytest.raises(ValueError, match="unknown pool 'min'; supported: mean, max"):
        encoder_config("convnet_tiny", pool="min")
    with pytest.raises(ValueError, match="unknown pool 'avg'; supported: mean, max"):
        encoder_config("nf_resnet_tiny", pool="avg")
    config = default_config()
    config.vision.encoder, config.vision.pool = "convnet_tiny", "max"
    assert encoder_config_for(config).pool == "max"
    config.vision.encoder = "vit_tiny"
    with pytest.raises(ValueError, match="vit config 'vit_tiny': unknown pool 'max'; supported: cls, mean, tokens"):
        encoder_config_for(config)
