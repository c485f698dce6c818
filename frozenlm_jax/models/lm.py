"""A decoder-only transformer in linen covering the Llama (llama, mistral, qwen2, qwen3) and GPT-2 families.

`DecoderLM(config).apply({"params": p}, input_ids)` gives float32 logits [B, T, padded_vocab]; the visual
prefix enters through `inputs_embeds`; `return_hidden=True` returns final hidden states so a caller
applies the head (`method=DecoderLM.logits`) only where it needs logits. A KV cache (`init_cache`)
supports prefill then one-token extension. Every parameter carries logical axis names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

FAMILIES = ("llama", "gpt2")
# "xla": attention as two einsums and a masked softmax, on every backend. "cudnn": cuDNN's fused (flash)
# attention through `jax.nn.dot_product_attention` where it can serve (a CUDA GPU, bfloat16/float16, head_dim a
# multiple of 8 up to 128, a causal mask with no padding and no KV cache: training and scoring), else "xla".
ATTENTION_IMPLS = ("xla", "cudnn")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Logical names of the hidden-state activations, mapped to mesh axes by the rules in `parallel.py`.
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")


def _ordered_dot(x, y, dimension_numbers, x_axes: list[int], y_axes: list[int], dtype):
    """`dot_general(x, y)` whose uncontracted axes of x and y are axes `x_axes` and `y_axes` of a gradient: the
    gradient in its own axis order, accumulated in float32, in `dtype`. One of the two operand orders usually
    leaves the result in order; otherwise the dot runs in float32 and is transposed (XLA:CPU folds a transpose
    into a bfloat16 x bfloat16 -> float32 dot and may then leave a dot its runtime cannot execute)."""
    (x_contract, y_contract), _ = dimension_numbers
    f32 = jnp.float32
    if x_axes + y_axes == sorted(x_axes + y_axes):
        return jax.lax.dot_general(x, y, dimension_numbers, preferred_element_type=f32).astype(dtype)
    if y_axes + x_axes == sorted(y_axes + x_axes):
        swapped = ((y_contract, x_contract), ((), ()))
        return jax.lax.dot_general(y, x, swapped, preferred_element_type=f32).astype(dtype)
    out = jax.lax.dot_general(x.astype(f32), y.astype(f32), dimension_numbers)
    return out.transpose(np.argsort(x_axes + y_axes)).astype(dtype)


def _contracted_and_free(contract, ndim: int) -> tuple[list[int], list[int]]:
    """An operand's contracted axes (non-negative, in the dimension numbers' order) and its free axes."""
    contract = [a % ndim for a in contract]
    return contract, [a for a in range(ndim) if a not in contract]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _f32_accumulating_dot(lhs, rhs, dimension_numbers, out_dtype):
    _, lhs_free = _contracted_and_free(dimension_numbers[0][0], lhs.ndim)
    if lhs_free and math.prod(lhs.shape[a] for a in lhs_free) == 1:
        # One row (decoding at batch 1): XLA:CPU sends a bfloat16 vector x matrix product to its Eigen fallback,
        # 12x slower than the matmul it runs for two rows (SmolLM2's head: 40 ms against 3.4 ms), so add a row.
        padded = jnp.concatenate([lhs, jnp.zeros_like(lhs)], axis=lhs_free[0])
        out = jax.lax.dot_general(padded, rhs, dimension_numbers, preferred_element_type=jnp.float32)
        return out[:1].astype(out_dtype)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32).astype(out_dtype)


def _f32_accumulating_dot_fwd(lhs, rhs, dimension_numbers, out_dtype):
    return _f32_accumulating_dot(lhs, rhs, dimension_numbers, out_dtype), (lhs, rhs)


def _f32_accumulating_dot_bwd(dimension_numbers, out_dtype, residuals, cotangent):
    lhs, rhs = residuals
    lhs_contract, lhs_free = _contracted_and_free(dimension_numbers[0][0], lhs.ndim)
    rhs_contract, rhs_free = _contracted_and_free(dimension_numbers[0][1], rhs.ndim)
    n = len(lhs_free)  # the cotangent's axes: lhs_free, then rhs_free
    cotangent = cotangent.astype(lhs.dtype)
    grad_lhs = _ordered_dot(
        cotangent, rhs, ((tuple(range(n, cotangent.ndim)), tuple(rhs_free)), ((), ())),
        lhs_free, [lhs_contract[rhs_contract.index(a)] for a in sorted(rhs_contract)], lhs.dtype)
    grad_rhs = _ordered_dot(
        lhs, cotangent, ((tuple(lhs_free), tuple(range(n))), ((), ())),
        [rhs_contract[lhs_contract.index(a)] for a in sorted(lhs_contract)], rhs_free, rhs.dtype)
    return grad_lhs, grad_rhs


_f32_accumulating_dot.defvjp(_f32_accumulating_dot_fwd, _f32_accumulating_dot_bwd)


def accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general` for low-precision operands that accumulates in float32 in the forward pass and in
    both transposes, returning `preferred_element_type` (default: the operands' dtype).

    XLA:CPU runs a bfloat16 dot at its bfloat16 speed only when the dot's result is float32; a bfloat16 result
    (what `nn.Dense(dtype=bfloat16)` asks for) and the mixed float32 x bfloat16 transposes that autodiff makes
    of a float32-result dot are upcast to float32 matmuls. GPUs and TPUs accumulate in float32 either way.
    Other operands (float32, mixed dtypes) and dots with batch dimensions go to `jax.lax.dot_general` unchanged.
    """
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
    low_precision = lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float16)
    if not low_precision or any(dimension_numbers[1]):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _f32_accumulating_dot(lhs, rhs, dimension_numbers, out_dtype)


