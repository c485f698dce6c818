"""Linen modules: the decoder-only LM, vision encoders and the Frozen model."""
