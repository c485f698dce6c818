"""Few-shot evaluation of trained runs: one table row per run (and per blind variant), columns = tasks × shots.

    python -m frozenlm_jax.evaluate --workdir=DIR [--workdir=DIR2 ...] [--tasks=shapes_vqa,fast_binding]
        [--lm_only=DIR] [--text_oracle] [--num_examples=N] [--shots=0,1,4] [--ways=2,5] [--out=OUT]

writes OUT/results.json, OUT/results.md and OUT/accuracy_vs_shots.png; OUT defaults to DIR/eval with one
--workdir and must be given otherwise. The tasks and their settings come from each run's config (`eval.*`);
--num_examples, --shots and --ways override them for every run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from frozenlm_jax.console import configure_output
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
    parser.add_argument("--text_oracle", action="store_true", help="add the text-oracle row: the frozen LM (of "
                        "--lm_only, else of the first workdir) with every image replaced by its scene's true text")
    parser.add_argument("--num_examples", type=int, help="overrides eval.num_examples (questions, episodes or "
                        "images per column)")
    parser.add_argument("--shots", type=_ints, help="overrides eval.vqa_shots, and eval.episode_shots with the "
                        "positive ones, e.g. 0,1,4")
    parser.add_argument("--ways", type=_ints, help="overrides eval.episode_ways, e.g. 2,5")
    parser.add_argument("--data_dir", help="overrides eval.data_dir: the folder holding vqav2/ and okvqa/")
    parser.add_argument("--step", default="best", help="checkpoint of a workdir: best, latest or a step number")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' start-up lines, warnings and "
                        "INFO logs")
    args = parser.parse_args(argv)
    configure_output(args.verbose)
    step = int(args.step) if args.step.isdigit() else args.step
    overrides = {}
    if args.num_examples is not None:
        overrides["num_examples"] = args.num_examples
    if args.shots is not None:
        overrides.update(vqa_shots=args.shots, episode_shots=tuple(k for k in args.shots if k > 0))
    if args.ways is not None:
        overrides["episode_ways"] = args.ways
    return evaluate_runs(args.workdir, args.tasks, args.out, args.lm_only, args.data_dir, step, args.text_oracle,
                         overrides)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,1,4)") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 0")
    return values


if __name__ == "__main__":
    main()
