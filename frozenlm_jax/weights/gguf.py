"""GGUF files (llama.cpp): config, dequantised tensors renamed to HF names, and the tokenizer.

For `llama` llama.cpp stores the Q and K projection rows permuted for its interleaved RoPE; `GGUFSource`
undoes that so the tensors match HF's rotate-half layout. `qwen2` and `qwen3` use NEOX (rotate-half) RoPE,
so their rows are stored as HF has them.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import tokenizers

from frozenlm_jax.weights.params import CheckpointError
from frozenlm_jax.tokenizer import Tokenizer, byte_level_bpe
from frozenlm_jax.models.lm import LMConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4  # tokenizer.ggml.token_type: special, added (`<think>`)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct/index errors on bad bytes
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return "gguf:" + name  # unknown to the table, so reported as an unexpected tensor


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (per head: interleaved pairs -> two halves)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """The GGUF's tensors under HF llama names, dequantised to float32 one at a time."""

    def __init__(self, reader: gguf.GGUFReader, config: LMConfig, path: Path):
        self._path, self._config = path, config
        self._permuted = _field(reader, "general.architecture") == "llama"
        self._tensors = {_hf_name(t.name): t for t in reader.tensors}
        for t in reader.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} is {t.tensor_type.name}; supported tensor types: "
                    f"{', '.join(SUPPORTED_TYPES)}")

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(self.shape(name))
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{self._path}: tensor {t.name!r} cannot be decoded ({e}); corrupt file?") from e
        if not self._permuted:
            return w
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, self._config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, self._config.num_kv_heads)
        return w


def config_from_gguf(reader: gguf.GGUFReader, path: Path, **overrides) -> LMConfig:
    """An LMConfig from the file's `<architecture>.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 GGUFs) are not "
                              "supported; load the model's HF directory instead")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    scaling = None
    if get("rope.scaling.type", "none") == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif get("rope.scaling.type", "none") not in ("none", None):
        raise CheckpointError(f"{path}: unsupported rope scaling {get('rope.scaling.type')!r}; supported: linear")
    fields = dict(
        family="llama", vocab_size=int(vocab), hidden_size=hidden, num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length", 2048)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", tie_word_embeddings="output.weight" not in names)
    return LMConfig(**{**fields, **overrides})


def tokenizer_from_gguf(reader: gguf.GGUFReader, path: Path) -> Tokenizer:
    """A byte-level BPE tokenizer from the file's vocabulary, merges and special-token metadata."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer type {model!r} cannot be built from GGUF metadata here (supported: gpt2, "
            "byte-level BPE); load the model's HF directory, which has a tokenizer.json")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [0] * len(tokens)
    alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    special = [t for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN and set(t) <= alphabet]
    added = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED_TOKEN]
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    backend = byte_level_bpe(tokens, _field(reader, "tokenizer.ggml.merges"), special, added, pre=pre)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    pad = _field(reader, "tokenizer.ggml.padding_token_id", eos)
    return Tokenizer(backend, bos_id=bos, eos_id=eos, pad_id=pad)
