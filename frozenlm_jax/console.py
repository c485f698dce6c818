"""Quiet command lines: TensorFlow's and absl's start-up lines, deprecation warnings and JAX's backend probes
are hidden unless the user asks for them (`--verbose`, or absl's own `--verbosity`/`-v`)."""

from __future__ import annotations

import logging
import os
import warnings

from absl import logging as absl_logging

NOISY_LOGGERS = ("jax._src.xla_bridge", "tensorflow", "tensorflow_datasets", "orbax")


def configure_output(verbose: bool) -> None:
    """Without `verbose`, hide the libraries' INFO and WARNING chatter; with it, leave every library's defaults.
    Call before TensorFlow is imported: its C++ start-up lines obey environment variables read at import."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its "oneDNN custom operations are on" line (tf.data only)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds' and orbax's warnings go through absl
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
