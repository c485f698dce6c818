"""Data: the batch contract, images for inference, the embedded shapes world, caption datasets and the input
pipeline.

TensorFlow and tfds are imported only by the modules that need them, never by `import frozenlm_jax`.
Importing `frozenlm_jax.data.shapes` registers the `frozen_shapes` tfds dataset and
`frozenlm_jax.data.cc3m` registers `conceptual_captions`; `frozenlm_jax.data.pipeline` turns either (or
any tfds caption dataset) into batches of the contract in `frozenlm_jax/data/batch.py` (docs/architecture.md).
"""
