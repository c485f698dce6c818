"""Train a Frozen model: `python -m frozenlm_jax.train --config=configs/NAME.py[:arg] --workdir=DIR`.

Override any config key with `--config.a.b=value` (unknown keys are an error).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from frozenlm_jax.train.trainer import export, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if present).")
_EXPORT = flags.DEFINE_string("export", None, "Instead of training: export the workdir's latest checkpoint to "
                              "this directory as a self-contained model (frozenlm_jax.load_frozen opens it).")
_EXPORT_LM_WEIGHTS = flags.DEFINE_bool("export_lm_weights", False, "With --export: include a frozen LM's weights "
                                       "instead of a reference to its source.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO; -v 0 brings it back
    if _EXPORT.value:
        print(f"exported to {export(_CONFIG.value, _WORKDIR.value, _EXPORT.value, _EXPORT_LM_WEIGHTS.value)}")
    else:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
