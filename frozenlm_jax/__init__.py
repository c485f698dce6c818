"""frozenlm_jax: Frozen (Tsimpoukelli et al., NeurIPS 2021) in JAX/Flax.

A frozen, pretrained language model becomes a multimodal few-shot learner by training only a vision
encoder whose output is a visual prefix for the LM.
"""

from frozenlm_jax.export import load_frozen
from frozenlm_jax.frozen_lm import FrozenLM
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import DecoderLM, LMConfig
from frozenlm_jax.train.step import TrainStep, make_trainer
from frozenlm_jax.train.trainer import train_and_evaluate
from frozenlm_jax.weights import CheckpointError, LoadedLM, load_lm

__all__ = ["CheckpointError", "DecoderLM", "Frozen", "FrozenLM", "LMConfig", "LoadedLM", "TrainStep", "load_frozen",
           "load_lm", "make_trainer", "train_and_evaluate"]
