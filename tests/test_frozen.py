"""The Frozen model and its sharded step: prefix placement, freezing, variants, mesh invariance, FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_apply
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from frozenlm_jax.models.frozen import Frozen, check_batch
from frozenlm_jax.models.lm import DecoderLM, LMConfig, abstract_lm_params
from frozenlm_jax.models.vision import NFResNet, encoder_config
from frozenlm_jax.parallel import logical_shardings, make_mesh
from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES, param_labels, with_prefix_rule
from frozenlm_jax.train.state import init_train_state
from frozenlm_jax.train.step import make_trainer
from frozenlm_jax.trees import merge_params

LM = LMConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=8, intermediate_size=64)
VISION = encoder_config("nf_resnet_tiny")
IMAGE = (16, 16, 3)
B, T, N = 8, 10, 2


def make_batch(seed=0, images_per_row=1):
    """Captioning layout: [prefix x N] caption..., loss on the caption; the caption's first token is
    a function of the image (its brightest channel), so the vision side has something to learn."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (B, images_per_row) + IMAGE).astype(np.float32)
    tokens = rng.integers(3, LM.vocab_size, (B, T)).astype(np.int32)
    tokens[:, 0:N] = 0  # placeholder slots
    tokens[:, N] = 10 + images[:, 0].mean(axis=(1, 2)).argmax(-1)
    return dict(tokens=tokens, images=images, image_mask=np.ones((B, images_per_row), bool),
                image_positions=np.zeros((B, images_per_row), np.int32), loss_mask=np.arange(T)[None].repeat(B, 0) >= N)


def trainer_for(mesh, variant="frozen", lr=1e-3, lm=LM, **kwargs):
    model = Frozen(lm, VISION, N, variant=variant)
    return make_trainer(model, mesh, label_rules=VARIANT_LABEL_RULES[variant], image_shape=IMAGE,
                        optimizer_kwargs=dict(learning_rate=lr, lm_learning_rate=lr, weight_decay=0.0,
                                              total_steps=100), **kwargs)


def single_device_mesh():
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def random_lm_params(config):
    """A random LM with the weight scale of a trained one (at init scale 0.02 its logits are nearly flat,
    so no prefix could make it predict anything)."""
    params = nn.unbox(jax.jit(DecoderLM(config).init)(jax.random.key(7), jnp.zeros((1, 1), jnp.int32))["params"])
    return jax.tree.map(lambda x: x * 25 if x.ndim > 1 else x, params)


@pytest.fixture(scope="module")
def lm_params():
    return random_lm_params(LM)


def test_freezing_keeps_lm_bit_identical_and_trains_only_vision(lm_params):
    trainer = trainer_for(make_mesh({"data": 2, "fsdp": 4}))
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    before = jax.tree.map(np.array, frozen)
    stem_before = np.array(state.params["vision"]["encoder"]["stem"]["kernel"])
    assert set(state.params) == {"vision"} and set(frozen) == {"lm"}
    assert set(flat(param_labels(merge_params(state.params, frozen), VARIANT_LABEL_RULES["frozen"])).values()) \
        == {"vision", "frozen"}
    batch = trainer.shard_batch(make_batch())
    for _ in range(3):
        state, metrics = trainer.step(state, frozen, batch)
    for path, value in flat(before).items():
        np.testing.assert_array_equal(np.asarray(flat(frozen)[path]), value, err_msg=path)
    assert not np.array_equal(np.asarray(state.params["vision"]["encoder"]["stem"]["kernel"]), stem_before)
    # The gradient reached the first conv through the frozen LM.
    grads = jax.jit(jax.grad(lambda p: trainer.model.apply({"params": merge_params(p, frozen)}, batch,
                                                           method=Frozen.loss)[0]))(state.params)
    assert float(jnp.abs(grads["vision"]["encoder"]["stem"]["kernel"]).max()) > 0
    # No optimizer state for any LM leaf: only vision arrays live in it.
    opt_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    assert all("'lm'" not in jax.tree_util.keystr(path) for path, leaf in opt_leaves if np.ndim(leaf) > 0)
    assert sum(np.size(leaf) for _, leaf in opt_leaves) < 3 * sum(x.size for x in jax.tree.leaves(state.params)) + 10


@pytest.mark.parametrize("lm", [LM.replace(qkv_bias=True, tie_word_embeddings=True, sliding_window=4),
                                LM.replace(qk_norm=True, head_dim=12)], ids=["qwen2", "qwen3"])
