"""The evaluators by name, and `Suite`: the evaluators of one task list, run in order.

`shapes_vqa`, `vqav2` and `okvqa` give the columns "<task> 0-shot", "<task> 1-shot", ...; `fast_binding`
(nonsense names) and `real_name` give "<task> 2-way 1-shot", ...; `shapes_captions` gives the colour and shape
word accuracy of captions. Shapes-world files are generated on first use into `data_cache()`; VQAv2 and
OKVQA are read from `eval.data_dir`. The trainer runs `train.eval_tasks` every `train.eval_every` steps and
`python -m frozenlm_jax.evaluate` runs `eval.tasks`, both through `Suite`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import ml_collections

from frozenlm_jax.eval import episodes, shapes_captions, vqa
from frozenlm_jax.eval.task import Column, Evaluator

# name -> evaluator(name, settings, image_size): a new task is one module and one entry here.
EVALUATORS = {
    "shapes_captions": shapes_captions.ShapesCaptions,
    "shapes_vqa": vqa.ShapesVQA,
    "fast_binding": functools.partial(episodes.ShapesEpisodes, flavour="open_ended"),
    "real_name": functools.partial(episodes.ShapesEpisodes, flavour="real_name"),
    "vqav2": vqa.OfficialVQA,
    "okvqa": vqa.OfficialVQA,
}
TASKS = tuple(EVALUATORS)
GENERATED = ("shapes_captions", "shapes_vqa", "fast_binding", "real_name")  # need a positive num_examples


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" or a sequence, checked against `TASKS`."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(TASKS)}")
    if not names:
        raise ValueError(f"no task to evaluate; name some of: {', '.join(TASKS)}")
    return names


def check_settings(tasks: str | Sequence[str], settings: ml_collections.ConfigDict) -> list[str]:
    """The task names, once they and the `eval` settings they need are known to be usable."""
    names = parse_tasks(tasks)
    generated = [t for t in names if t in GENERATED]
    if generated and settings.num_examples <= 0:
        raise ValueError(f"eval.num_examples={settings.num_examples}: the generated tasks {generated} need a "
                         "positive count (0, a whole file, is for real datasets only)")
    real = [t for t in names if t not in GENERATED]
    if real and not settings.data_dir:
        raise ValueError(f"tasks {real} read the official files from eval.data_dir, which is empty; pass "
                         f"--data_dir=DIR (or train with --config.eval.data_dir=DIR), DIR holding {real[0]}/")
    return names


class Suite:
    """The evaluators of `tasks` under one `eval` settings section, built once and reused for every model
    evaluated at `image_size` (data loaded once, programs compiled once per shape)."""

    def __init__(self, tasks: str | Sequence[str], settings: ml_collections.ConfigDict, image_size: int):
        self.tasks = check_settings(tasks, settings)
        self.settings = settings
        self.image_size = image_size
        self.evaluators: list[Evaluator] = [EVALUATORS[t](t, settings, image_size) for t in self.tasks]

    def columns(self) -> list[Column]:
        """The columns the suite fills, in order."""
        return [c for e in self.evaluators for c in e.columns()]

    def chance(self) -> dict[str, float]:
        """{column: chance accuracy} (each task's definition: docs/evaluation.md)."""
        return {k: v for e in self.evaluators for k, v in e.chance().items()}

    def evaluate(self, model, mode: str = "model") -> dict:
        """{"scores": {column: accuracy or None (not applicable)}, "details": {column: {...}}} of a `FrozenLM`
        in `mode` (`frozenlm_jax.eval.task.MODES`)."""
        scores, details = {}, {}
        for evaluator in self.evaluators:
            for column, (score, detail) in evaluator.run(model, mode).items():
                scores[column], details[column] = score, detail
        return {"scores": scores, "details": details}
