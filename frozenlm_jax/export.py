"""Trained models as files: `save_exported` writes a self-contained model directory, `load_frozen(path)` opens
one, or a training workdir, as a `FrozenLM`.

An exported directory is self-contained (for evaluation or another project): `frozen.json` (architecture,
LM reference and fingerprint, special token ids), `vision.safetensors`, `tokenizer.json`, and
`lm.safetensors` when the LM's weights are included (always for a trained LM; optional for a frozen one,
which is otherwise re-loaded from its recorded source).
A training workdir holds `config.json` and orbax checkpoints; its LM is rebuilt from the config's source and
checked against the checkpoint's fingerprint.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import tokenizers
from flax import traverse_util
from etils import epath
from safetensors.numpy import load, load_file, save, save_file

from frozenlm_jax import paths
from frozenlm_jax.build import build_lm, build_model
from frozenlm_jax.checkpointing import Checkpointer, fingerprint
from frozenlm_jax.config import default_config
from frozenlm_jax.frozen_lm import FrozenLM
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import LMConfig, RopeScaling
from frozenlm_jax.models.vision import encoder_config_from_dict, encoder_config_to_dict
from frozenlm_jax.tokenizer import Tokenizer
from frozenlm_jax.trees import flatten, merge_params
from frozenlm_jax.weights import load_lm
from frozenlm_jax.weights.init import init_model_params

FORMAT_VERSION = 1


def _flat_numpy(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _save_safetensors(tensors: dict[str, np.ndarray], path: epath.Path) -> None:
    if paths.is_remote(path):
        path.write_bytes(save(tensors))
    else:
        save_file(tensors, str(path))


def _load_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    return load(path.read_bytes()) if paths.is_remote(path) else load_file(str(path))


def save_exported(path, model: Frozen, params, tokenizer: Tokenizer, lm_source: str, lm_fingerprint: str,
                  image_size: int, include_lm_weights: bool) -> epath.Path:
    """Write `params` (`vision` and `lm`) of `model` to directory `path` (local or gs://)."""
    path = paths.path(path)
    paths.preflight(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_safetensors(_flat_numpy(params["vision"]), path / "vision.safetensors")
    if include_lm_weights:
        _save_safetensors(_flat_numpy(params["lm"]), path / "lm.safetensors")
    (path / "tokenizer.json").write_text(tokenizer.backend.to_str())
    meta = {
        "format_version": FORMAT_VERSION,
        "lm": {"source": lm_source, "fingerprint": lm_fingerprint, "config": dataclasses.asdict(model.lm_config),
               "weights": "lm.safetensors" if include_lm_weights else None},
        "vision": encoder_config_to_dict(model.vision_config),
        "num_prefix_tokens": model.num_prefix_tokens, "variant": model.variant,
        "prefix_init_std": model.prefix_init_std, "image_size": image_size,
        "tokenizer": {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
    }
    (path / "frozen.json").write_text(json.dumps(meta, indent=1))
    return path


def load_frozen(path, step: int | str = "best") -> FrozenLM:
    """Open an exported model (written by `python -m frozenlm_jax.train ... --export=PATH`) or a training workdir,
    local or gs://.

    step (workdir only): "best" (the kept checkpoint with the lowest validation loss, else the latest),
    "latest", or a step number.
    """
    path = paths.path(path)
    paths.preflight(path)
    if (path / "frozen.json").exists():
        return _load_exported(path)
    if (path / "config.json").exists() and (path / "checkpoints").is_dir():
        return _load_workdir(path, step)
    raise FileNotFoundError(f"{path} is neither an exported model (no frozen.json) nor a training workdir (no "
                            "config.json and checkpoints/); pass a workdir of `python -m frozenlm_jax.train` or "
                            "the directory of its `--export=PATH`")


def _load_exported(path: epath.Path) -> FrozenLM:
    meta = json.loads((path / "frozen.json").read_text())
    lm_fields = dict(meta["lm"]["config"])
    if lm_fields.get("rope_scaling"):
        lm_fields["rope_scaling"] = RopeScaling(**lm_fields["rope_scaling"])
    lm_config = LMConfig(**lm_fields)
    model = Frozen(lm_config, encoder_config_from_dict(meta["vision"]), meta["num_prefix_tokens"], meta["variant"],
                   meta["prefix_init_std"])
    vision = traverse_util.unflatten_dict(_load_safetensors(path / "vision.safetensors"), sep="/")
    if meta["lm"]["weights"]:
        lm_params = traverse_util.unflatten_dict(_load_safetensors(path / meta["lm"]["weights"]), sep="/")
    else:
        lm_params = _reload_lm(meta["lm"], lm_config)
    special = meta["tokenizer"]
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str((path / "tokenizer.json").read_text()),
                          special["bos_id"], special["eos_id"], special["pad_id"])
    return FrozenLM(model, {"vision": vision, "lm": lm_params}, tokenizer, meta["image_size"])


def _load_workdir(path: epath.Path, step: int | str) -> FrozenLM:
    """The model of a training workdir: built from its saved config, the trained params restored from its
    checkpoint, the frozen ones loaded (or initialised, as training did) and checked against the checkpoint's
    fingerprint. No optimizer, no compiled step, nothing written."""
    if not (step in ("best", "latest") or isinstance(step, int)):
        raise ValueError(f"step={step!r}; use 'best', 'latest' or a step number")
    config = default_config()
    saved = json.loads((path / "config.json").read_text())
    try:
        config.update(_lists_to_tuples(saved))
    except (AttributeError, KeyError) as e:
        raise ValueError(f"{path / 'config.json'} has keys this version does not know ({e}); load it with the "
                         "version of frozenlm_jax that trained it") from None
    checkpointer = Checkpointer(path / "checkpoints", config.train.keep_checkpoints, "", None, create=False)
    try:
        kept = checkpointer.all_steps()
        if not kept:
            raise FileNotFoundError(f"{path} has no checkpoint yet; train first")
        if isinstance(step, int) and step not in kept:
            raise FileNotFoundError(f"{path} has no checkpoint of step {step}; it keeps steps {kept}")
        chosen = step if isinstance(step, int) else checkpointer.latest_step()
        if step == "best":
            chosen = checkpointer.best_step() or chosen
        trained, frozen_meta = checkpointer.restore_params(chosen)
    finally:
        checkpointer.close()
    lm_config, lm_params, tokenizer, lm_source = build_lm(config)
    model = build_model(config, lm_config)
    image_shape = (config.vision.image_size,) * 2 + (3,)
    # The initialisation key of training (`restore_run`): it made the frozen leaves that are not loaded.
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    initial = init_model_params(model, init_rng, None, image_shape, lm_params, config.vision.init or None)
    trained_paths = set(flatten(trained))
    frozen = {p: v for p, v in flatten(initial).items() if p not in trained_paths}
    found = fingerprint(traverse_util.unflatten_dict(frozen, sep="/"), lm_source)
    if {"source": lm_source, "fingerprint": found} != frozen_meta:
        raise ValueError(f"the frozen parameters of {path} (LM {frozen_meta['source']!r}, fingerprint "
                         f"{frozen_meta['fingerprint']}) differ from those its config gives now ({lm_source!r}, "
                         f"{found}): the LM's files changed; load it with the LM it was trained with")
    return FrozenLM(model, merge_params(initial, trained), tokenizer, config.vision.image_size)


def _lists_to_tuples(value):
    """JSON's lists back to the tuples a config holds."""
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    return value


def _reload_lm(reference: dict, lm_config: LMConfig):
    """The frozen LM from its recorded source, checked against the recorded fingerprint."""
    overrides = {k: getattr(lm_config, k) for k in ("scan_layers", "remat")}
    lm = load_lm(reference["source"], dtype=lm_config.param_dtype, **overrides)
    found = fingerprint({"lm": lm.params}, reference["source"])
    if found != reference["fingerprint"]:
        raise ValueError(f"the LM at {reference['source']!r} is not the one this model was trained with "
                         f"(fingerprint {found}, expected {reference['fingerprint']}); export with --export_lm_weights")
    return lm.params
