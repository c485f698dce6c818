"""From named checkpoint tensors (HF naming) to a `DecoderLM` parameter tree, one tensor at a time.

Each architecture has an explicit table: our parameter path -> (HF tensor name, the tensor's expected
shape, the transform into our layout). Every tensor is checked before any is loaded, then each is read,
transformed and placed on its target sharding before the next is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from frozenlm_jax.models.lm import LMConfig, abstract_lm_params
from frozenlm_jax.parallel import DEFAULT_RULES, logical_shardings


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: the message says what is wrong and how to fix it."""


class TensorSource(Protocol):
    """Named tensors in HF layout, read lazily."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


# Buffers some checkpoints carry that are not parameters.
IGNORED_TENSORS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")

Entry = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    return w if w.shape[0] == rows else np.concatenate([w, np.zeros((rows - w.shape[0],) + w.shape[1:], w.dtype)])


def _llama_table(c: LMConfig) -> dict[str, Entry]:
    d, h, k, hd, f, v, vp = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                             c.vocab_size, c.padded_vocab_size)
    layer = "model.layers.{i}."
    same = lambda w: w  # noqa: E731
    return {
        "embed/embedding": ("model.embed_tokens.weight", (v, d), lambda w: _pad_rows(w, vp)),
        "final_norm/scale": ("model.norm.weight", (d,), same),
        "lm_head/kernel": ("lm_head.weight", (v, d), lambda w: _pad_rows(w, vp).T),
        "layers_{i}/attn_norm/scale": (layer + "input_layernorm.weight", (d,), same),
        "layers_{i}/mlp_norm/scale": (layer + "post_attention_layernorm.weight", (d,), same),
        "layers_{i}/attn/q_proj/kernel": (layer + "self_attn.q_proj.weight", (h * hd, d),
                                          lambda w: w.T.reshape(d, h, hd)),
        "layers_{i}/attn/k_proj/kernel": (layer + "self_attn.k_proj.weight", (k * hd, d),
                                          lambda w: w.T.reshape(d, k, hd)),
        "layers_{i}/attn/v_proj/kernel": (layer + "self_attn.v_proj.weight", (k * hd, d),
                                          lambda w: w.T.reshape(d, k, hd)),
        "layers_{i}/attn/o_proj/kernel": (layer + "self_attn.o_proj.weight", (d, h * hd),
                                          lambda w: w.T.reshape(h, hd, d)),
        "layers_{i}/attn/q_proj/bias": (layer + "self_attn.q_proj.bias", (h * hd,), lambda w: w.reshape(h, hd)),
        "layers_{i}/attn/k_proj/bias": (layer + "self_attn.k_proj.bias", (k * hd,), lambda w: w.reshape(k, hd)),
        "layers_{i}/attn/v_proj/bias": (layer + "self_attn.v_proj.bias", (k * hd,), lambda w: w.reshape(k, hd)),
        "layers_{i}/attn/o_proj/bias": (layer + "self_attn.o_proj.bias", (d,), same),
        "layers_{i}/attn/q_norm/scale": (layer + "self_attn.q_norm.weight", (hd,), same),
        "layers_{i}/attn/k_norm/scale": (layer + "self_attn.k_norm.weight", (hd,), same),
        "layers_{i}/mlp/gate_proj/kernel": (layer + "mlp.gate_proj.weight", (f, d), lambda w: w.T),
        "layers_{i}/mlp/up_proj/kernel": (layer + "mlp.up_proj.weight", (f, d), lambda w: w.T),
        "layers_{i}/mlp/down_proj/kernel": (layer + "mlp.down_proj.weight", (d, f), lambda w: w.T),
        "layers_{i}/mlp/gate_proj/bias": (layer + "mlp.gate_proj.bias", (f,), same),
        "layers_{i}/mlp/up_proj/bias": (layer + "mlp.up_proj.bias", (f,), same),
        "layers_{i}/mlp/down_proj/bias": (layer + "mlp.down_proj.bias", (d,), same),
    }


def _gpt2_table(c: LMConfig) -> dict[str, Entry]:
    """GPT-2 stores Conv1D weights as [in, out], so they need no transpose; c_attn holds q, k and v."""
    d, h, hd, f, v, vp = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, c.vocab_size, c.padded_vocab_size
    layer = "transformer.h.{i}."
    same = lambda w: w  # noqa: E731
    table = {
        "embed/embedding": ("transformer.wte.weight", (v, d), lambda w: _pad_rows(w, vp)),
        "pos_embed/embedding": ("transformer.wpe.weight", (c.max_position_embeddings, d), same),
        "final_norm/scale": ("transformer.ln_f.weight", (d,), same),
        "final_norm/bias": ("transformer.ln_f.bias", (d,), same),
        "lm_head/kernel": ("lm_head.weight", (v, d), lambda w: _pad_rows(w, vp).T),
        "layers_{i}/attn_norm/scale": (layer + "ln_1.weight", (d,), same),
        "layers_{i}/attn_norm/bias": (layer + "ln_1.bias", (d,), same),
        "layers_{i}/mlp_norm/scale": (layer + "ln_2.weight", (d,), same),
        "layers_{i}/mlp_norm/bias": (layer + "ln_2.bias", (d,), same),
        "layers_{i}/attn/o_proj/kernel": (layer + "attn.c_proj.weight", (d, d), lambda w: w.reshape(h, hd, d)),
        "layers_{i}/attn/o_proj/bias": (layer + "attn.c_proj.bias", (d,), same),
        "layers_{i}/mlp/up_proj/kernel": (layer + "mlp.c_fc.weight", (d, f), same),
        "layers_{i}/mlp/up_proj/bias": (layer + "mlp.c_fc.bias", (f,), same),
        "layers_{i}/mlp/down_proj/kernel": (layer + "mlp.c_proj.weight", (f, d), same),
        "layers_{i}/mlp/down_proj/bias": (layer + "mlp.c_proj.bias", (d,), same),
    }
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        cols = slice(part * d, (part + 1) * d)
        table[f"layers_{{i}}/attn/{name}/kernel"] = (
            layer + "attn.c_attn.weight", (d, 3 * d), lambda w, cols=cols: w[:, cols].reshape(d, h, hd))
        table[f"layers_{{i}}/attn/{name}/bias"] = (
            layer + "attn.c_attn.bias", (3 * d,), lambda w, cols=cols: w[cols].reshape(h, hd))
    return table


TABLES = {"llama": _llama_table, "gpt2": _gpt2_table}


def _plan(config: LMConfig, flat_shapes: dict[str, tuple[int, ...]]):
    """For each parameter path, the list of (tensor name, expected shape, transform) to build it from."""
    table = TABLES[config.family](config)
    plan = {}
    for path in flat_shapes:
        if config.scan_layers and path.startswith("layers/"):
            key, layers = "layers_{i}/" + path[len("layers/"):], range(config.num_layers)
        elif match := re.fullmatch(r"layers_(\d+)/(.*)", path):
            key, layers = "layers_{i}/" + match.group(2), [int(match.group(1))]
        else:
            key, layers = path, [None]
        name, shape, transform = table[key]
        plan[path] = [(name.format(i=i), shape, transform) for i in layers]
    return plan


def check_source(config: LMConfig, source: TensorSource, plan) -> None:
    """Every needed tensor present with its expected shape, and no tensor left unused."""
    available = source.names()
    needed = {}
    for path, parts in plan.items():
        for name, shape, _ in parts:
            needed[name] = (path, shape)
    missing = sorted(set(needed) - available)
    if missing:
        path, shape = needed[missing[0]]
        raise CheckpointError(
            f"checkpoint has no tensor {missing[0]!r} (shape {shape}, for parameter {path!r}); "
            f"{len(missing)} missing in all. Does the checkpoint match its config ({config.family}, "
            f"{config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings})?")
    extra = sorted(n for n in available - set(needed) if not IGNORED_TENSORS.match(n)
                   and not (config.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise CheckpointError(
            f"checkpoint has {len(extra)} tensor(s) the model has no parameter for, e.g. {extra[:3]}; "
            "the checkpoint and its config disagree (a bias or an extra layer?)")
    for name, (path, shape) in needed.items():
        found = tuple(source.shape(name))
        if found != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {found}, expected {shape} for parameter {path!r} "
                f"(hidden_size={config.hidden_size}, num_heads={config.num_heads}, "
                f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size})")


def assemble_params(config: LMConfig, source: TensorSource, mesh=None, rules=DEFAULT_RULES, desc="loading LM"):
    """The DecoderLM param tree for `config`, read from `source`, each leaf placed on its sharding.

    With a mesh, shardings come from the params' logical axis names and `rules`; without, each leaf
    is an ordinary single-device array.
    """
    abstract = abstract_lm_params(config)
    shapes = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
    shardings = traverse_util.flatten_dict(logical_shardings(abstract, mesh, rules), sep="/") if mesh else {}
    plan = _plan(config, {p: s.shape for p, s in shapes.items()})
    check_source(config, source, plan)
    params = {}
    for path, parts in tqdm(plan.items(), desc=desc, unit="tensor", disable=None, leave=False):
        arrays = [transform(source.get(name)) for name, _, transform in parts]
        value = np.stack(arrays) if len(arrays) > 1 or path.startswith("layers/") else arrays[0]
        target = shapes[path]
        value = np.ascontiguousarray(value, dtype=target.dtype)
        if path in shardings:
            params[path] = jax.make_array_from_callback(value.shape, shardings[path], lambda idx, v=value: v[idx])
        else:
            params[path] = jnp.asarray(value)
        del arrays, value
    return traverse_util.unflatten_dict(params, sep="/")
