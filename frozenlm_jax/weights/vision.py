"""Pretrained vision-encoder weights from a local safetensors file, read without torch.

Two layouts: timm's (`nf_resnet50` -> encoder `nf_resnet50_timm`, `vit_*` -> a ViT config) and HF
transformers' `ViTModel` / `ViTForImageClassification` as `save_pretrained` writes them. Each layout has an
explicit table: our parameter path (regex) -> the tensor's name and a converter giving the tensor's expected
shape and the transform into our layout. Every tensor is checked (present, expected shape, none unused)
before any is returned. Classifier heads and HF's pooler are not part of an encoder and are skipped.

    encoder = load_encoder_weights("vit_base_patch16_224.safetensors", config, params["vision"]["encoder"])
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as load_safetensors

from frozenlm_jax import paths
from frozenlm_jax.weights.params import CheckpointError

LAYOUTS = ("timm", "hf")

# shape of our parameter -> (the tensor's shape in the file, the transform from the file's layout to ours)
Converter = Callable[[tuple[int, ...]], tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]


def _same(s):
    return tuple(s), lambda w: w


def _conv(s):  # torch [out, in, kh, kw] -> [kh, kw, in, out]
    return (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0)


def _conv_gain(s):  # timm's ScaledStdConv2d gain [out, 1, 1, 1] -> [out]
    return (s[0], 1, 1, 1), lambda w: w.reshape(s)


def _linear(s):  # torch nn.Linear [out, in] -> [in, out]
    return (s[1], s[0]), lambda w: w.T


def _to_heads(s):  # [heads * head_dim, embed] -> [embed, heads, head_dim]
    return (s[1] * s[2], s[0]), lambda w: w.T.reshape(s)


def _from_heads(s):  # [embed, heads * head_dim] -> [heads, head_dim, embed]
    return (s[2], s[0] * s[1]), lambda w: w.T.reshape(s)


def _flat_to(s):  # [prod(s)] -> s
    return (int(np.prod(s)),), lambda w: w.reshape(s)


def _leading_ones(n: int) -> Converter:  # [1, ..., 1, *s] -> s (class token, position embeddings)
    return lambda s: ((1,) * n + tuple(s), lambda w: w.reshape(s))


def _fused_qkv_kernel(index: int) -> Converter:  # timm's qkv [3 * heads * head_dim, embed] -> q, k or v
    return lambda s: ((3 * s[1] * s[2], s[0]), lambda w: w.reshape(3, s[1] * s[2], s[0])[index].T.reshape(s))


def _fused_qkv_bias(index: int) -> Converter:
    return lambda s: ((3 * s[0] * s[1],), lambda w: w.reshape((3,) + tuple(s))[index])


def _ws_conv(ours: str, theirs: str):
    return [(rf"{ours}/kernel", rf"{theirs}.weight", _conv), (rf"{ours}/gain", rf"{theirs}.gain", _conv_gain),
            (rf"{ours}/bias", rf"{theirs}.bias", _same)]


def _norm(ours: str, theirs: str):
    return [(rf"{ours}/scale", rf"{theirs}.weight", _same), (rf"{ours}/bias", rf"{theirs}.bias", _same)]


def _dense(ours: str, theirs: str):
    return [(rf"{ours}/kernel", rf"{theirs}.weight", _linear), (rf"{ours}/bias", rf"{theirs}.bias", _same)]


BLOCK = r"stage(\d+)_block(\d+)"
TIMM_NF_RESNET = [
    *_ws_conv("stem", "stem.conv"),
    *_ws_conv(rf"{BLOCK}/shortcut", r"stages.\1.\2.downsample.conv"),
    *_ws_conv(rf"{BLOCK}/conv(\d)", r"stages.\1.\2.conv\3"),
]

TIMM_VIT = [
    (r"patch_embed/kernel", "patch_embed.proj.weight", _conv),
    (r"patch_embed/bias", "patch_embed.proj.bias", _same),
    (r"cls_token", "cls_token", _leading_ones(2)),
    (r"pos_embed", "pos_embed", _leading_ones(1)),
    *_norm(r"block(\d+)/norm1", r"blocks.\1.norm1"),
    *[(rf"block(\d+)/attn/{part}/kernel", r"blocks.\1.attn.qkv.weight", _fused_qkv_kernel(i))
      for i, part in enumerate(("query", "key", "value"))],
    *[(rf"block(\d+)/attn/{part}/bias", r"blocks.\1.attn.qkv.bias", _fused_qkv_bias(i))
      for i, part in enumerate(("query", "key", "value"))],
    (r"block(\d+)/attn/out/kernel", r"blocks.\1.attn.proj.weight", _from_heads),
    (r"block(\d+)/attn/out/bias", r"blocks.\1.attn.proj.bias", _same),
    *_norm(r"block(\d+)/norm2", r"blocks.\1.norm2"),
    *_dense(r"block(\d+)/mlp_fc1", r"blocks.\1.mlp.fc1"),
    *_dense(r"block(\d+)/mlp_fc2", r"blocks.\1.mlp.fc2"),
    *_norm("norm", "norm"),
]

HF_VIT = [
    (r"patch_embed/kernel", "embeddings.patch_embeddings.projection.weight", _conv),
    (r"patch_embed/bias", "embeddings.patch_embeddings.projection.bias", _same),
    (r"cls_token", "embeddings.cls_token", _leading_ones(2)),
    (r"pos_embed", "embeddings.position_embeddings", _leading_ones(1)),
    *_norm(r"block(\d+)/norm1", r"encoder.layer.\1.layernorm_before"),
    *[entry for part in ("query", "key", "value") for entry in (
        (rf"block(\d+)/attn/{part}/kernel", rf"encoder.layer.\1.attention.attention.{part}.weight", _to_heads),
        (rf"block(\d+)/attn/{part}/bias", rf"encoder.layer.\1.attention.attention.{part}.bias", _flat_to))],
    (r"block(\d+)/attn/out/kernel", r"encoder.layer.\1.attention.output.dense.weight", _from_heads),
    (r"block(\d+)/attn/out/bias", r"encoder.layer.\1.attention.output.dense.bias", _same),
    *_norm(r"block(\d+)/norm2", r"encoder.layer.\1.layernorm_after"),
    *_dense(r"block(\d+)/mlp_fc1", r"encoder.layer.\1.intermediate.dense"),
    *_dense(r"block(\d+)/mlp_fc2", r"encoder.layer.\1.output.dense"),
    *_norm("norm", "layernorm"),
]

TABLES = {("nf_resnet", "timm"): TIMM_NF_RESNET, ("vit", "timm"): TIMM_VIT, ("vit", "hf"): HF_VIT}
# Tensors of a classification model that are not part of its encoder.
SKIPPED = {"timm": re.compile(r"head\..*"), "hf": re.compile(r"(pooler|classifier)\..*|embeddings\.mask_token")}
# A tensor that only the layout has, to tell the layouts apart.
MARKERS = {"timm": ("stem.conv.weight", "patch_embed.proj.weight"),
           "hf": ("embeddings.patch_embeddings.projection.weight",)}


def detect_layout(names) -> str:
    """'timm' or 'hf' from a file's tensor names (an HF file's `vit.` prefix already removed)."""
    for layout, markers in MARKERS.items():
        if any(marker in names for marker in markers):
            return layout
    raise CheckpointError(
        f"cannot tell the layout of a file with tensors {sorted(names)[:5]}...; supported: timm's nf_resnet50 "
        "and vit_* (stem.conv.weight, patch_embed.proj.weight) and HF's ViTModel "
        "(embeddings.patch_embeddings.projection.weight)")


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, an HF classifier's `vit.` prefix removed."""
    path = paths.path(path)
    paths.preflight(path)
    if not path.is_file():
        raise CheckpointError(f"no such safetensors file: {str(path)!r}; set vision.init to a .safetensors file "
                              "(local or gs://) of a timm or HF ViTModel checkpoint")
    try:
        if paths.is_remote(path):
            tensors = load_safetensors(path.read_bytes())
        else:
            with safe_open(str(path), framework="np") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    if any(name.startswith("vit.") for name in tensors):
        tensors = {name.removeprefix("vit."): value for name, value in tensors.items()}
    return tensors


