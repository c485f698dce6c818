"""Vision encoders by name: normalizer-free ResNets (Brock et al., 2021), ViTs (`models/vit.py`) and a
batch-normalised VGG-style CNN (`models/convnet.py`).

`NFResNet(config)(images)` maps float images [N, H, W, 3] to pooled features [N, C]: scaled weight
standardisation, scalar skip gains, no BatchNorm. `ENCODER_CONFIGS` is the registry of every encoder
(the paper's NF-ResNet-50, a timm-compatible one, ViTs and smaller configs for CPU work);
`encoder_config(name)` picks one and `build_encoder(config)` makes its module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from frozenlm_jax.models.convnet import CONV_AXES, CONVNET_CONFIGS, IMAGE_AXES, POOLS, ConvNet, ConvNetConfig, pool
from frozenlm_jax.models.vit import VIT_CONFIGS, ViT, ViTConfig

# ReLU scaled so a unit-Gaussian input keeps unit variance: sqrt(2 / (1 - 1/pi)).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
TIMM_RELU_GAMMA = 1.7139588594436646  # timm's (and DeepMind's nfnets') sampled estimate of the same constant
STYLES = ("deepmind", "timm")


@dataclasses.dataclass(frozen=True)
class NFResNetConfig:
    """An NF-ResNet: bottleneck stages of `depths` blocks with `widths` output channels.

    style "deepmind" follows DeepMind's nfnets code: SAME padding, the ReLU gain in the activations, strided
    1x1 transition shortcuts, a learnable scalar `skip_gain` per block, eps on variance * fan_in. "timm"
    follows timm's NormFreeNet (so its weights import one-to-one): PyTorch's symmetric padding, the ReLU
    gain folded into every conv (the stem's too) and a plain final ReLU, 2x2 average-pool + 1x1 conv
    shortcuts, no skip-gain scalar (each block's last conv gain starts at `skip_gain_init` instead), eps
    1e-5 on the weights' variance, and a stride-2 first stage when the stem downsamples only 2x. Its
    pooled shortcuts lower the signal's variance about 3x per transition at init: it is for timm's weights.
    """

    family: ClassVar[str] = "nf_resnet"

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
    style: str = "deepmind"  # deepmind | timm
    pool: str = "mean"  # mean | max: how the last feature map becomes one vector
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if len(self.depths) != len(self.widths) or not self.depths:
            raise ValueError(f"vision config {self.name!r}: depths {self.depths} and widths {self.widths} "
                             "must be non-empty and of equal length")
        if self.style not in STYLES:
            raise ValueError(f"vision config {self.name!r}: unknown style {self.style!r}; supported: "
                             f"{', '.join(STYLES)}")
        if self.pool not in POOLS:
            raise ValueError(f"vision config {self.name!r}: unknown pool {self.pool!r}; supported: "
                             f"{', '.join(POOLS)}")

    @property
    def num_features(self) -> int:
        return self.widths[-1]

    def replace(self, **changes) -> "NFResNetConfig":
        return dataclasses.replace(self, **changes)


NF_RESNET_CONFIGS = {
    # The paper's encoder (He et al. depths, Brock et al. normalizer-free blocks), 2048 pooled features.
    "nf_resnet50": NFResNetConfig("nf_resnet50", depths=(3, 4, 6, 3), widths=(256, 512, 1024, 2048)),
    # The same network as timm's nf_resnet50, whose weights `vision.init` imports.
    "nf_resnet50_timm": NFResNetConfig("nf_resnet50_timm", depths=(3, 4, 6, 3), widths=(256, 512, 1024, 2048),
                                     style="timm"),
    # CPU-sized: 64 px images, four stages down to 4x4.
    "nf_resnet_small": NFResNetConfig("nf_resnet_small", depths=(1, 1, 1, 1), widths=(64, 128, 256, 512),
                                    stem_width=32, stem_kernel=3, stem_stride=2, stem_pool=False),
    # Test-sized.
    "nf_resnet_tiny": NFResNetConfig("nf_resnet_tiny", depths=(1, 1), widths=(16, 32), stem_width=8,
                                   stem_kernel=3, stem_stride=2, stem_pool=False),
}

EncoderConfig = NFResNetConfig | ViTConfig | ConvNetConfig
ENCODER_CONFIGS: dict[str, EncoderConfig] = {**NF_RESNET_CONFIGS, **VIT_CONFIGS, **CONVNET_CONFIGS}


def encoder_config(name: str, **overrides) -> EncoderConfig:
    """The registered encoder config `name`, with `overrides` of its fields."""
    if name not in ENCODER_CONFIGS:
        raise ValueError(f"unknown vision encoder {name!r}; available: {', '.join(ENCODER_CONFIGS)}")
    config = ENCODER_CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"vision encoder {name!r} ({config.family}) has no field(s) {', '.join(unknown)}; "
                         f"its fields: {', '.join(sorted(fields))}")
    return config.replace(**overrides)


def build_encoder(config: EncoderConfig, **module_kwargs) -> nn.Module:
    """The encoder module of `config`: images [N, H, W, 3] -> features [N, C] (or tokens [N, L, C])."""
    family = getattr(config, "family", None)
    if family not in FAMILIES:
        raise TypeError(f"{type(config).__name__} is not a vision encoder config; use encoder_config(name) "
                        f"with one of {', '.join(ENCODER_CONFIGS)}")
    return FAMILIES[family][1](config, **module_kwargs)


def encoder_config_to_dict(config: EncoderConfig) -> dict:
    """A JSON-able dict of `config` with its `family`, which `encoder_config_from_dict` reads back."""
    return {"family": config.family, **dataclasses.asdict(config)}


def encoder_config_from_dict(fields: dict) -> EncoderConfig:
    """The config `encoder_config_to_dict` wrote (a dict without `family` is an NF-ResNet's, as older exports)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    family = fields.pop("family", "nf_resnet")
    if family not in FAMILIES:
        raise ValueError(f"unknown vision encoder family {family!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[family][0](**fields)


def gamma_relu(x):
    return jax.nn.relu(x) * RELU_GAMMA


def torch_padding(kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's (timm's `get_padding`) symmetric padding of a conv or pool window."""
    pad = (stride - 1 + kernel - 1) // 2
    return (pad, pad), (pad, pad)


class WSConv(nn.Module):
    """Conv with scaled weight standardisation: each output filter has zero mean and variance 1/fan_in,
    times a learnable per-channel gain, plus a bias (see `NFResNetConfig.style` for the two styles)."""

    features: int
    kernel: int
    stride: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    style: str = "deepmind"
    gain_init: float = 1.0

    @nn.compact
    def __call__(self, x):
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        w = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                       shape, self.param_dtype)
        gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.constant(self.gain_init),
                                                               ("conv_out",)), (self.features,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (self.features,), self.param_dtype)
        fan_in = shape[0] * shape[1] * shape[2]
        # Statistics over the [fan_in, features] view: XLA:CPU's gradient of these reductions over three axes
        # took twice as long (NF-ResNet-50's 53 kernels: 88 against 42 ms forward + backward).
        w = w.astype(jnp.float32).reshape(fan_in, self.features)
        mean = w.mean(axis=0)
        var = jnp.square(w - mean).mean(axis=0)
        if self.style == "timm":
            scale = jax.lax.rsqrt(var + 1e-5) * (TIMM_RELU_GAMMA / math.sqrt(fan_in))
            padding = torch_padding(self.kernel, self.stride)
        else:
            scale = jax.lax.rsqrt(var * fan_in + 1e-4)
            padding = "SAME"
        w = ((w - mean) * scale * gain.astype(jnp.float32)).reshape(shape)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w.astype(self.dtype), (self.stride, self.stride), padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class NFBlock(nn.Module):
    """Pre-activation bottleneck block: x + alpha * skip_gain * f(act(x) * beta)."""

    config: NFResNetConfig
    features: int
    stride: int
    beta: float

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        timm = cfg.style == "timm"
        conv = lambda feats, k, s, name, gain_init=1.0: WSConv(  # noqa: E731
            feats, k, s, cfg.dtype, cfg.param_dtype, cfg.style, gain_init, name=name)
        act = jax.nn.relu if timm else gamma_relu  # timm folds the gain into the convs
        out = act(x) * self.beta
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if timm:  # ResNet-D: average-pool (ceil mode, mean of the valid pixels), then a 1x1 conv
                pooled = out
                if self.stride > 1:
                    pad = ((0, out.shape[1] % 2), (0, out.shape[2] % 2))
                    pooled = nn.avg_pool(out, (2, 2), (2, 2), pad, count_include_pad=False)
                shortcut = conv(self.features, 1, 1, "shortcut")(pooled)
            else:
                shortcut = conv(self.features, 1, self.stride, "shortcut")(out)
        mid = max(1, int(self.features * cfg.bottleneck_ratio))
        out = act(conv(mid, 1, 1, "conv1")(out))
        out = act(conv(mid, 3, self.stride, "conv2")(out))
        if timm:
            out = conv(self.features, 1, 1, "conv3", cfg.skip_gain_init)(out) * cfg.alpha
        else:
            out = conv(self.features, 1, 1, "conv3")(out)
            skip_gain = self.param("skip_gain", nn.with_logical_partitioning(
                nn.initializers.constant(cfg.skip_gain_init), ()), (), cfg.param_dtype)
            out = out * (skip_gain.astype(out.dtype) * cfg.alpha)
        return nn.with_logical_constraint(out + shortcut, IMAGE_AXES)


class NFResNet(nn.Module):
    """Images [N, H, W, 3] -> pooled features [N, config.num_features] (mean-pooled as in the paper, or max)."""

    config: NFResNetConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        timm = cfg.style == "timm"
        x = nn.with_logical_constraint(images.astype(cfg.dtype), IMAGE_AXES)
        x = WSConv(cfg.stem_width, cfg.stem_kernel, cfg.stem_stride, cfg.dtype, cfg.param_dtype, cfg.style,
                   name="stem")(x)
        if cfg.stem_pool:
            x = nn.max_pool(x, (3, 3), (2, 2), torch_padding(3, 2) if timm else "SAME")
        # timm's first stage downsamples when the stem alone reduced the image only 2x.
        first_stride = 2 if timm and cfg.stem_stride * (2 if cfg.stem_pool else 1) <= 2 else 1
        expected_var = 1.0
        for stage, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            for index in range(depth):
                stride = 1 if index > 0 else (first_stride if stage == 0 else 2)
                x = NFBlock(cfg, width, stride, beta=1.0 / math.sqrt(expected_var),
                            name=f"stage{stage}_block{index}")(x)
                # A transition block's shortcut re-normalises the signal; others add alpha^2 of variance.
                expected_var = 1.0 + cfg.alpha ** 2 if index == 0 else expected_var + cfg.alpha ** 2
        act = jax.nn.relu if timm else gamma_relu
        return pool(act(x).astype(jnp.float32), cfg.pool)


FAMILIES = {"nf_resnet": (NFResNetConfig, NFResNet), "vit": (ViTConfig, ViT), "convnet": (ConvNetConfig, ConvNet)}
