"""Train a Frozen model: `python -m frozenlm_jax.train --config=NAME[:arg] --workdir=DIR`.

NAME is a packaged config (`shapes_smollm2`, `tiny`, `cc3m_paper`, `coco_gpt2`: `frozenlm_jax/configs/`) or a path
to a config file. Override any config key with `--config.a.b=value` (unknown keys are an error).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from frozenlm_jax.config import config_file
from frozenlm_jax.console import configure_output
from frozenlm_jax.train.trainer import export, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics (resumed if present).")
_EXPORT = flags.DEFINE_string("export", None, "Instead of training: export the workdir's latest checkpoint to "
                              "this directory as a self-contained model (frozenlm_jax.load_frozen opens it).")
_EXPORT_LM_WEIGHTS = flags.DEFINE_bool("export_lm_weights", False, "With --export: include a frozen LM's weights "
                                       "instead of a reference to its source.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' start-up lines, warnings and INFO logs (also "
                              "shown when absl's --verbosity/-v is given).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_output(_VERBOSE.value or flags.FLAGS["verbosity"].present)
    if _EXPORT.value:
        print(f"exported to {export(_CONFIG.value, _WORKDIR.value, _EXPORT.value, _EXPORT_LM_WEIGHTS.value)}")
    else:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def resolve_config_argument(argv: list[str]) -> list[str]:
    """argv with `--config=NAME[:arg]` (or `--config NAME`) turned into the config file's path."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            argv[i] = "--config=" + config_file(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = config_file(argv[i + 1])
    return argv


if __name__ == "__main__":
    try:
        arguments = resolve_config_argument(sys.argv)
    except ValueError as e:
        sys.exit(str(e))
    app.run(main, argv=arguments)
