"""Pretrained LMs loaded without torch: named LMs, GGUF files, HF directories and Hub ids.

    lm = load_lm("smollm2-135m")
    logits = lm.model.apply({"params": lm.params}, ids)   # float32 [B, T, padded_vocab]
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from frozenlm_jax.weights import gguf as gguf_files
from frozenlm_jax.weights import hf
from frozenlm_jax.weights.params import CheckpointError, assemble_params
from frozenlm_jax.weights.registry import NAMED_LMS, fetch_named
from frozenlm_jax.tokenizer import Tokenizer
from frozenlm_jax.models.lm import DecoderLM, LMConfig
from frozenlm_jax.parallel import DEFAULT_RULES

__all__ = ["CheckpointError", "LoadedLM", "load_lm", "NAMED_LMS"]


@dataclasses.dataclass
class LoadedLM:
    """A pretrained LM: the linen module, its params, its tokenizer (None if the source has none)."""

    model: DecoderLM
    params: Any
    tokenizer: Tokenizer | None
    config: LMConfig
    source: str


def is_hub_id(source: str) -> bool:
    """Whether `source` has the shape of an HF Hub id (`name` or `org/name`) rather than of a path."""
    return re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", source) is not None and not source.endswith(".gguf")


def load_lm(source: str, dtype: Any = "float32", mesh: Mesh | None = None, rules=DEFAULT_RULES,
            **config_overrides) -> LoadedLM:
    """Load a pretrained decoder-only LM.

    source: a named LM ("smollm2-135m"), a `.gguf` path, an HF model directory, or an HF Hub id.
    dtype: storage and compute dtype of the params ("bfloat16" halves a frozen LM's memory).
    mesh: if given, each tensor goes straight into the sharding its logical axis names and `rules` give.
    config_overrides: LMConfig fields to set, e.g. `scan_layers=True`, `remat="full"`.
    """
    dtype = jnp.dtype(dtype).name
    overrides = dict(dtype=dtype, param_dtype=dtype, **config_overrides)
    if source in NAMED_LMS:
        path = fetch_named(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if not is_hub_id(source):
                raise CheckpointError(
                    f"no such file or directory: {source!r}; pass a named LM ({', '.join(NAMED_LMS)}), "
                    "a .gguf file, an HF model directory or an HF Hub id")
            path = hf.fetch_from_hub(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file or an HF model directory")
        reader = gguf_files.open_gguf(path)
        config = gguf_files.config_from_gguf(reader, path, **overrides)
        tokenizer = gguf_files.tokenizer_from_gguf(reader, path)
        params = assemble_params(config, gguf_files.GGUFSource(reader, config, path), mesh, rules,
                                 desc=f"loading {path.name}")
    else:
        raw = hf.read_hf_config(path)
        config = hf.config_from_hf(raw, **overrides)
        tokenizer = hf.tokenizer_from_hf_dir(path, raw)
        params = assemble_params(config, hf.SafetensorsSource(path, config.family), mesh, rules,
                                 desc=f"loading {path.name}")
    return LoadedLM(DecoderLM(config), params, tokenizer, config, str(source))

