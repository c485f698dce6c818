"""Data: the tokenizer, the embedded shapes world, caption datasets and the input pipeline.

TensorFlow and tfds are imported only by the modules that need them, never by `import frozenlm_jax`.
"""
