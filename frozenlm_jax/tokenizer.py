"""The text tokenizer every part of the project uses: a thin wrapper over `tokenizers`, and a byte-level
tokenizer built offline (for random LMs, tests and examples that need no downloaded LM).

Special tokens follow the LM's own metadata: `encode` adds BOS only when the tokenizer's post-processor
does (SmolLM2 adds none, Llama-2 adds one); `eos_id` ends captions; `pad_id` may equal `eos_id`.
"""

from __future__ import annotations

import dataclasses

import tokenizers


@dataclasses.dataclass
class Tokenizer:
    """`encode(str) -> list[int]`, `decode(list[int]) -> str` and the special ids of an LM."""

    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


# How text is split into words before byte-level BPE, by GGUF `tokenizer.ggml.pre`; any other value: GPT-2's split.
# Qwen2 / Qwen2.5 / Qwen3 (llama.cpp's "qwen2"): digits one by one, after NFC normalisation, as in their tokenizer.json.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}


def byte_level_bpe(tokens: list[str], merges: list[str], special_tokens: list[str], added_tokens=(),
                   pre: str = "default") -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer from a vocabulary and merges (as stored in GGUF files).

    `special_tokens` (`<|im_end|>`) and `added_tokens` (not special: `<think>`) are matched whole in the text and
    stay one id, as transformers does; `pre` names the word split (`PRE_TOKENIZER_SPLITS`).
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    if pre in PRE_TOKENIZER_SPLITS:
        backend.normalizer = tokenizers.normalizers.NFC()
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    if special_tokens:
        backend.add_special_tokens(
            [tokenizers.AddedToken(t, normalized=False, special=True) for t in special_tokens]
        )
    if added_tokens:
        backend.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in added_tokens])
    return backend


END_OF_TEXT = "<|endoftext|>"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the alphabet of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> Tokenizer:
    """One id per byte (0..255) plus `<|endoftext|>` = 256 as EOS and pad; no BOS, like SmolLM2/GPT-2."""
    backend = byte_level_bpe(byte_symbols() + [END_OF_TEXT], [], [END_OF_TEXT])
    eos = backend.token_to_id(END_OF_TEXT)
    return Tokenizer(backend, bos_id=None, eos_id=eos, pad_id=eos)
