"""Normalizer-free ResNets (Brock et al., 2021): scaled weight standardisation, scalar skip gains, no BatchNorm.

`NFResNet(config)(images)` maps float images [N, H, W, 3] to pooled features [N, C]. `VISION_CONFIGS` has
the paper's NF-ResNet-50 and smaller configs for CPU work.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# ReLU scaled so a unit-Gaussian input keeps unit variance: sqrt(2 / (1 - 1/pi)).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
IMAGE_AXES = ("activation_batch", None, None, None)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """An NF-ResNet: bottleneck stages of `depths` blocks with `widths` output channels."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    bottleneck_ratio: float = 0.25
    alpha: float = 0.2
    skip_gain_init: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if len(self.depths) != len(self.widths) or not self.depths:
            raise ValueError(f"vision config {self.name!r}: depths {self.depths} and widths {self.widths} "
                             "must be non-empty and of equal length")

    @property
    def num_features(self) -> int:
        return self.widths[-1]

    def replace(self, **changes) -> "VisionConfig":
        return dataclasses.replace(self, **changes)


VISION_CONFIGS = {
    # The paper's encoder (He et al. depths, Brock et al. normalizer-free blocks), 2048 pooled features.
    "nf_resnet50": VisionConfig("nf_resnet50", depths=(3, 4, 6, 3), widths=(256, 512, 1024, 2048)),
    # CPU-sized: 64 px images, four stages down to 4x4.
    "nf_resnet_small": VisionConfig("nf_resnet_small", depths=(1, 1, 1, 1), widths=(64, 128, 256, 512),
                                    stem_width=32, stem_kernel=3, stem_stride=2, stem_pool=False),
    # Test-sized.
    "nf_resnet_tiny": VisionConfig("nf_resnet_tiny", depths=(1, 1), widths=(16, 32), stem_width=8,
                                   stem_kernel=3, stem_stride=2, stem_pool=False),
}


def vision_config(name: str, **overrides) -> VisionConfig:
    if name not in VISION_CONFIGS:
        raise ValueError(f"unknown vision encoder {name!r}; available: {', '.join(VISION_CONFIGS)}")
    return VISION_CONFIGS[name].replace(**overrides)


def gamma_relu(x):
    return jax.nn.relu(x) * RELU_GAMMA


class WSConv(nn.Module):
    """Conv with scaled weight standardisation: each output filter has zero mean and variance 1/fan_in,
    times a learnable per-channel gain, plus a bias."""

    features: int
    kernel: int
    stride: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    eps: float = 1e-4

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                       shape, self.param_dtype)
        gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
                          (self.features,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (self.features,), self.param_dtype)
        fan_in = shape[0] * shape[1] * shape[2]
        w = w.astype(jnp.float32)
        mean = w.mean(axis=(0, 1, 2), keepdims=True)
        var = w.var(axis=(0, 1, 2), keepdims=True)
        w = (w - mean) * jax.lax.rsqrt(var * fan_in + self.eps) * gain.astype(jnp.float32)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class NFBlock(nn.Module):
    """Pre-activation bottleneck block: x + alpha * skip_gain * f(act(x) * beta)."""

    config: VisionConfig
    features: int
    stride: int
    beta: float

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        conv = lambda feats, k, s, name: WSConv(feats, k, s, cfg.dtype, cfg.param_dtype, name=name)  # noqa: E731
        out = gamma_relu(x) * self.beta
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.stride, "shortcut")(out)
        mid = max(1, int(self.features * cfg.bottleneck_ratio))
        out = gamma_relu(conv(mid, 1, 1, "conv1")(out))
        out = gamma_relu(conv(mid, 3, self.stride, "conv2")(out))
        out = conv(self.features, 1, 1, "conv3")(out)
        skip_gain = self.param("skip_gain", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.skip_gain_init), ()), (), cfg.param_dtype)
        out = out * (skip_gain.astype(out.dtype) * cfg.alpha)
        return nn.with_logical_constraint(out + shortcut, IMAGE_AXES)


class NFResNet(nn.Module):
    """Images [N, H, W, 3] -> mean-pooled features [N, config.num_features]."""

    config: VisionConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = nn.with_logical_constraint(images.astype(cfg.dtype), IMAGE_AXES)
        x = WSConv(cfg.stem_width, cfg.stem_kernel, cfg.stem_stride, cfg.dtype, cfg.param_dtype, name="stem")(x)
        if cfg.stem_pool:
            x = nn.max_pool(x, (3, 3), (2, 2), "SAME")
        expected_var = 1.0
        for stage, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            for index in range(depth):
                stride = 2 if index == 0 and stage > 0 else 1
                x = NFBlock(cfg, width, stride, beta=1.0 / math.sqrt(expected_var),
                            name=f"stage{stage}_block{index}")(x)
                # A transition block's shortcut re-normalises the signal; others add alpha^2 of variance.
                expected_var = 1.0 + cfg.alpha ** 2 if index == 0 else expected_var + cfg.alpha ** 2
        return gamma_relu(x).astype(jnp.float32).mean(axis=(1, 2))
