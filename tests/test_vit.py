"""The ViT encoder: parity with transformers' ViTModel through the HF-layout importer, the encoder registry,
and a Frozen model with a ViT that trains in the sharded step with its LM bit-identical."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from frozenlm_jax.weights.vision import load_encoder_weights
from frozenlm_jax.models.frozen import Frozen, VisionPrefix
from frozenlm_jax.models.lm import DecoderLM, LMConfig
from frozenlm_jax.models.vision import (
    ENCODER_CONFIGS, NFResNetConfig, build_encoder, encoder_config, encoder_config_from_dict, encoder_config_to_dict)
from frozenlm_jax.models.vit import ViT, ViTConfig
from frozenlm_jax.parallel import make_mesh
from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES, param_labels
from frozenlm_jax.train.state import init_train_state
from frozenlm_jax.train.step import make_trainer
from frozenlm_jax.trees import merge_params

IMAGE = (16, 16, 3)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def hf_vit(torch, tmp_path_factory):
    """A tiny transformers ViTModel with every parameter moved off its init, saved with save_pretrained."""
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=IMAGE[0], patch_size=4, attn_implementation="eager")
    model = transformers.ViTModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(directory)
    return model, directory / "model.safetensors", config


@pytest.mark.parametrize("pool", ["cls", "mean", "tokens"])
def test_parity_with_transformers_vit(torch, hf_vit, pool):
    model, path, hf_config = hf_vit
    config = encoder_config("vit_tiny", layer_norm_eps=hf_config.layer_norm_eps, pool=pool)
    images = np.random.default_rng(1).standard_normal((3,) + IMAGE).astype(np.float32)
    target = jax.eval_shape(ViT(config).init, jax.random.key(0), images)["params"]
    params = load_encoder_weights(path, config, target)
    ours = np.asarray(jax.jit(ViT(config).apply)({"params": params}, images))
    with torch.no_grad():
        hidden = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    expected = {"cls": hidden[:, 0], "mean": hidden[:, 1:].mean(1), "tokens": hidden}[pool]
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_registry_selects_either_family_and_round_trips():
    assert {"nf_resnet50", "nf_resnet_small", "nf_resnet_tiny", "nf_resnet50_timm", "vit_tiny", "vit_small_64",
            "vit_b16"} <= set(ENCODER_CONFIGS)
    assert isinstance(build_encoder(encoder_config("vit_tiny")), ViT)
    for name in ("vit_tiny", "nf_resnet50_timm", "nf_resnet_small"):
        config = encoder_config(name)
        assert encoder_config_from_dict(encoder_config_to_dict(config)) == config
    # Exports written before the registry have no family: NF-ResNet fields.
    saved = encoder_config_to_dict(encoder_config("nf_resnet_tiny"))
    old = {k: list(v) if isinstance(v, tuple) else v for k, v in saved.items() if k not in ("family", "style")}
    assert encoder_config_from_dict(old) == encoder_config("nf_resnet_tiny")
    with pytest.raises(ValueError, match="unknown vision encoder 'vit_huge'; available: .*vit_tiny"):
        encoder_config("vit_huge")
    with pytest.raises(ValueError, match="'vit_tiny' \\(vit\\) has no field\\(s\\) skip_gain_init"):
        encoder_config("vit_tiny", skip_gain_init=1.0)
    with pytest.raises(ValueError, match="pool='cls' needs class_token=True"):
        encoder_config("vit_tiny", class_token=False)
    with pytest.raises(ValueError, match="image size 18x18 is not a multiple of the patch size 4"):
        ViT(encoder_config("vit_tiny")).init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))
    assert isinstance(encoder_config("nf_resnet_tiny"), NFResNetConfig)
    assert isinstance(encoder_config("vit_small_64"), ViTConfig) and encoder_config("vit_small_64").head_dim == 64


def test_every_vit_param_has_logical_axis_names():
    boxed = jax.eval_shape(ViT(encoder_config("vit_tiny")).init, jax.random.key(0), jnp.zeros((1,) + IMAGE))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) and len(leaf.names) == len(leaf.value.shape)
                          for leaf in leaves)


LM = LMConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=64)
B, T, N = 8, 10, 2


def make_batch(seed=0):
    """Captioning layout: [prefix x N] caption..., the caption's first token a function of the image."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (B, 1) + IMAGE).astype(np.float32)
    tokens = rng.integers(3, LM.vocab_size, (B, T)).astype(np.int32)
    tokens[:, 0:N] = 0
    tokens[:, N] = 10 + images[:, 0].mean(axis=(1, 2)).argmax(-1)
    return dict(tokens=tokens, images=images, image_mask=np.ones((B, 1), bool),
                image_positions=np.zeros((B, 1), np.int32), loss_mask=np.arange(T)[None].repeat(B, 0) >= N)


