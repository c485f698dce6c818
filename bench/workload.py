"""The benchmarks' workloads: random-weight LMs of published shapes, the LM and NF-ResNet shapes of a run, a
synthetic Frozen batch and the analytic FLOPs of one training step."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

# Random-weight LMs of published shapes (no download): name -> LMConfig fields.
LM_PRESETS = {
    "llama-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                     tie_word_embeddings=True),
    "llama-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, intermediate_size=11008),
    # SmolLM2-135M's shape (the default LM), for machines without its GGUF.
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-tiny": dict(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128),
}


def resolve_lm_config(lm: str) -> dict:
    """HF-style shape of the LM (from the preset, or from the GGUF's metadata without loading tensors)."""
    if lm.startswith("random:"):
        name = lm.split(":", 1)[1]
        if name not in LM_PRESETS:
            raise SystemExit(f"unknown LM preset {name!r}; available: {', '.join(LM_PRESETS)}")
        return dict(LM_PRESETS[name])
    from frozenlm_jax.weights import gguf as gguf_files
    from frozenlm_jax.weights.registry import NAMED_LMS, fetch_named

    path = fetch_named(lm) if lm in NAMED_LMS else Path(lm)
    config = gguf_files.config_from_gguf(gguf_files.open_gguf(path), path)
    fields = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "rope_theta", "tie_word_embeddings", "norm_eps")
    return {f: getattr(config, f) for f in fields} | {"gguf": str(path)}


def vision_shapes(name: str) -> dict:
    from frozenlm_jax.models.vision import encoder_config

    return dataclasses.asdict(encoder_config(name))


def conv_layers(vision: dict, image_size: int):
    """(kernel, stride, c_in, c_out, out_size) of every convolution of the NF-ResNet, in order."""
    layers = []
    size = math.ceil(image_size / vision["stem_stride"])
    layers.append((vision["stem_kernel"], vision["stem_stride"], 3, vision["stem_width"], size))
    if vision["stem_pool"]:
        size = math.ceil(size / 2)
    channels = vision["stem_width"]
    for stage, (depth, width) in enumerate(zip(vision["depths"], vision["widths"])):
        for index in range(depth):
            stride = 2 if index == 0 and stage > 0 else 1
            out = math.ceil(size / stride)
            mid = max(1, int(width * vision["bottleneck_ratio"]))
            if stride != 1 or channels != width:
                layers.append((1, stride, channels, width, out))
            layers += [(1, 1, channels, mid, size), (3, stride, mid, mid, out), (1, 1, mid, width, out)]
            channels, size = width, out
    return layers


def analytic_step_flops(lm: dict, vision: dict, batch: int, image_size: int, prefix: int, caption_len: int,
                        padded_vocab: int | None = None) -> dict:
    """Matmul/convolution FLOPs of one Frozen step (2 per multiply-add; elementwise work not counted).

    vision: forward, and backward = gradients w.r.t. weights and inputs (none w.r.t. the image);
    prefix projection: forward + both gradients; LM: forward, and the activation-only backward (no weight
    gradients: 1x forward for every linear layer, 2x for attention's two activation-activation products),
    over all positions but the last (which predicts nothing; the reference computes it too, ours does not);
    LM head: only at the `caption_len` target positions, forward + input gradient.
    """
    convs = conv_layers(vision, image_size)
    conv = [2 * batch * out * out * k * k * cin * cout for k, _, cin, cout, out in convs]
    vision_fwd = sum(conv)
    vision_bwd = 2 * vision_fwd - conv[0]
    d, t = lm["hidden_size"], prefix + caption_len - 1
    q, kv = lm["num_heads"] * lm["head_dim"], lm["num_kv_heads"] * lm["head_dim"]
    linear_per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * lm["intermediate_size"])
    attention_per_seq = 4 * t * t * q  # QK^T and PV over the full T x T (masked, not skipped)
    lm_layers_fwd = lm["num_layers"] * (batch * t * linear_per_token + batch * attention_per_seq)
    lm_layers_bwd = lm["num_layers"] * (batch * t * linear_per_token + 2 * batch * attention_per_seq)
    vocab = padded_vocab or -(-lm["vocab_size"] // 128) * 128
    head = 2 * batch * caption_len * d * vocab
    proj = 2 * batch * vision["widths"][-1] * prefix * d
    parts = {"vision_fwd": vision_fwd, "vision_bwd": vision_bwd, "prefix_proj": 3 * proj,
             "lm_fwd": lm_layers_fwd + head, "lm_bwd_activations": lm_layers_bwd + head}
    parts["total"] = sum(parts.values())
    return parts


def make_batch(batch_size: int, image_size: int, prefix: int, caption_len: int, vocab_size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    length = prefix + caption_len
    captions = rng.integers(0, vocab_size, (batch_size, caption_len)).astype(np.int32)
    tokens = np.concatenate([np.zeros((batch_size, prefix), np.int32), captions], axis=1)
    return dict(tokens=tokens,
                images=rng.uniform(0, 1, (batch_size, 1, image_size, image_size, 3)).astype(np.float32),
                image_mask=np.ones((batch_size, 1), bool), image_positions=np.zeros((batch_size, 1), np.int32),
                loss_mask=np.arange(length)[None].repeat(batch_size, 0) >= prefix)
