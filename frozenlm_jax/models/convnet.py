"""A VGG-style CNN with batch normalisation, for small images on small budgets.

`ConvNet(config)(images)` maps float images [N, H, W, 3] to pooled features [N, widths[-1]]: stages of
`convs_per_stage` 3x3 convs, each followed by batch norm and ReLU, with a 2x2 max-pool after every stage,
then the mean (`pool="mean"`) or the max (`pool="max"`) over the last map's positions. Batch norm and the
max together are what let the default run name shapes through the frozen LM (docs/training.md, "The default run,
measured"); mean-pooled, the same CNN did not.

Its running statistics are parameters (`running_mean`, `running_var`), so they are checkpointed, exported
and loaded with the other vision weights. A forward pass with the `batch_stats` collection mutable is a
training pass: it normalises by the batch's statistics and puts the updated running statistics into
`batch_stats`, which the training step writes over the parameters of the same path after the optimizer
update (they get no gradient). Every other pass (validation, generation, `FrozenLM`) normalises by the
running statistics, so an image's features do not depend on the rest of its batch.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "none")
POOLS = ("mean", "max")
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
IMAGE_AXES = ("activation_batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
    """Stages of `convs_per_stage` 3x3 conv + `norm` + ReLU with `widths` channels, 2x2 max-pool after each."""

    family: ClassVar[str] = "convnet"

    name: str
    widths: tuple[int, ...]
    convs_per_stage: int = 2
    norm: str = "batch"  # batch | none
    pool: str = "mean"  # mean | max: how the last feature map becomes one vector
    bn_momentum: float = 0.9  # running statistics: momentum * old + (1 - momentum) * the batch's
    bn_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if not self.widths or self.convs_per_stage < 1:
            raise ValueError(f"convnet config {self.name!r}: widths {self.widths} must be non-empty and "
                             f"convs_per_stage {self.convs_per_stage} at least 1")
        if self.norm not in NORMS:
            raise ValueError(f"convnet config {self.name!r}: unknown norm {self.norm!r}; supported: "
                             f"{', '.join(NORMS)}")
        if self.pool not in POOLS:
            raise ValueError(f"convnet config {self.name!r}: unknown pool {self.pool!r}; supported: "
                             f"{', '.join(POOLS)}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"convnet config {self.name!r}: bn_momentum {self.bn_momentum} must be in [0, 1)")

    @property
    def num_features(self) -> int:
        return self.widths[-1]

    def replace(self, **changes) -> "ConvNetConfig":
        return dataclasses.replace(self, **changes)


CONVNET_CONFIGS = {
    # CPU-sized, for 64 px shapes: 64 -> 32 -> 16 -> 8 px maps, 128 pooled features.
    "convnet_small": ConvNetConfig("convnet_small", widths=(32, 64, 128)),
    # Test-sized.
    "convnet_tiny": ConvNetConfig("convnet_tiny", widths=(8, 16)),
}


def pool(feature_map, kind: str):
    """[N, H, W, C] -> [N, C]: the mean or the max over positions. Max keeps a small object's local
    features (a corner, a point of a star) at full strength; the mean dilutes them by the object's area."""
    return feature_map.max(axis=(1, 2)) if kind == "max" else feature_map.mean(axis=(1, 2))


class BatchNorm(nn.Module):
    """Batch norm over [N, H, W] whose running statistics are parameters (see the module docstring)."""

    momentum: float
    eps: float
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        channels = (x.shape[-1],)
        param = lambda name, init: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, ("conv_out",)), channels, self.param_dtype)
        scale, bias = param("scale", nn.initializers.ones_init()), param("bias", nn.initializers.zeros_init())
        running_mean = param("running_mean", nn.initializers.zeros_init())
        running_var = param("running_var", nn.initializers.ones_init())
        xf = x.astype(jnp.float32)
        if self.is_mutable_collection("batch_stats"):
            mean = xf.mean(axis=(0, 1, 2))
            var = jnp.maximum((xf * xf).mean(axis=(0, 1, 2)) - mean * mean, 0.0)
            keep = self.momentum
            new_mean = keep * running_mean + (1 - keep) * jax.lax.stop_gradient(mean)
            new_var = keep * running_var + (1 - keep) * jax.lax.stop_gradient(var)
            self.put_variable("batch_stats", "running_mean", new_mean.astype(running_mean.dtype))
            self.put_variable("batch_stats", "running_var", new_var.astype(running_var.dtype))
        else:
            mean, var = jax.lax.stop_gradient(running_mean), jax.lax.stop_gradient(running_var)
        y = (xf - mean) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps) * scale + bias
        return y.astype(x.dtype)


class ConvNet(nn.Module):
    """Images [N, H, W, 3] -> pooled features [N, config.num_features]."""

    config: ConvNetConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = nn.with_logical_constraint(images.astype(cfg.dtype), IMAGE_AXES)
        for stage, width in enumerate(cfg.widths):
            for index in range(cfg.convs_per_stage):
                name = f"stage{stage}_conv{index}"
                x = nn.Conv(width, (3, 3), use_bias=cfg.norm == "none", dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name=name,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))(x)
                if cfg.norm == "batch":
                    x = BatchNorm(cfg.bn_momentum, cfg.bn_eps, cfg.param_dtype, name=f"{name}_bn")(x)
                x = nn.with_logical_constraint(jax.nn.relu(x), IMAGE_AXES)
            x = nn.max_pool(x, (2, 2), (2, 2))
        return pool(x.astype(jnp.float32), cfg.pool)