@pytest.fixture(scope="module")
def lm_params():
    params = nn.unbox(jax.jit(DecoderLM(LM).init)(jax.random.key(7), jnp.zeros((1, 1), jnp.int32))["params"])
    return jax.tree.map(lambda x: x * 25 if x.ndim > 1 else x, params)


def test_frozen_with_a_vit_trains_only_vision(lm_params):
    model = Frozen(LM, encoder_config("vit_tiny"), N)
    trainer = make_trainer(model, make_mesh({"data": 2, "fsdp": 4}), label_rules=VARIANT_LABEL_RULES["frozen"],
                           image_shape=IMAGE, optimizer_kwargs=dict(learning_rate=1e-3, lm_learning_rate=1e-3,
                                                                    weight_decay=0.0, total_steps=100))
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    assert set(state.params) == {"vision"} and set(frozen) == {"lm"}
    assert set(flat(param_labels(merge_params(state.params, frozen), VARIANT_LABEL_RULES["frozen"])).values()) \
        == {"vision", "frozen"}
    before_lm = jax.tree.map(np.array, frozen)
    before_vision = jax.tree.map(np.array, state.params)
    batch = trainer.shard_batch(make_batch())
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    for path, value in flat(before_lm).items():
        np.testing.assert_array_equal(np.asarray(flat(frozen)[path]), value, err_msg=path)
    after_vision = flat(state.params)  # changed by Adam only if the gradient reached them through the LM
    for path in ("vision/encoder/patch_embed/kernel", "vision/encoder/block0/attn/query/kernel",
                 "vision/prefix_proj/kernel"):
        assert not np.array_equal(np.asarray(after_vision[path]), flat(before_vision)[path]), path
    opt_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    assert all("'lm'" not in jax.tree_util.keystr(path) for path, leaf in opt_leaves if np.ndim(leaf) > 0)



def test_a_token_sequence_is_pooled_into_the_prefix_tokens():
    model = VisionPrefix(encoder_config("vit_tiny", pool="tokens"), num_prefix_tokens=3, embed_dim=LM.hidden_size)
    images = np.random.default_rng(0).uniform(0, 1, (2,) + IMAGE).astype(np.float32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images)["params"])
    assert params["prefix_proj"]["kernel"].shape == (32, LM.hidden_size)
    # 17 tokens (16 patches and the class token) start as the means of 3 contiguous groups.
    pool = np.asarray(params["prefix_pool"])
    assert pool.shape == (3, 17)
    np.testing.assert_allclose(pool.sum(axis=1), 1.0, rtol=1e-6)
    assert ((pool > 0).sum(axis=0) == 1).all() and (np.diff((pool > 0).argmax(axis=0)) >= 0).all()
    _, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))(params)
    assert jax.eval_shape(model.apply, {"params": params}, images).shape == (2, 3, LM.hidden_size)
    assert float(jnp.abs(grads["prefix_pool"]).max()) > 0
    assert float(jnp.abs(grads["encoder"]["patch_embed"]["kernel"]).max()) > 0