def _chunk(chunks, index):
    """Rows [C, D] of vocabulary chunk `index` of `chunks` [C, n, D]. Sliced as bits when 16-bit: otherwise
    XLA:CPU hoists a float32 copy of the whole head out of the loop (`_on_bits`)."""
    return _on_bits(lambda c: jax.lax.dynamic_index_in_dim(c, index, axis=1, keepdims=False), chunks)


def _head_chunk(hidden, chunks, targets, index, vocab_size: int, carry, with_grad: bool):
    """One vocabulary chunk of `head_cross_entropy`: the online log-sum-exp (running max `m`, sum `s`), the
    target's logit `t` and, `with_grad`, the running softmax-weighted sum of head rows `j`."""
    size, count = chunks.shape[0], chunks.shape[1]
    rows = _chunk(chunks, index)  # vocab ids index + count * i
    logits = accumulating_dot_general(hidden, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = jnp.where(index + count * jnp.arange(size) < vocab_size, logits, -jnp.inf)
    m, s, t, j = carry
    m_new = jnp.maximum(m, logits.max(axis=-1))
    scale = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    s = s * scale + p.sum(axis=-1)
    hit = targets % count == index
    t = t + jnp.where(hit, jnp.take_along_axis(logits, (targets // count)[:, None], axis=1)[:, 0], 0.0)
    if with_grad:
        j = j * scale[:, None] + accumulating_dot_general(p.astype(rows.dtype), rows, (((1,), (0,)), ((), ())),
                                                          preferred_element_type=jnp.float32)
    return m_new, s, t, j


def _head_pass(hidden, weight, targets, vocab_size: int, num_chunks: int, with_grad: bool):
    chunks = weight.reshape(-1, num_chunks, weight.shape[-1])  # a reshape: chunk c holds ids c, c + n, ...
    n = hidden.shape[0]
    init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.zeros((n,)),
            jnp.zeros((n, hidden.shape[1]) if with_grad else (), jnp.float32))
    return jax.lax.fori_loop(0, num_chunks, lambda c, carry: _head_chunk(
        hidden, chunks, targets, c, vocab_size, carry, with_grad), init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_nll(hidden, weight, targets, vocab_size, num_chunks):
    m, s, t, _ = _head_pass(hidden, weight, targets, vocab_size, num_chunks, with_grad=False)
    return m + jnp.log(s) - t


def _head_nll_fwd(hidden, weight, targets, vocab_size, num_chunks):
    hidden, weight, targets, head_trains = hidden.value, weight.value, targets.value, weight.perturbed
    m, s, t, j = _head_pass(hidden, weight, targets, vocab_size, num_chunks, with_grad=not head_trains)
    lse = m + jnp.log(s)
    if head_trains:  # the backward pass recomputes the logits, for the head's gradient
        return lse - t, (None, (hidden, weight, targets, lse))
    # d nll_i / d hidden_i = softmax_i @ W - W[target_i]: computed here, so no logits are kept.
    grad = j / s[:, None] - jnp.take(weight, targets, axis=0).astype(jnp.float32)
    return lse - t, (grad.astype(hidden.dtype), None)


def _head_nll_bwd(vocab_size, num_chunks, residuals, cotangent):
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        cotangent = jnp.zeros(cotangent.shape, cotangent.dtype)
    grad, recompute = residuals
    if recompute is None:
        return (cotangent[:, None] * grad).astype(grad.dtype), None, None
    hidden, weight, targets, lse = recompute
    chunks = weight.reshape(-1, num_chunks, weight.shape[-1])
    size = chunks.shape[0]

    def chunk_grads(c, carry):
        grad_hidden, grad_chunks = carry
        rows = _chunk(chunks, c)
        ids = c + num_chunks * jnp.arange(size)
        logits = jax.lax.dot_general(hidden, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        probs = jnp.where(ids < vocab_size, jnp.exp(logits - lse[:, None]), 0.0)
        dlogits = cotangent[:, None] * (probs - (targets[:, None] == ids))
        grad_hidden = grad_hidden + jax.lax.dot_general(
            dlogits.astype(rows.dtype), rows, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        grad_rows = jax.lax.dot_general(dlogits.astype(hidden.dtype), hidden, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        return grad_hidden, jax.lax.dynamic_update_index_in_dim(grad_chunks, grad_rows[:, None], c, axis=1)

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(chunks.shape, jnp.float32))
    grad_hidden, grad_chunks = jax.lax.fori_loop(0, num_chunks, chunk_grads, init)
    return grad_hidden.astype(hidden.dtype), grad_chunks.reshape(weight.shape).astype(weight.dtype), None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd, symbolic_zeros=True)


def head_cross_entropy(hidden, weight, targets, vocab_size: int, chunk: int = 8192):
    """Next-token cross-entropy -log softmax(hidden @ weight.T)[target] [N] (float32) of hidden states [N, D]
    under an LM head `weight` [V, D] (the tied embedding, or the head kernel transposed), ids >= `vocab_size`
    (padding) excluded, without materialising the [N, V] logits.

    The vocabulary is taken in chunks of about `chunk` ids (id c + n * i in chunk c, so a vocabulary sharded
    over its ids stays sharded) with an online log-sum-exp. When `weight` is frozen, the forward pass also
    accumulates the gradient with respect to `hidden` (softmax @ weight - weight[target]; the same matmul the
    backward pass would make), so neither pass keeps logits; when it trains, the backward pass recomputes them.
    """
    num_chunks = 1
    while num_chunks < 128 and weight.shape[0] > chunk * num_chunks and weight.shape[0] % (2 * num_chunks) == 0:
        num_chunks *= 2
    return _head_nll(hidden, weight, targets, vocab_size, num_chunks)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (positions / factor) or `llama3` (Llama 3.1's banded scaling)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Architecture of a decoder-only LM. Hashable, so it can be a static argument of `jax.jit`."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    activation: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    attention_bias: bool = False  # biases on the q, k, v and o projections
    qkv_bias: bool = False  # biases on the q, k and v projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    vocab_pad_multiple: int = 128
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "xla"  # ATTENTION_IMPLS
    init_std: float = 0.02  # of random initialisation (pretrained weights replace it)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown LM family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; supported: {', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; supported: {', '.join(ATTENTION_IMPLS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling {self.rope_scaling.rope_type!r}; supported: linear, llama3"
            )

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    def replace(self, **changes) -> "LMConfig":
        return dataclasses.replace(self, **changes)


def _init(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Norm(nn.Module):
    """RMSNorm (llama) or LayerNorm (gpt2) over the last axis (a head's features for `qk_norm`), in float32."""

    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), pdt)
        h = x.astype(jnp.float32)
        if cfg.family == "gpt2":
            bias = self.param("bias", _zeros(("norm",)), (x.shape[-1],), pdt)
            h = h - h.mean(-1, keepdims=True)
            h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)
            return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.dtype)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)
        # Llama casts back before scaling; the same order keeps bfloat16 parity with transformers.
        return scale.astype(cfg.dtype) * h.astype(cfg.dtype)


def rope_inverse_frequencies(cfg: LMConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2], with linear or llama3 scaling applied."""
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv.astype(np.float32)
    if s.rope_type == "linear":
        return (inv / s.factor).astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: LMConfig, positions):
    """cos and sin [B, T, head_dim] for explicit positions [B, T] (rotate-half layout, as in HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, heads, head_dim] by the tables [B, T, head_dim]."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def _on_bits(fn, x, *others):
    """`fn(x, *others)` for a slice or an update; for 16-bit floats computed on their bits, because XLA:CPU
    computes a bfloat16 dynamic slice or update in float32, converting (copying) the whole operand."""
    if x.dtype.itemsize != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return fn(x, *others)
    as_bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)  # noqa: E731
    return jax.lax.bitcast_convert_type(fn(as_bits(x), *map(as_bits, others)), x.dtype)


