"""frozenlm_jax: Frozen (Tsimpoukelli et al., NeurIPS 2021) in JAX/Flax.

A frozen, pretrained language model becomes a multimodal few-shot learner by training only a vision
encoder whose output is a visual prefix for the LM.
"""

from frozenlm_jax.checkpoints import CheckpointError, LoadedLM, load_lm  # noqa: E402
from frozenlm_jax.export import load_frozen  # noqa: E402
from frozenlm_jax.frozen_lm import FrozenLM  # noqa: E402
from frozenlm_jax.models.lm import DecoderLM, LMConfig  # noqa: E402

__all__ = ["CheckpointError", "DecoderLM", "FrozenLM", "LMConfig", "LoadedLM", "load_frozen", "load_lm"]
