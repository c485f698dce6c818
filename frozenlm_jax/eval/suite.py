"""The tasks of `python -m frozenlm_jax.evaluate`: each turns a model into accuracies in [0, 1], one per column.

`shapes_vqa` gives the columns "shapes_vqa 0-shot", "shapes_vqa 1-shot", ...; `fast_binding` (nonsense
names) and `real_name` give "fast_binding 2-way 1-shot", ...; `shapes_captions` gives the colour and shape
word accuracy of captions. Shapes-world files are generated on first use into `data_cache()`; VQAv2 and
OKVQA are read from `eval.data_dir` in the layout of `REAL_VQA`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np

from frozenlm_jax import paths
from frozenlm_jax.data import eval_files
from frozenlm_jax.data.batch import TextLayout
from frozenlm_jax.decode import generate
from frozenlm_jax.eval import episodes, shapes_captions, vqa
from frozenlm_jax.frozen_lm import FrozenLM
from frozenlm_jax.models.lm import DecoderLM
from frozenlm_jax.weights.registry import cache_dir

TASKS = ("shapes_captions", "shapes_vqa", "fast_binding", "real_name", "vqav2", "okvqa")
EPISODE_FLAVOURS = {"fast_binding": "open_ended", "real_name": "real_name"}
# Official file names in DATA_DIR/<task>/, formatted with split = "train" or "val"; images in
# DATA_DIR/<task>/<split>2014/ (COCO's own folders; a symlink to one shared copy will do).
REAL_VQA = {
    "vqav2": ("v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json"),
}
QUESTIONS_PER_IMAGE = 3  # of eval_files.write_vqa
CAPTION_TOKENS = 16


def data_cache() -> pathlib.Path:
    """Where generated shapes-world evaluation files go: `$FROZENLM_CACHE/eval_data`, else
    `~/.cache/frozenlm_jax/eval_data`."""
    return cache_dir() / "eval_data"


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
    generated = [t for t in names if t not in REAL_VQA]
    if generated and settings.num_examples <= 0:
        raise ValueError(f"eval.num_examples={settings.num_examples}: the generated tasks {generated} need a "
                         "positive count (0, a whole file, is for real datasets only)")
    real = [t for t in names if t in REAL_VQA]
    if real and not settings.data_dir:
        raise ValueError(f"tasks {real} read the official files from eval.data_dir, which is empty; pass "
                         f"--data_dir=DIR (or train with --config.eval.data_dir=DIR), DIR holding {real[0]}/")
    return names


@dataclasses.dataclass(frozen=True)
class Column:
    """One accuracy column: `series` is its line in the accuracy-vs-shots plot (shots None: not plotted)."""

    name: str
    task: str
    series: str
    shots: int | None


@dataclasses.dataclass
class TextOnly:
    """The LM of a `FrozenLM` alone, for the no-image baseline: a prompt's images are dropped and its text
    parts joined by spaces. Answers greedily (generating `max_new_tokens` and cutting at the first stop
    string gives the same text as stopping there)."""

    model: FrozenLM

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def generate(self, prompts, max_new_tokens: int = 32, stop: Sequence[str] = ()) -> list[str]:
        tokenizer = self.model.tokenizer
        layout = TextLayout(tokenizer, 0, 0)
        ids = [layout.bos + tokenizer.encode(" ".join(p for p in prompt if isinstance(p, str)),
                                             add_special_tokens=False) for prompt in prompts]
        result = generate(DecoderLM(self.model.model.lm_config), self.model.params["lm"], ids, max_new_tokens,
                          eos_id=tokenizer.eos_id, pad_id=layout.pad_id)
        texts = [tokenizer.decode(tokens) for tokens in result.tokens]
        return [text[:min([text.find(s) for s in stop if s in text], default=len(text))] for text in texts]


class Suite:
    """The tasks of one `eval` config (see `frozenlm_jax.config`), with their data prepared once and
    reused for every model evaluated at `image_size`."""

    def __init__(self, tasks: Sequence[str], settings: ml_collections.ConfigDict, image_size: int):
        self.tasks = check_settings(tasks, settings)
        self.settings = settings
        self.image_size = image_size
        self._data: dict = {}

    def columns(self) -> list[Column]:
        """The columns `evaluate` fills, in order."""
        out, s = [], self.settings
        for task in self.tasks:
            if task == "shapes_captions":
                out += [Column(f"{task} {what}", task, task, None) for what in ("colour", "shape")]
            elif task in EPISODE_FLAVOURS:
                out += [Column(f"{task} {w}-way {k}-shot", task, f"{task} {w}-way", k)
                        for w in s.episode_ways for k in s.episode_shots]
            else:
                out += [Column(f"{task} {k}-shot", task, task, k) for k in s.vqa_shots]
        return out

    def evaluate(self, model, blind: bool = False) -> dict:
        """{"scores": {column: accuracy or None (not applicable)}, "details": {column: {...}}} of `model` (a
        `FrozenLM`, or `TextOnly`); `blind` blanks every image of every prompt."""
        scores, details = {}, {}
        for task in self.tasks:
            if task == "shapes_captions":
                found = self._captions(model, blind)
            elif task in EPISODE_FLAVOURS:
                found = self._episodes(task, model, blind)
            else:
                found = self._vqa(task, model, blind)
            for column, (score, detail) in found.items():
                scores[column], details[column] = score, detail
        return {"scores": scores, "details": details}

    def _captions(self, model, blind: bool) -> dict:
        if isinstance(model, TextOnly):
            reason = {"not_applicable": "the LM alone has no image to caption"}
            return {"shapes_captions colour": (None, reason), "shapes_captions shape": (None, reason)}
        scenes, images = shapes_captions.heldout_scenes(self.settings.num_examples, model.image_size)
        if blind:
            images = np.zeros_like(images)
        captions = shapes_captions.generate_captions(model.model, model.params, images, model.tokenizer,
                                                     CAPTION_TOKENS)
        found = shapes_captions.word_accuracy(captions, scenes)
        common = {"captions": len(captions), "examples": captions[:4]}
        return {f"shapes_captions {what}": (found[f"{key}_accuracy"], {"chance": found[f"{key}_chance"],
                                                                        "named": found[f"captions_naming_a_{key}"],
                                                                        **common})
                for what, key in (("colour", "color"), ("shape", "shape"))}

    def _vqa(self, task: str, model, blind: bool) -> dict:
        if task not in self._data:
            self._data[task] = self._shapes_vqa() if task == "shapes_vqa" else self._real_vqa(task)
        questions, train = self._data[task]
        s = self.settings
        out = {}
        for shots in s.vqa_shots:
            found = vqa.evaluate_vqa(model, questions, train, shots, s.seed, blind, batch_size=s.batch_size)
            examples = [{"question": q.question, "answer": q.answer, "prediction": found["predictions"][q.question_id]}
                        for q in questions[:4]]
            out[f"{task} {shots}-shot"] = (found["accuracy"], {
                "questions": len(questions), "per_answer_type": found["per_answer_type"], "examples": examples})
        return out

    def _shapes_vqa(self):
        s, size = self.settings, self.image_size
        images = math.ceil(s.num_examples / QUESTIONS_PER_IMAGE)
        train_images = max(images, math.ceil(max(s.vqa_shots, default=0) / QUESTIONS_PER_IMAGE))
        root = data_cache() / f"shapes_{size}"
        sets = []
        for seed, count in ((s.seed, images), (s.seed + 1, train_images)):  # seed + 1: the in-context examples
            directory = root / f"vqa_seed{seed}_images{count}"
            if not (directory / "objects.json").exists():  # written last
                print(f"writing shapes VQA (seed {seed}, {count} images) to {directory}")
                eval_files.write_vqa(directory, count, size, seed)
            sets.append(vqa.load_vqa(directory / "questions.json", directory / "annotations.json",
                                     directory / "images", vqa.SHAPES_IMAGES))
        return sets[0][:s.num_examples], sets[1]

    def _real_vqa(self, task: str):
        s = self.settings
        directory = paths.path(s.data_dir) / task  # local or gs://
        paths.preflight(directory)

        def split(name: str, pattern: str):
            questions, annotations = (directory / f.format(split=name) for f in REAL_VQA[task])
            for path in (questions, annotations, directory / f"{name}2014"):
                if not path.exists():
                    raise FileNotFoundError(f"{path} not found: task {task!r} expects {directory} to hold "
                                            f"{questions.name}, {annotations.name} and the images in {name}2014/")
            return vqa.load_vqa(questions, annotations, directory / f"{name}2014", pattern)

        questions = _subset(split("val", vqa.COCO_VAL2014), s.num_examples, s.seed)
        train = split("train", vqa.COCO_TRAIN2014) if any(s.vqa_shots) else []
        return questions, train

    def _episodes(self, task: str, model, blind: bool) -> dict:
        s, flavour = self.settings, EPISODE_FLAVOURS[task]
        directory = data_cache() / f"shapes_{self.image_size}" / f"episodes_seed{s.seed}_n{s.num_examples}"
        out = {}
        for ways in s.episode_ways:
            for shots in s.episode_shots:
                name = f"{eval_files.task_name(flavour)}_shots_{shots}_ways_{ways}_all_questions.json"
                if not (directory / name).exists():  # written last
                    eval_files.write_episodes(directory, flavour, ways, shots, s.num_examples, self.image_size,
                                              s.seed)
                path = episodes.episode_file(directory, flavour, ways, shots)
                found = episodes.evaluate_episodes(model, path, s.task_induction, blind, batch_size=s.batch_size)
                out[f"{task} {ways}-way {shots}-shot"] = (found["accuracy"], {
                    "episodes": len(found["predictions"]), "chance": 1 / ways,
                    "task_induction": s.task_induction, "examples": found["predictions"][:4]})
        return out


def _subset(questions: list, count: int, seed: int) -> list:
    """`count` questions drawn without replacement (in file order), or all when count is 0 or too large."""
    if count <= 0 or count >= len(questions):
        return questions
    chosen = np.random.default_rng(seed).choice(len(questions), size=count, replace=False)
    return [questions[i] for i in sorted(chosen)]