def _write_in_place(buffer, update, start):
    """`dynamic_update_slice(buffer, update, start)` that stays in place for a 16-bit float buffer too (a
    16-bit cache is updated as its bits, `_on_bits`)."""
    return _on_bits(lambda b, u: jax.lax.dynamic_update_slice(b, u, start), buffer, update.astype(buffer.dtype))


def cudnn_can_serve(cfg: LMConfig, causal_only: bool, cached: bool) -> bool:
    """Whether `attention_impl="cudnn"` runs cuDNN's fused attention for this call (else the XLA path)."""
    return (cfg.attention_impl == "cudnn" and causal_only and not cached and jax.default_backend() == "gpu"
            and "cuda" in jax.extend.backend.get_backend().platform_version
            and cfg.dtype in ("bfloat16", "float16") and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)


def fused_causal_attention(q, k, v, sliding_window: int | None, implementation: str):
    """Causal attention of q [B, T, heads, head_dim] over k, v [B, T, kv_heads, head_dim] (grouped heads) by
    `jax.nn.dot_product_attention`; key t - w and later are seen by query t if `sliding_window` is w."""
    window = None if sliding_window is None else (sliding_window - 1, 0)
    t = q.shape[1]
    if t % 2:  # cuDNN's training kernels take even lengths; a key after every query is masked for all of them
        q, k, v = (jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                       implementation=implementation)
    return out[:, :t]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, never materialising repeated K/V."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, kv_cache, rope, mask, write_index):
        """kv_cache: None, or this layer's cache (k/v [B, kv_heads, S, head_dim]), updated in place.
        mask: bool [B, T, S] of the keys each query sees, or None for cuDNN's causal attention (`cudnn_can_serve`)."""
        cfg = self.config
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias or cfg.family == "gpt2"
        dense = lambda feats, axes, bias_axes, name: nn.DenseGeneral(  # noqa: E731
            feats, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
            dot_general=accumulating_dot_general, kernel_init=_init(cfg.init_std, axes), bias_init=_zeros(bias_axes))
        q = dense((h, hd), ("embed", "heads", "head_dim"), ("heads", "head_dim"), "q_proj")(x)
        k = dense((kvh, hd), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), "k_proj")(x)
        v = dense((kvh, hd), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"), "v_proj")(x)
        if cfg.qk_norm:
            q, k = Norm(cfg, name="q_norm")(q), Norm(cfg, name="k_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if mask is None:
            out = fused_causal_attention(q, k, v, cfg.sliding_window, "cudnn")
            return self._out_proj(out), kv_cache
        kv_layout = "bskd"
        if kv_cache is not None:
            # Head-major, the layout of the attention matmuls' operands (sequence-major, every decoding step
            # copied each layer's whole cache into it).
            kv_layout = "bksd"
            entries = {"k": k.swapaxes(1, 2), "v": v.swapaxes(1, 2)}
            kv_cache = {n: _write_in_place(kv_cache[n], entries[n], (0, 0, write_index, 0)) for n in entries}
            k, v = kv_cache["k"].astype(cfg.dtype), kv_cache["v"].astype(cfg.dtype)
        b, t = q.shape[:2]
        q = q.reshape(b, t, kvh, h // kvh, hd)
        scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        # Batch axes leading in the result too: asked for [b, t, k, g, d], XLA:CPU multiplied the cached values
        # as a transposed left operand, off YNNPACK (0.35 ms per layer and decoding step at batch 16).
        out = jnp.einsum(f"bkgts,{kv_layout}->bkgtd", probs, v).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
        return self._out_proj(out), kv_cache

    def _out_proj(self, out):
        cfg = self.config
        return nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=cfg.attention_bias or cfg.family == "gpt2", dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, dot_general=accumulating_dot_general,
            kernel_init=_init(cfg.init_std, ("heads", "head_dim", "embed")), bias_init=_zeros(("embed",)),
            name="o_proj")(out)


class MLP(nn.Module):
    """SwiGLU (llama) or a GELU MLP with biases (gpt2)."""

    config: LMConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        bias = cfg.mlp_bias or cfg.family == "gpt2"
        dense = lambda feats, axes, name: nn.Dense(  # noqa: E731
            feats, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
            dot_general=accumulating_dot_general, kernel_init=_init(cfg.init_std, axes), bias_init=_zeros(axes[-1:]))
        act = ACTIVATIONS[cfg.activation]
        if cfg.family == "gpt2":
            return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
                act(dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)))
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        # Recomputed in the backward pass from gate and up: only those two [B, T, mlp] activations are kept
        # (not also the activation's intermediates), which matters when the LM is frozen and its backward
        # needs no other MLP activation.
        gated = jax.checkpoint(lambda g, u: act(g) * u)(gate, up)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(gated)


