"""Encoder weight import: timm's NF-ResNet (every parameter filled, numerical parity with timm's forward),
timm's and HF's ViT layouts (the same weights give the same params), bad files, and `vision.init`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from frozenlm_jax.weights.params import CheckpointError
from frozenlm_jax.weights.vision import load_encoder_weights
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import LMConfig
from frozenlm_jax.models.vision import NFResNet, build_encoder, encoder_config
from frozenlm_jax.parallel import make_mesh
from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
from frozenlm_jax.train.state import init_train_state
from frozenlm_jax.train.step import make_trainer

# A timm-style NF-ResNet small enough for tests: 7x7 stem + max-pool, a stride-1 then a stride-2 stage.
TINY_TIMM = dict(depths=(1, 2), widths=(32, 64), stem_width=16)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def timm_nf_resnet_shapes(depths, channels, stem_chs, num_classes=10):
    """Tensor names and shapes of timm's NormFreeNet for an `_nfres_cfg` model (stem '7x7_pool', bottle_ratio
    0.25, skipinit off), as timm/models/nfnet.py builds it: create_stem's `stem.conv`, each NormFreeBlock's
    conv1/conv2/conv3 and a DownsampleAvg `downsample.conv` when in != out or stride != 1, ScaledStdConv2d's
    weight [out, in, k, k], gain [out, 1, 1, 1] and bias [out], and ClassifierHead's `head.fc`."""
    def conv(name, out, inp, k):
        return {f"{name}.weight": (out, inp, k, k), f"{name}.gain": (out, 1, 1, 1), f"{name}.bias": (out,)}

    shapes = conv("stem.conv", stem_chs, 3, 7)
    prev = stem_chs
    for s, (depth, out) in enumerate(zip(depths, channels)):
        for b in range(depth):
            stride = 2 if s > 0 and b == 0 else 1  # stem stride 4 (with its pool): stage 0 keeps the size
            mid = out // 4
            p = f"stages.{s}.{b}."
            if prev != out or stride != 1:
                shapes |= conv(p + "downsample.conv", out, prev, 1)
            shapes |= conv(p + "conv1", mid, prev, 1) | conv(p + "conv2", mid, mid, 3) | conv(p + "conv3", out, mid, 1)
            prev = out
    return shapes | {"head.fc.weight": (num_classes, prev), "head.fc.bias": (num_classes,)}


