"""The PyTorch reference of the benchmarks: an NF-ResNet with a prefix projection (the shapes of
`frozenlm_jax.models.vision`'s "deepmind" style) and transformers' Llama loaded like ours. It imports torch:
import it only where the reference runs (the JAX children never import torch)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


class WSConv2d(nn.Module):
    """Scaled weight standardisation (zero mean, variance 1/fan_in per filter) x gain, plus bias; TF SAME."""

    def __init__(self, c_in, c_out, kernel, stride=1, eps=1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")
        self.gain = nn.Parameter(torch.ones(c_out))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.kernel, self.stride, self.eps = kernel, stride, eps
        self.fan_in = c_in * kernel * kernel

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var * self.fan_in + self.eps) * self.gain.view(-1, 1, 1, 1)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return F.conv2d(x, w, self.bias, self.stride, padding=(pads[2], pads[0]))
        return F.conv2d(F.pad(x, pads), w, self.bias, self.stride)


class NFBlock(nn.Module):
    def __init__(self, vision, c_in, features, stride, beta):
        super().__init__()
        mid = max(1, int(features * vision["bottleneck_ratio"]))
        self.shortcut = WSConv2d(c_in, features, 1, stride) if stride != 1 or c_in != features else None
        self.conv1 = WSConv2d(c_in, mid, 1)
        self.conv2 = WSConv2d(mid, mid, 3, stride)
        self.conv3 = WSConv2d(mid, features, 1)
        self.skip_gain = nn.Parameter(torch.tensor(float(vision["skip_gain_init"])))
        self.alpha, self.beta = vision["alpha"], beta

    def forward(self, x):
        out = F.relu(x) * (RELU_GAMMA * self.beta)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.conv1(out)) * RELU_GAMMA
        out = F.relu(self.conv2(out)) * RELU_GAMMA
        out = self.conv3(out)
        return out * (self.skip_gain * self.alpha) + shortcut


class NFResNet(nn.Module):
    """Images [N, 3, H, W] -> mean-pooled features [N, C]; the shapes of frozenlm_jax.models.vision."""

    def __init__(self, vision):
        super().__init__()
        self.stem = WSConv2d(3, vision["stem_width"], vision["stem_kernel"], vision["stem_stride"])
        self.stem_pool = vision["stem_pool"]
        blocks, channels, expected_var = [], vision["stem_width"], 1.0
        for stage, (depth, width) in enumerate(zip(vision["depths"], vision["widths"])):
            for index in range(depth):
                stride = 2 if index == 0 and stage > 0 else 1
                blocks.append(NFBlock(vision, channels, width, stride, 1.0 / math.sqrt(expected_var)))
                channels = width
                alpha2 = vision["alpha"] ** 2
                expected_var = 1.0 + alpha2 if index == 0 else expected_var + alpha2
        self.blocks = nn.Sequential(*blocks)

    def forward(self, images):
        x = self.stem(images)
        if self.stem_pool:
            # TF SAME 3x3/2 max pool: pad the bottom/right only (with -inf), as XLA does on even sizes.
            total = max((-(-x.shape[-1] // 2) - 1) * 2 + 3 - x.shape[-1], 0)
            x = F.max_pool2d(F.pad(x, [total // 2, total - total // 2] * 2, value=-math.inf), 3, 2)
        x = self.blocks(x)
        return (F.relu(x) * RELU_GAMMA).mean(dim=(2, 3))


class VisionPrefix(nn.Module):
    def __init__(self, vision, prefix, embed_dim):
        super().__init__()
        self.encoder = NFResNet(vision)
        self.prefix_proj = nn.Linear(vision["widths"][-1], prefix * embed_dim)
        self.prefix, self.embed_dim = prefix, embed_dim

    def forward(self, images):
        return self.prefix_proj(self.encoder(images)).view(images.shape[0], self.prefix, self.embed_dim)


def load_torch_lm(lm_source: str, lm: dict, dtype):
    import transformers

    if lm_source.startswith("random:"):
        config = transformers.LlamaConfig(
            vocab_size=lm["vocab_size"], hidden_size=lm["hidden_size"], intermediate_size=lm["intermediate_size"],
            num_hidden_layers=lm["num_layers"], num_attention_heads=lm["num_heads"],
            num_key_value_heads=lm["num_kv_heads"], head_dim=lm["head_dim"], rope_theta=lm.get("rope_theta", 1e4),
            tie_word_embeddings=lm.get("tie_word_embeddings", False))
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).to(dtype)
    path = Path(lm["gguf"])
    return transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