def test_qwen_lm_stays_bit_identical_through_a_step(lm):
    """Qwen2's q/k/v biases and Qwen3's q/k norms are frozen LM params, sharded by their logical axes."""
    shardings = flat(logical_shardings(abstract_lm_params(lm), make_mesh({"data": 2, "fsdp": 2, "tensor": 2})))
    if lm.qkv_bias:  # (kv_heads, head_dim)
        assert shardings["layers_0/attn/k_proj/bias"].spec == P("tensor", None)
    if lm.qk_norm:  # (norm,): replicated
        assert shardings["layers_0/attn/k_norm/scale"].spec == P(None)
    params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 1 else x, random_lm_params(lm))  # biases not zero
    trainer = trainer_for(single_device_mesh(), lm=lm)
    state, frozen = init_train_state(trainer, jax.random.key(0), params, IMAGE)
    attn = frozen["lm"]["layers_0"]["attn"]
    assert ("bias" in attn["q_proj"], "bias" in attn["o_proj"], "q_norm" in attn) == (lm.qkv_bias, False, lm.qk_norm)
    before = jax.tree.map(np.array, frozen)
    stem_before = np.array(state.params["vision"]["encoder"]["stem"]["kernel"])
    state, metrics = trainer.step(state, frozen, trainer.shard_batch(make_batch()))
    assert np.isfinite(float(metrics["loss"]))
    for path, value in flat(before).items():
        np.testing.assert_array_equal(np.asarray(flat(frozen)[path]), value, err_msg=path)
    assert not np.array_equal(np.asarray(state.params["vision"]["encoder"]["stem"]["kernel"]), stem_before)


def test_finetuned_variant_trains_the_lm(lm_params):
    trainer = trainer_for(single_device_mesh(), variant="finetuned")
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    assert frozen == {} and set(state.params) == {"vision", "lm"}
    before = np.array(state.params["lm"]["layers_0"]["mlp"]["up_proj"]["kernel"])
    state, _ = trainer.step(state, frozen, trainer.shard_batch(make_batch()))
    assert not np.array_equal(np.asarray(state.params["lm"]["layers_0"]["mlp"]["up_proj"]["kernel"]), before)


def test_prefix_projection_learns_at_its_own_rate(lm_params):
    """With the prefix rule, Adam's first step moves the projection by prefix_learning_rate per entry and the
    encoder by learning_rate (a first Adam step is lr * g / |g|), and the LM not at all."""
    model = Frozen(LM, VISION, N)
    rules = with_prefix_rule(VARIANT_LABEL_RULES["frozen"])
    trainer = make_trainer(model, single_device_mesh(), label_rules=rules, image_shape=IMAGE,
                           optimizer_kwargs=dict(learning_rate=1e-4, prefix_learning_rate=3e-2, warmup_steps=0,
                                                 grad_clip_norm=None, total_steps=100))
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    assert set(flat(param_labels(merge_params(state.params, frozen), rules)).values()) == {"vision", "prefix", "frozen"}
    before = {path: np.array(value) for path, value in flat(state.params).items()}  # the step donates state
    new, _ = trainer.step(state, frozen, trainer.shard_batch(make_batch()))
    moved = {path: float(np.abs(np.asarray(flat(new.params)[path]) - value).max()) for path, value in before.items()}
    np.testing.assert_allclose(moved["vision/prefix_proj/kernel"], 3e-2, rtol=1e-3)
    np.testing.assert_allclose(moved["vision/encoder/stem/kernel"], 1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="'lm/embed/embedding' matches no rule in \\['\\^vision/'\\]; add a rule "
                                         "that labels it vision, prefix, lm, frozen"):
        param_labels(merge_params(state.params, frozen), (("^vision/", "vision"),))


def test_overfits_a_small_batch(lm_params):
    trainer = trainer_for(single_device_mesh(), lr=1e-2)
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    batch = trainer.shard_batch(make_batch())
    losses = []
    for _ in range(60):
        state, metrics = trainer.step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def two_steps(mesh, lm_params):
    trainer = trainer_for(mesh)
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    batch = trainer.shard_batch(make_batch())
    for _ in range(2):
        state, metrics = trainer.step(state, frozen, batch)
    return float(metrics["loss"]), jax.tree.map(np.asarray, state.params), frozen


