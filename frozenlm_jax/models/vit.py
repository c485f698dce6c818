"""Vision Transformers (Dosovitskiy et al., 2021): patch embedding, pre-LN blocks, final LayerNorm.

`ViT(config)(images)` maps float images [N, H, W, 3] to a pooled feature [N, width] (`pool="cls"`: the
class token; `"mean"`: the mean of the patch tokens) or to the token sequence [N, L, width]
(`pool="tokens"`). The sequence length follows the input size: (H / patch) * (W / patch) patches, plus
the class token. `VIT_CONFIGS` has ViT-B/16 and smaller configs for CPU work.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from frozenlm_jax.models.lm import HIDDEN_AXES

POOLS = ("cls", "mean", "tokens")
PATCH_AXES = ("conv_height", "conv_width", "conv_in", "embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A ViT of `depth` pre-LN blocks of `width` channels, `num_heads` heads and an `mlp_dim` GELU MLP."""

    family: ClassVar[str] = "vit"

    name: str
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    class_token: bool = True
    pool: str = "cls"  # cls | mean | tokens
    layer_norm_eps: float = 1e-6  # timm's; HF ViT checkpoints use 1e-12
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"vit config {self.name!r}: width {self.width} is not divisible by num_heads "
                             f"{self.num_heads}; pick a head count that divides it")
        if self.pool not in POOLS:
            raise ValueError(f"vit config {self.name!r}: unknown pool {self.pool!r}; supported: {', '.join(POOLS)}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError(f"vit config {self.name!r}: pool='cls' needs class_token=True; "
                             "use pool='mean' or 'tokens' without a class token")

    @property
    def num_features(self) -> int:
        return self.width

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


VIT_CONFIGS = {
    # ViT-B/16 for 224 px images (197 tokens), as timm's vit_base_patch16_224 and HF's google/vit-base-patch16-224.
    "vit_b16": ViTConfig("vit_b16", patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    # CPU-sized: 64 px images in 8 x 8 patches (65 tokens).
    "vit_small_64": ViTConfig("vit_small_64", patch_size=8, width=192, depth=6, num_heads=3, mlp_dim=768),
    # Test-sized.
    "vit_tiny": ViTConfig("vit_tiny", patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64),
}


def _dense_init(axes):
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a scale and a bias, computed in float32."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), cfg.param_dtype)
        bias = self.param("bias", _zeros(("norm",)), (x.shape[-1],), cfg.param_dtype)
        h = x.astype(jnp.float32)
        h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.layer_norm_eps)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q, k, v and output projections."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h, hd = cfg.num_heads, cfg.head_dim
        qkv = lambda name: nn.DenseGeneral(  # noqa: E731
            (h, hd), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
            kernel_init=_dense_init(("embed", "heads", "head_dim")), bias_init=_zeros(("heads", "head_dim")))
        q, k, v = qkv("query")(x), qkv("key")(x), qkv("value")(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(
            cfg.width, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out",
            kernel_init=_dense_init(("heads", "head_dim", "embed")), bias_init=_zeros(("embed",)))(out)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then + mlp(norm2(x)) with an exact-GELU MLP."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = x + SelfAttention(cfg, name="attn")(LayerNorm(cfg, name="norm1")(x))
        dense = lambda feats, axes, name: nn.Dense(  # noqa: E731
            feats, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
            kernel_init=_dense_init(axes), bias_init=_zeros(axes[-1:]))
        y = dense(cfg.mlp_dim, ("embed", "mlp"), "mlp_fc1")(LayerNorm(cfg, name="norm2")(x))
        y = dense(cfg.width, ("mlp", "embed"), "mlp_fc2")(jax.nn.gelu(y, approximate=False))
        return nn.with_logical_constraint(x + y, HIDDEN_AXES)


class ViT(nn.Module):
    """Images [N, H, W, 3] -> pooled features [N, width], or tokens [N, L, width] for pool='tokens'."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        n, height, width = images.shape[:3]
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"vit {cfg.name!r}: image size {height}x{width} is not a multiple of the patch size "
                             f"{p}; resize the images (vision.image_size) to a multiple of {p}")
        x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name="patch_embed",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), PATCH_AXES),
                    bias_init=_zeros(("embed",)))(images.astype(cfg.dtype))
        x = x.reshape(n, -1, cfg.width)
        if cfg.class_token:
            cls = self.param("cls_token", _zeros(("embed",)), (cfg.width,), cfg.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.dtype), (n, 1, cfg.width)), x], axis=1)
        pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("positions", "embed"))
        pos = self.param("pos_embed", pos_init, x.shape[1:], cfg.param_dtype)
        x = nn.with_logical_constraint(x + pos.astype(cfg.dtype), HIDDEN_AXES)
        for index in range(cfg.depth):
            x = Block(cfg, name=f"block{index}")(x)
        x = LayerNorm(cfg, name="norm")(x).astype(jnp.float32)
        if cfg.pool == "cls":
            return x[:, 0]
        if cfg.pool == "mean":
            return x[:, int(cfg.class_token):].mean(axis=1)
        return x