def timm_nf_resnet_forward(torch, t, images, depths):
    """timm's NormFreeNet.forward_features + average pool (ReLU nets, gamma folded into ScaledStdConv2d)."""
    F = torch.nn.functional
    gamma, alpha = 1.7139588594436646, 0.2

    def conv(name, x, stride=1):
        w = t[name + ".weight"]
        scale = gamma * w[0].numel() ** -0.5
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=(t[name + ".gain"] * scale).view(-1),
                         training=True, momentum=0., eps=1e-5).reshape_as(w)
        return F.conv2d(x, w, t[name + ".bias"], stride, ((stride - 1) + (w.shape[-1] - 1)) // 2)

    x = F.max_pool2d(conv("stem.conv", images, 2), 3, stride=2, padding=1)
    expected_var = 1.0
    for s, depth in enumerate(depths):
        for b in range(depth):
            stride, p = (2 if s > 0 and b == 0 else 1), f"stages.{s}.{b}."
            out = F.relu(x) * (1.0 / expected_var ** 0.5)
            shortcut = x
            if p + "downsample.conv.weight" in t:
                pooled = F.avg_pool2d(out, 2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else out
                shortcut = conv(p + "downsample.conv", pooled)
            out = conv(p + "conv3", F.relu(conv(p + "conv2", F.relu(conv(p + "conv1", out)), stride)))
            x = out * alpha + shortcut
            expected_var = (1.0 if b == 0 else expected_var) + alpha ** 2
    return F.relu(x).mean((2, 3))


def random_tensors(shapes, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        offset = 1.0 if name.endswith((".gain", "norm1.weight", "norm2.weight")) else 0.0  # gains near 1
        tensors[name] = (offset + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return tensors


def test_timm_nf_resnet_fills_every_param_and_matches_timms_forward(torch, tmp_path):
    config = encoder_config("nf_resnet50_timm", **TINY_TIMM)
    images = np.random.default_rng(1).standard_normal((2, 36, 36, 3)).astype(np.float32)  # odd sizes: ceil pools
    init = jax.tree.map(np.asarray, nn.unbox(jax.jit(NFResNet(config).init)(jax.random.key(0), images)["params"]))
    tensors = random_tensors(timm_nf_resnet_shapes(TINY_TIMM["depths"], TINY_TIMM["widths"], TINY_TIMM["stem_width"]))
    save_file(tensors, str(tmp_path / "nf.safetensors"))
    params = load_encoder_weights(tmp_path / "nf.safetensors", config, init)
    assert flat(params).keys() == flat(init).keys()
    for path, value in flat(params).items():
        assert value.shape == flat(init)[path].shape and not np.allclose(value, flat(init)[path]), path
    np.testing.assert_array_equal(params["stage1_block0"]["shortcut"]["kernel"][0, 0],
                                  tensors["stages.1.0.downsample.conv.weight"][:, :, 0, 0].T)
    ours = np.asarray(jax.jit(NFResNet(config).apply)({"params": params}, images))
    with torch.no_grad():
        expected = timm_nf_resnet_forward(torch, {k: torch.from_numpy(v) for k, v in tensors.items()},
                                          torch.from_numpy(images.transpose(0, 3, 1, 2)), TINY_TIMM["depths"]).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_timm_nf_resnet50_names_and_shapes_map_one_to_one(tmp_path):
    config = encoder_config("nf_resnet50_timm")
    target = jax.eval_shape(NFResNet(config).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    shapes = timm_nf_resnet_shapes((3, 4, 6, 3), (256, 512, 1024, 2048), 64, num_classes=1000)
    # Each tensor filled with its own index: every parameter must come from its own tensor.
    tensors = {name: np.full(shape, i, np.float32) for i, (name, shape) in enumerate(shapes.items())}
    save_file(tensors, str(tmp_path / "nf_resnet50.safetensors"))
    params = flat(load_encoder_weights(tmp_path / "nf_resnet50.safetensors", config, target))
    assert params.keys() == flat(nn.unbox(target)).keys()
    used = {float(value.flat[0]) for value in params.values()}
    assert used == {float(i) for i, name in enumerate(shapes) if not name.startswith("head.")}
    assert params["stage3_block2/conv2/kernel"].shape == (3, 3, 512, 512)
    assert float(params["stage2_block0/shortcut/gain"][0]) == list(shapes).index("stages.2.0.downsample.conv.gain")


def hf_vit_tensors(width=32, depth=2, heads=4, mlp=64, patch=4, tokens=17, seed=0):
    """HF ViTModel tensors as save_pretrained writes them (transformers/models/vit/modeling_vit.py, with the
    checkpoint names that its conversion mapping renames on load)."""
    shapes = {"embeddings.cls_token": (1, 1, width), "embeddings.position_embeddings": (1, tokens, width),
              "embeddings.patch_embeddings.projection.weight": (width, 3, patch, patch),
              "embeddings.patch_embeddings.projection.bias": (width,),
              "layernorm.weight": (width,), "layernorm.bias": (width,),
              "pooler.dense.weight": (width, width), "pooler.dense.bias": (width,)}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            shapes |= {p + f"attention.attention.{part}.weight": (width, width),
                       p + f"attention.attention.{part}.bias": (width,)}
        shapes |= {p + "attention.output.dense.weight": (width, width), p + "attention.output.dense.bias": (width,),
                   p + "layernorm_before.weight": (width,), p + "layernorm_before.bias": (width,),
                   p + "layernorm_after.weight": (width,), p + "layernorm_after.bias": (width,),
                   p + "intermediate.dense.weight": (mlp, width), p + "intermediate.dense.bias": (mlp,),
                   p + "output.dense.weight": (width, mlp), p + "output.dense.bias": (width,)}
    return random_tensors(shapes, seed)


def timm_from_hf(hf, depth=2):
    """The same weights under timm's VisionTransformer names (timm/models/vision_transformer.py: PatchEmbed's
    proj, Block's norm1 / attn.qkv (q, k, v stacked on the output axis) / attn.proj / norm2 / mlp.fc1 / mlp.fc2,
    the final norm and the classifier `head`)."""
    timm = {"cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
            "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"],
            "head.weight": np.zeros((10, 32), np.float32), "head.bias": np.zeros((10,), np.float32)}
    for i in range(depth):
        p, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for suffix in ("weight", "bias"):
            timm[b + "attn.qkv." + suffix] = np.concatenate(
                [hf[p + f"attention.attention.{part}.{suffix}"] for part in ("query", "key", "value")])
            timm[b + "attn.proj." + suffix] = hf[p + "attention.output.dense." + suffix]
            timm[b + "norm1." + suffix] = hf[p + "layernorm_before." + suffix]
            timm[b + "norm2." + suffix] = hf[p + "layernorm_after." + suffix]
            timm[b + "mlp.fc1." + suffix] = hf[p + "intermediate.dense." + suffix]
            timm[b + "mlp.fc2." + suffix] = hf[p + "output.dense." + suffix]
    return timm


def vit_target(config, image=16):
    return jax.eval_shape(build_encoder(config).init, jax.random.key(0), jnp.zeros((1, image, image, 3)))["params"]


def test_timm_and_hf_vit_layouts_give_the_same_params(tmp_path):
    config = encoder_config("vit_tiny")
    hf = hf_vit_tensors()
    save_file(hf, str(tmp_path / "hf.safetensors"))
    save_file(timm_from_hf(hf), str(tmp_path / "timm.safetensors"))
    # An HF image classifier's file: `vit.` prefix and a classifier head.
    save_file({"vit." + k: v for k, v in hf.items()} | {"classifier.weight": np.zeros((3, 32), np.float32)},
              str(tmp_path / "hf_classifier.safetensors"))
    target = vit_target(config)
    from_hf = flat(load_encoder_weights(tmp_path / "hf.safetensors", config, target))
    assert from_hf.keys() == flat(nn.unbox(target)).keys()
    np.testing.assert_array_equal(from_hf["block1/attn/key/kernel"],
                                  hf["encoder.layer.1.attention.attention.key.weight"].T.reshape(32, 4, 8))
    for other in ("timm.safetensors", "hf_classifier.safetensors"):
        params = flat(load_encoder_weights(tmp_path / other, config, target))
        for path, value in from_hf.items():
            np.testing.assert_array_equal(params[path], value, err_msg=f"{other}: {path}")


def test_bad_files_name_the_tensor(tmp_path):
    config = encoder_config("vit_tiny")
    target = vit_target(config)
    hf = hf_vit_tensors()

    def load(tensors, name="bad.safetensors", cfg=config, tgt=target):
        save_file(tensors, str(tmp_path / name))
        return load_encoder_weights(tmp_path / name, cfg, tgt)

    name = "encoder.layer.1.intermediate.dense.weight"
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .* has shape \(64, 30\), expected \(64, 32\) "
                                              r"for encoder parameter 'block1/mlp_fc1/kernel'"):
        load(hf | {name: np.zeros((64, 30), np.float32)})
    with pytest.raises(CheckpointError, match=r"has no tensor 'encoder.layer.0.layernorm_after.bias' .*"
                                              r"'block0/norm2/bias'"):
        load({k: v for k, v in hf.items() if k != "encoder.layer.0.layernorm_after.bias"})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the encoder has no parameter for: "
                                              r"\['encoder.layer.2.output.dense.bias'\]"):
        load(hf | {"encoder.layer.2.output.dense.bias": np.zeros((32,), np.float32)})
    with pytest.raises(CheckpointError, match="'embeddings.position_embeddings' .* has shape \\(1, 17, 32\\), "
                                              "expected \\(1, 37, 32\\)"):
        load(hf, tgt=vit_target(config, image=24))
    with pytest.raises(CheckpointError, match="cannot tell the layout"):
        load({"weights": np.zeros(3, np.float32)})
    nf = encoder_config("nf_resnet_tiny")
    nf_target = jax.eval_shape(NFResNet(nf).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    timm_nf = random_tensors(timm_nf_resnet_shapes((1,), (32,), 16))
    with pytest.raises(CheckpointError, match="with style='timm'.*'nf_resnet_tiny' has style 'deepmind'"):
        load(timm_nf, cfg=nf, tgt=nf_target)
    with pytest.raises(CheckpointError, match="hf's layout, which has no nf_resnet encoders"):
        load(hf, cfg=nf, tgt=nf_target)
    with pytest.raises(CheckpointError, match="no such safetensors file"):
        load_encoder_weights(tmp_path / "missing.safetensors", config, target)


def test_trainer_initialises_the_encoder_from_vision_init(tmp_path):
    lm = LMConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64)
    hf = hf_vit_tensors()
    save_file(hf, str(tmp_path / "vit.safetensors"))
    model = Frozen(lm, encoder_config("vit_tiny"), 2)
    trainer = make_trainer(model, make_mesh({"data": 2, "fsdp": 4}), label_rules=VARIANT_LABEL_RULES["frozen"],
                           image_shape=(16, 16, 3), optimizer_kwargs=dict(learning_rate=1e-3, total_steps=10))
    state, _ = init_train_state(trainer, jax.random.key(0), None, (16, 16, 3), vision_init=str(tmp_path / "vit.safetensors"))
    encoder = state.params["vision"]["encoder"]
    np.testing.assert_array_equal(np.asarray(encoder["pos_embed"]), hf["embeddings.position_embeddings"][0])
    np.testing.assert_array_equal(np.asarray(encoder["block0"]["mlp_fc2"]["kernel"]),
                                  hf["encoder.layer.0.output.dense.weight"].T)
    assert encoder["block0"]["mlp_fc1"]["kernel"].sharding == trainer.state_shardings.params["vision"]["encoder"][
        "block0"]["mlp_fc1"]["kernel"]