def load_encoder_weights(path, config, target, layout: str = "auto"):
    """The encoder parameter tree of `config`, filled from the safetensors file at `path`.

    target: the encoder's params or their ShapeDtypeStructs (boxed or not), e.g.
        `params["vision"]["encoder"]`: they give each parameter's path, shape and dtype (a ViT's position
        embeddings follow the image size). Returns a nested dict of numpy arrays of the same structure.
    layout: "timm", "hf" or "auto" (from the tensor names).
    """
    tensors = read_tensors(path)
    if layout == "auto":
        layout = detect_layout(set(tensors))
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown weights layout {layout!r}; supported: auto, {', '.join(LAYOUTS)}")
    family = config.family
    if (family, layout) not in TABLES:
        raise CheckpointError(f"{path} is in {layout}'s layout, which has no {family} encoders; "
                              f"use a {family} file in one of the layouts of {sorted(TABLES)}")
    if family == "nf_resnet" and config.style != "timm":
        raise CheckpointError(f"timm's NF-ResNet weights need an encoder with style='timm' (e.g. "
                              f"vision.encoder='nf_resnet50_timm'); {config.name!r} has style {config.style!r}")
    targets = traverse_util.flatten_dict(nn.unbox(target), sep="/")
    plan = _plan(targets, TABLES[(family, layout)], layout)
    _check(plan, tensors, layout, path)
    params = {}
    for param_path, (name, _, transform) in plan.items():
        value = transform(tensors[name])
        params[param_path] = np.ascontiguousarray(value, dtype=targets[param_path].dtype)
    return traverse_util.unflatten_dict(params, sep="/")