class Block(nn.Module):
    """One pre-norm transformer layer. Returns (hidden, updated KV cache or None); see `Attention`."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, kv_cache, rope, mask, write_index):
        attn_out, new_cache = Attention(self.config, name="attn")(
            Norm(self.config, name="attn_norm")(x), kv_cache, rope, mask, write_index)
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(Norm(self.config, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, HIDDEN_AXES), new_cache


def init_cache(config: LMConfig, batch_size: int, max_length: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache for `batch_size` rows of up to `max_length` tokens.

    `k`/`v` hold each layer's [B, kv_heads, S, head_dim]: a tuple of per-layer arrays, so that each layer
    reads and updates its own buffer in place (a slice of a stacked cache is a copy), or one stacked
    [layers, B, ...] array with `scan_layers`. `mask` marks filled slots; `index` is the next slot to write
    (shared by all rows); `next_position` is each row's next position id.
    """
    shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    if config.scan_layers:
        empty = lambda: jnp.zeros((config.num_layers, *shape), dtype)  # noqa: E731
    else:
        empty = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))  # noqa: E731
    return {
        "k": empty(),
        "v": empty(),
        "mask": jnp.zeros((batch_size, max_length), bool),
        "index": jnp.zeros((), jnp.int32),
        "next_position": jnp.zeros((batch_size,), jnp.int32),
    }