@pytest.fixture(scope="module")
def single_device_run(lm_params):
    return two_steps(single_device_mesh(), lm_params)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_mesh_invariance(lm_params, single_device_run, mesh_shape):
    loss_1, vision_1, _ = single_device_run
    loss_n, vision_n, frozen_n = two_steps(make_mesh(mesh_shape), lm_params)
    assert abs(loss_1 - loss_n) < 1e-4 * abs(loss_1)
    for path, value in flat(vision_1).items():
        np.testing.assert_allclose(flat(vision_n)[path], value, atol=2e-5, err_msg=path)
    kernel = frozen_n["lm"]["layers_0"]["mlp"]["up_proj"]["kernel"]  # (embed, mlp) -> (fsdp, tensor)
    expected = (LM.hidden_size // mesh_shape.get("fsdp", 1), LM.intermediate_size // mesh_shape.get("tensor", 1))
    assert kernel.addressable_shards[0].data.shape == expected


def test_freezing_by_argument_saves_flops(lm_params):
    mesh = single_device_mesh()
    flops = []
    for return_frozen_grads in (False, True):
        trainer = trainer_for(mesh, return_frozen_grads=return_frozen_grads)
        state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
        compiled = trainer.step.lower(state, frozen, trainer.shard_batch(make_batch())).compile()
        analysis = compiled.cost_analysis()
        flops.append((analysis[0] if isinstance(analysis, list) else analysis)["flops"])
    assert flops[0] <= 0.8 * flops[1], flops


def test_cpu_step_runs_convolutions_outside_ynnpack(lm_params):
    """On CPU the step's convolutions leave YNNPACK (slower than Eigen's for NF-ResNet-50) and its dots stay."""
    trainer = trainer_for(single_device_mesh())
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
    hlo = trainer.step.lower(state, frozen, trainer.shard_batch(make_batch())).compile().as_text()
    ynn = [line for line in hlo.splitlines() if '"__ynn_fusion"' in line and " fusion(" in line]
    assert any("dot_general" in line for line in ynn)
    assert "conv_general_dilated" in hlo and not any("conv_general_dilated" in line for line in ynn)


def test_prefix_lands_in_its_slots_and_text_only_equals_the_lm(lm_params):
    model = Frozen(LM, VISION, N)
    batch = make_batch(images_per_row=2)
    batch["image_positions"] = np.tile(np.array([[1, 5]], np.int32), (B, 1))
    batch["image_mask"][0, 1] = False  # row 0 has one real image
    vision = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"]["vision"])
    params = {"vision": vision, "lm": lm_params}
    embeds = jit_apply(model, {"params": params}, batch, method=Frozen.embed_inputs)
    tokens = jit_apply(DecoderLM(LM), {"params": lm_params}, batch["tokens"], method=DecoderLM.embed)
    prefix = jit_apply(model, {"params": params}, batch["images"].reshape((-1,) + IMAGE),
                         method=lambda m, x: m.vision(x)).reshape(B, 2, N, -1)
    for row in range(B):
        image_slots = {1: (0, 0), 2: (0, 1)} | ({} if row == 0 else {5: (1, 0), 6: (1, 1)})
        for t in range(T):
            expected = prefix[row][image_slots[t]] if t in image_slots else tokens[row, t]
            np.testing.assert_allclose(embeds[row, t], expected, atol=1e-6, err_msg=f"row {row} slot {t}")
    text_only = dict(batch, image_mask=np.zeros_like(batch["image_mask"]))
    np.testing.assert_allclose(jit_apply(model, {"params": params}, text_only),
                               jit_apply(DecoderLM(LM), {"params": lm_params}, batch["tokens"]), atol=1e-5)


def test_bad_batches_raise_clear_errors(lm_params):
    batch = make_batch()
    check_batch(batch, N)
    with pytest.raises(ValueError, match="prefix slots fall outside the 10 tokens"):
        check_batch(dict(batch, image_positions=np.full((B, 1), 9, np.int32)), N)
    with pytest.raises(ValueError, match=r"images \(8, 16, 16, 3\) must be \[B, K, H, W, 3\]"):
        check_batch(dict(batch, images=batch["images"][:, 0]), N)
    with pytest.raises(ValueError, match="loss_mask marks image slots"):
        check_batch(dict(batch, loss_mask=np.ones((B, T), bool)), N)
    two = make_batch(images_per_row=2)
    with pytest.raises(ValueError, match="image slots overlap"):
        check_batch(dict(two, image_positions=np.tile(np.array([[0, 1]], np.int32), (B, 1))), N)
    model = Frozen(LM, VISION, N)
    with pytest.raises(ValueError, match="must be \\[B=8, K, H, W, 3\\]"):
        model.init(jax.random.key(0), dict(batch, image_mask=np.ones((B, 2), bool)))


def test_train_blind_ignores_images_and_frozen_does_not(lm_params):
    losses = {}
    for variant in ("train_blind", "frozen"):
        model = Frozen(LM, VISION, N, variant=variant)
        vision = nn.unbox(jax.jit(model.init)(jax.random.key(0), make_batch())["params"]["vision"])
        params = {"vision": vision, "lm": lm_params}
        batches = [make_batch(seed=0) | {"images": make_batch(seed=s)["images"]} for s in (1, 2)]
        losses[variant] = [float(jit_apply(model, {"params": params}, b, method=Frozen.loss)[0]) for b in batches]
    assert losses["train_blind"][0] == losses["train_blind"][1]
    assert losses["frozen"][0] != losses["frozen"][1]


def test_loss_is_the_masked_cross_entropy_of_the_full_logits(lm_params):
    """The loss runs the LM without the last position; it equals the cross-entropy of every position's logits,
    also with a second image's slots at the very end."""
    model = Frozen(LM, VISION, N)
    batch = make_batch(images_per_row=2)
    batch["image_positions"][:, 1] = T - N
    batch["loss_mask"][:, T - N:] = False
    params = {"vision": nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"]["vision"]), "lm": lm_params}
    logits = np.asarray(jit_apply(model, {"params": params}, batch), np.float64)[:, :-1, :LM.vocab_size]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    weight = batch["loss_mask"][:, 1:]
    loss, metrics = jit_apply(model, {"params": params}, batch, method=Frozen.loss)
    np.testing.assert_allclose(float(loss), (nll * weight).sum() / weight.sum(), rtol=1e-5)
    assert float(metrics["num_targets"]) == weight.sum()


def test_max_targets_gathers_the_same_loss(lm_params):
    model = Frozen(LM, VISION, N)
    batch = make_batch()
    params = {"vision": nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"]["vision"]), "lm": lm_params}
    full, _ = jit_apply(model, {"params": params}, batch, method=Frozen.loss)
    gathered, metrics = jit_apply(model, {"params": params}, batch, max_targets=T - N, method=Frozen.loss)
    np.testing.assert_allclose(gathered, full, rtol=1e-6)
    assert float(metrics["targets_dropped"]) == 0
    _, short = jit_apply(model, {"params": params}, batch, max_targets=3, method=Frozen.loss)
    assert float(short["targets_dropped"]) == B * (T - N - 3)


def test_nf_resnet_keeps_signal_variance_across_depth():
    cfg = encoder_config("nf_resnet50", skip_gain_init=1.0, widths=(64, 128, 256, 512), stem_width=16)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = jax.jit(NFResNet(cfg).init)(jax.random.key(1), images)
    _, inter = jax.jit(lambda v, x: NFResNet(cfg).apply(v, x, capture_intermediates=True))(variables, images)
    variances = [float(jnp.var(v[0])) for k, v in traverse_util.flatten_dict(inter["intermediates"]).items()
                 if len(k) == 2 and "block" in k[0]]
    assert len(variances) == 16
    assert max(variances) / min(variances) < 4, variances


def test_grad_accumulation_equals_the_whole_batch(lm_params):
    batch = make_batch(seed=3)
    # Rows with different numbers of targets, so microbatches hold different token counts.
    lengths = np.array([1, 8, 2, 7, 3, 3, 8, 1])
    batch["loss_mask"] = (np.arange(T)[None] >= N) & (np.arange(T)[None] < N + lengths[:, None])
    results = []
    for steps in (1, 4):
        trainer = trainer_for(make_mesh({"data": 2}, devices=jax.devices()[:2]), grad_accum_steps=steps)
        state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, IMAGE)
        state, metrics = trainer.step(state, frozen, trainer.shard_batch(batch))
        results.append((float(metrics["loss"]), float(metrics["num_targets"]), jax.tree.map(np.asarray, state.params)))
    (loss_1, count_1, params_1), (loss_4, count_4, params_4) = results
    assert count_1 == count_4 == lengths.sum()
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
    for path, value in flat(params_1).items():
        np.testing.assert_allclose(flat(params_4)[path], value, atol=1e-6, err_msg=path)
