"""A real byte-level tokenizer built offline, for tests and examples that need no downloaded LM."""

from __future__ import annotations

from frozenlm_jax.data.tokenizer import Tokenizer, byte_level_bpe

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
