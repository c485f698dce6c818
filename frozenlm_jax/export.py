"""Self-contained exported Frozen models: `load_frozen(path)` opens one for evaluation or another project.

A directory holds `frozen.json` (architecture, LM reference and fingerprint, special token ids),
`vision.safetensors`, `tokenizer.json`, and `lm.safetensors` when the LM's weights are included (always
for a trained LM; optional for a frozen one, which is otherwise re-loaded from its recorded source).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tokenizers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from frozenlm_jax.data.tokenizer import Tokenizer
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import LMConfig, RopeScaling
from frozenlm_jax.models.vision import VisionConfig

FORMAT_VERSION = 1


@dataclasses.dataclass
class LoadedFrozen:
    """An exported Frozen model: module, params (`vision` and `lm`), tokenizer and its input image size."""

    model: Frozen
    params: Any
    tokenizer: Tokenizer
    image_size: int


def _flat_numpy(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def save_exported(path, model: Frozen, params, tokenizer: Tokenizer, lm_source: str, lm_fingerprint: str,
                  image_size: int, include_lm_weights: bool) -> Path:
    """Write `params` (`vision` and `lm`) of `model` to directory `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_flat_numpy(params["vision"]), str(path / "vision.safetensors"))
    if include_lm_weights:
        save_file(_flat_numpy(params["lm"]), str(path / "lm.safetensors"))
    (path / "tokenizer.json").write_text(tokenizer.backend.to_str())
    meta = {
        "format_version": FORMAT_VERSION,
        "lm": {"source": lm_source, "fingerprint": lm_fingerprint, "config": dataclasses.asdict(model.lm_config),
               "weights": "lm.safetensors" if include_lm_weights else None},
        "vision": dataclasses.asdict(model.vision_config),
        "num_prefix_tokens": model.num_prefix_tokens, "variant": model.variant,
        "prefix_init_std": model.prefix_init_std, "image_size": image_size,
        "tokenizer": {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
    }
    (path / "frozen.json").write_text(json.dumps(meta, indent=1))
    return path


def load_frozen(path) -> LoadedFrozen:
    """Open a model written by `python -m frozenlm_jax.train ... --export=PATH`."""
    path = Path(path)
    if not (path / "frozen.json").exists():
        raise FileNotFoundError(f"{path} has no frozen.json; export a run with "
                                "`python -m frozenlm_jax.train --config=... --workdir=RUN --export=PATH`")
    meta = json.loads((path / "frozen.json").read_text())
    lm_fields = dict(meta["lm"]["config"])
    if lm_fields.get("rope_scaling"):
        lm_fields["rope_scaling"] = RopeScaling(**lm_fields["rope_scaling"])
    lm_config = LMConfig(**lm_fields)
    vision_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["vision"].items()}
    model = Frozen(lm_config, VisionConfig(**vision_fields), meta["num_prefix_tokens"], meta["variant"],
                   meta["prefix_init_std"])
    vision = traverse_util.unflatten_dict(load_file(str(path / "vision.safetensors")), sep="/")
    if meta["lm"]["weights"]:
        lm_params = traverse_util.unflatten_dict(load_file(str(path / meta["lm"]["weights"])), sep="/")
    else:
        lm_params = _reload_lm(meta["lm"], lm_config)
    special = meta["tokenizer"]
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str((path / "tokenizer.json").read_text()),
                          special["bos_id"], special["eos_id"], special["pad_id"])
    return LoadedFrozen(model, {"vision": vision, "lm": lm_params}, tokenizer, meta["image_size"])


def _reload_lm(reference: dict, lm_config: LMConfig):
    """The frozen LM from its recorded source, checked against the recorded fingerprint."""
    from frozenlm_jax.checkpoints import load_lm
    from frozenlm_jax.train.checkpointing import fingerprint

    overrides = {k: getattr(lm_config, k) for k in ("scan_layers", "remat")}
    lm = load_lm(reference["source"], dtype=lm_config.param_dtype, **overrides)
    found = fingerprint({"lm": lm.params}, reference["source"])
    if found != reference["fingerprint"]:
        raise ValueError(f"the LM at {reference['source']!r} is not the one this model was trained with "
                         f"(fingerprint {found}, expected {reference['fingerprint']}); export with --export_lm_weights")
    return lm.params
