"""Deprecated alias of `frozenlm_jax.weights` (pretrained-weight import; orbax checkpoints of runs are
`frozenlm_jax.checkpointing`). It and its submodules (`gguf`, `hf`, `params`, `registry`, `vision_weights`)
still import, with a DeprecationWarning."""

import importlib
import sys
import warnings

from frozenlm_jax.weights import NAMED_LMS, CheckpointError, LoadedLM, is_hub_id, load_lm  # noqa: F401

warnings.warn("frozenlm_jax.checkpoints is deprecated: import frozenlm_jax.weights", DeprecationWarning, stacklevel=2)
for _old, _new in {"gguf": "gguf", "hf": "hf", "params": "params", "registry": "registry",
                   "vision_weights": "vision"}.items():
    sys.modules[f"{__name__}.{_old}"] = importlib.import_module(f"frozenlm_jax.weights.{_new}")