def _plan(targets, table, layout):
    """For each parameter path: (tensor name, the tensor's expected shape, transform)."""
    plan = {}
    for param_path, leaf in targets.items():
        for pattern, template, converter in table:
            if match := re.fullmatch(pattern, param_path):
                shape, transform = converter(tuple(leaf.shape))
                plan[param_path] = (match.expand(template), shape, transform)
                break
        else:
            raise CheckpointError(f"encoder parameter {param_path!r} has no tensor in the {layout} layout; "
                                  "the encoder config has a part that layout's models lack")
    return plan


def _check(plan, tensors, layout, path) -> None:
    """Every needed tensor present with its expected shape, and none unused."""
    needed = {name: (param_path, shape) for param_path, (name, shape, _) in plan.items()}
    missing = sorted(set(needed) - set(tensors))
    if missing:
        param_path, shape = needed[missing[0]]
        raise CheckpointError(
            f"{path} has no tensor {missing[0]!r} (shape {shape}, for encoder parameter {param_path!r}); "
            f"{len(missing)} missing in all: {missing[:5]}. Is the file's model the encoder config's "
            "(depths, widths, class token)?")
    unused = sorted(n for n in set(tensors) - set(needed) if not SKIPPED[layout].fullmatch(n))
    if unused:
        raise CheckpointError(
            f"{path} has {len(unused)} tensor(s) the encoder has no parameter for: {unused[:5]}; the file's "
            "model has parts the encoder config lacks (more blocks or stages, layer scale, fc_norm?)")
    for name, (param_path, shape) in needed.items():
        found = tuple(tensors[name].shape)
        if found != shape:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {found}, expected {shape} for encoder parameter "
                f"{param_path!r}; the file's model and the encoder config differ in size (widths, patch size, "
                "image size for position embeddings?)")
