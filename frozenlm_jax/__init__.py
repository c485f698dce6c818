"""frozenlm_jax: Frozen (Tsimpoukelli et al., NeurIPS 2021) in JAX/Flax.

A frozen, pretrained language model becomes a multimodal few-shot learner by training only a vision
encoder whose output is a visual prefix for the LM.
"""