class DecoderLM(nn.Module):
    """Decoder-only LM. Params: `embed`, [`pos_embed`], `layers_{i}` or scanned `layers`, `final_norm`,
    [`lm_head`]."""

    config: LMConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.padded_vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed")
        if cfg.family == "gpt2":
            self.pos_embed = nn.Embed(
                cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                embedding_init=_init(0.01, ("positions", "embed")), name="pos_embed")
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = Norm(cfg, name="final_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.padded_vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                dot_general=accumulating_dot_general, kernel_init=_init(cfg.init_std, ("embed", "vocab")),
                name="lm_head")

    def embed(self, input_ids):
        """Token embeddings [B, T, D] (where a visual prefix would be written)."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden):
        """Float32 logits over the padded vocabulary; padded rows are the float32 minimum."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            embedding = self.embed_tokens.embedding.astype(cfg.dtype)
            out = accumulating_dot_general(hidden.astype(cfg.dtype), embedding, (((hidden.ndim - 1,), (1,)), ((), ())))
        else:
            out = self.lm_head(hidden)
        out = out.astype(jnp.float32)
        if cfg.padded_vocab_size != cfg.vocab_size:
            out = jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, out, jnp.finfo(jnp.float32).min)
        return out

    def target_nll(self, hidden, targets):
        """Cross-entropy [...] (float32) of `targets` [...] under the head at `hidden` [..., D], without
        materialising logits (`head_cross_entropy`); the same values as `logits` followed by a log-softmax."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            weight = self.embed_tokens.embedding
        else:
            weight = self.lm_head.variables["params"]["kernel"].T
        nll = head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]).astype(cfg.dtype), weight.astype(cfg.dtype),
                                 targets.reshape(-1), cfg.vocab_size)
        return nll.reshape(targets.shape)

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, attention_mask=None,
                 cache=None, return_hidden=False):
        """Run the LM on `input_ids` [B, T] or `inputs_embeds` [B, T, D].

        attention_mask: bool [B, T], False for padding (default all True).
        positions: int [B, T] position ids (default: counted over the real tokens, continuing the cache).
        cache: from `init_cache`; then the tokens are written at `cache["index"]` and the result is
            `(output, new_cache)`.
        Returns float32 logits [B, T, padded_vocab], or final hidden states [B, T, D] if `return_hidden`.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        b, t = x.shape[:2]
        fused_attention = cudnn_can_serve(cfg, causal_only=attention_mask is None, cached=cache is not None)
        attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        start = jnp.zeros((b,), jnp.int32) if cache is None else cache["next_position"]
        if positions is None:
            positions = start[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1, 0)
        if cfg.family == "gpt2":
            x = x + self.pos_embed(jnp.clip(positions, 0, cfg.max_position_embeddings - 1))
        x = nn.with_logical_constraint(x, HIDDEN_AXES)

        write_index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        if cache is None:
            key_valid, kv = attention_mask, None
        else:
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask, write_index, 1)
            kv = {"k": cache["k"], "v": cache["v"]}
            if isinstance(kv["k"], tuple) == cfg.scan_layers:
                raise ValueError(f"this cache is for scan_layers={not cfg.scan_layers}, the model has "
                                 f"scan_layers={cfg.scan_layers}: make it with init_cache(the model's config, ...)")
        query_slot = write_index + jnp.arange(t)
        key_slot = jnp.arange(key_valid.shape[1])
        allowed = key_slot[None, :] <= query_slot[:, None]
        if cfg.sliding_window is not None:
            allowed &= query_slot[:, None] - key_slot[None, :] < cfg.sliding_window
        mask = None if fused_attention else key_valid[:, None, :] & allowed[None]  # None: cuDNN's causal mask
        rope = rope_tables(cfg, positions) if cfg.family == "llama" else None

        if cfg.scan_layers:
            x, new_kv = self.layers(x, kv, rope, mask, write_index)
        else:
            layer_caches = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(x, None if kv is None else {n: kv[n][i] for n in kv}, rope, mask, write_index)
                layer_caches.append(layer_cache)
            new_kv = None if kv is None else {n: tuple(c[n] for c in layer_caches) for n in kv}
        h = self.final_norm(x)
        out = h if return_hidden else self.logits(h)
        if cache is None:
            return out
        new_cache = dict(new_kv, mask=key_valid, index=write_index + t,
                         next_position=start + attention_mask.sum(axis=1, dtype=jnp.int32))
        return out, new_cache


def abstract_lm_params(config: LMConfig):
    """The boxed (logically partitioned) ShapeDtypeStruct tree of a DecoderLM's params."""
    model = DecoderLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
