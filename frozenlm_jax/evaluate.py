"""Few-shot evaluation of trained runs: one table row per run (and per blind variant), columns = tasks × shots.

    python -m frozenlm_jax.evaluate --workdir=DIR [--workdir=DIR2 ...] [--tasks=shapes_vqa,fast_binding]
        [--lm_only=DIR] [--out=OUT]

writes OUT/results.json, OUT/results.md and OUT/accuracy_vs_shots.png; OUT defaults to DIR/eval with one
--workdir and must be given otherwise. The tasks and their settings come from each run's config (`eval.*`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from absl import logging

from frozenlm_jax.eval.report import evaluate_runs
from frozenlm_jax.eval.suite import TASKS


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m frozenlm_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", default=[],
                        help="a training workdir or an exported model; repeat for more rows")
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(TASKS)} (default: each run's eval.tasks)")
    parser.add_argument("--out", help="report directory (default with one --workdir: WORKDIR/eval)")
    parser.add_argument("--lm_only", metavar="DIR", help="add the untrained blind baseline: the frozen LM of this "
                        "run alone, answering the same prompts from their text (images dropped)")
    parser.add_argument("--data_dir", help="overrides eval.data_dir: the folder holding vqav2/ and okvqa/")
    parser.add_argument("--step", default="best", help="checkpoint of a workdir: best, latest or a step number")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    step = int(args.step) if args.step.isdigit() else args.step
    return evaluate_runs(args.workdir, args.tasks, args.out, args.lm_only, args.data_dir, step)


if __name__ == "__main__":
    main()
