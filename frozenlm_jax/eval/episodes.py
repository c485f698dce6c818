"""Few-shot episodes (open-ended / fast-binding and real-name miniImageNet-style tasks), scored by the first word.

An episode (`eval_files.write_episodes` / `read_episodes`, or the paper's released task files) becomes the
prompt `[task induction?, img, "This is a dax.", img, "This is a blicket.", ..., query, "Q: What is this?
A: This is a"]`: support images alternate with their captions in file order, and the query text ends where
the name is due, as in the paper's figures. The answer is the first word of the greedy continuation after
normalisation (lowercase, punctuation and articles dropped), right when it equals the episode's answer.
`task_induction` opens the prompt with "Answer with dax or blicket." (the episode's names, in file order).

The answerer is any object with `.image_size` and `.generate(prompts, max_new_tokens=..., stop=...) ->
list[str]`; images are passed as their files' paths, or as zeros [S, S, 3] when `blind`. `ShapesEpisodes` is
the evaluator of `frozenlm_jax.eval.suite` (fast_binding, real_name).
"""

from __future__ import annotations

import itertools
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from frozenlm_jax.data import eval_files
from frozenlm_jax.data.eval_files import FLAVOURS, read_episodes, task_name
from frozenlm_jax.eval.task import Column, Evaluator, answerer, data_cache

QUERY = "Q: {question} A: This is a"
STOP = ["\n", "."]
ARTICLES = {"a", "an", "the"}


def episode_file(directory, flavour: str, ways: int, shots: int) -> pathlib.Path:
    """The `..._all_questions.json` file of one (flavour, ways, shots) task in `directory`."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown episode flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
    path = pathlib.Path(directory) / f"{task_name(flavour)}_shots_{shots}_ways_{ways}_all_questions.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; write it with `python -m frozenlm_jax.data.eval_files "
                                f"--out_dir=...` (its episodes/ folder)")
    return path


def first_word(text: str) -> str:
    """The first word of `text`, lowercased, without punctuation, skipping articles ("A dax." -> "dax")."""
    words = [w for w in re.sub(r"[^\w\s]", " ", text.lower()).split() if w not in ARTICLES]
    return words[0] if words else ""


def task_induction_text(names: Sequence[str]) -> str:
    """"Answer with dax or blicket." / "Answer with dax, blicket or wug." """
    names = list(names)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"Answer with {listed}."


def episode_items(episode: dict, image_size: int, task_induction: bool = False, blind: bool = False,
                  query: str = QUERY) -> list:
    """The prompt of one `read_episodes` episode: support images (paths) alternating with their captions, then
    the query image and `query` (formatted with the episode's question)."""
    def image(path):
        return np.zeros((image_size, image_size, 3), np.float32) if blind else path

    items: list = [task_induction_text(episode["names"])] if task_induction else []
    for path, caption in episode["support"]:
        items += [image(path), caption]
    return items + [image(episode["question_image"]), query.format(question=episode["question"])]


def evaluate_episodes(
    answerer,
    path,
    task_induction: bool = False,
    blind: bool = False,
    query: str = QUERY,
    max_new_tokens: int = 4,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Accuracy of the answerer on the episodes of one task file, with every episode's prediction."""
    episodes = read_episodes(path)
    if not episodes:
        raise ValueError(f"{path} holds no episodes")
    predictions = []
    it = iter(episodes)
    desc = pathlib.Path(path).name.removesuffix("_all_questions.json")
    with tqdm(total=len(episodes), desc=desc, disable=not progress) as bar:
        while batch := list(itertools.islice(it, batch_size)):
            prompts = [episode_items(e, answerer.image_size, task_induction, blind, query) for e in batch]
            outputs = answerer.generate(prompts, max_new_tokens=max_new_tokens, stop=STOP)
            if len(outputs) != len(prompts):
                raise ValueError(f"the answerer returned {len(outputs)} answers for {len(prompts)} prompts")
            for episode, output in zip(batch, outputs):
                word, target = first_word(output), first_word(episode["answer"])
                predictions.append({"question_id": episode["question_id"], "output": output, "prediction": word,
                                    "answer": target, "correct": word == target})
            bar.update(len(batch))
    first = episodes[0]
    return {"accuracy": float(np.mean([p["correct"] for p in predictions])), "task": first["task"],
            "ways": first["ways"], "shots": first["shots"], "task_induction": task_induction, "blind": blind,
            "predictions": predictions}


def evaluate_episode_grid(
    answerer,
    directory,
    flavours: Sequence[str] = FLAVOURS,
    ways: Sequence[int] = (2, 5),
    shots: Sequence[int] = (1, 3, 5),
    task_induction: Sequence[bool] = (False, True),
    blind: bool = False,
    **kwargs,
) -> list[dict]:
    """`evaluate_episodes` over every (flavour, ways, shots, task induction) task file in `directory`: one
    result per combination (without the per-episode predictions), for tables like the paper's."""
    rows = []
    for flavour, w, s, induction in itertools.product(flavours, ways, shots, task_induction):
        result = evaluate_episodes(answerer, episode_file(directory, flavour, w, s), induction, blind, **kwargs)
        rows.append({"flavour": flavour, **{k: v for k, v in result.items() if k != "predictions"}})
    return rows


EPISODES_VERSION = 2  # files with scene descriptions


class ShapesEpisodes(Evaluator):
    """Columns "<task> <w>-way <k>-shot" over `eval.episode_ways` × `eval.episode_shots`: `eval.num_examples`
    generated episodes each (`eval_files.write_episodes`, cached in `data_cache()`), task induction as
    `eval.task_induction`. Chance: 1 / ways."""

    def __init__(self, name, settings, image_size, flavour: str):
        super().__init__(name, settings, image_size)
        self.flavour = flavour

    def columns(self) -> list[Column]:
        s = self.settings
        return [Column(f"{self.name} {w}-way {k}-shot", self.name, f"{self.name} {w}-way", k)
                for w in s.episode_ways for k in s.episode_shots]

    def chance(self) -> dict[str, float]:
        return {f"{self.name} {w}-way {k}-shot": 1 / w for w in self.settings.episode_ways
                for k in self.settings.episode_shots}

    def _file(self, ways: int, shots: int) -> pathlib.Path:
        s = self.settings
        directory = (data_cache() / f"shapes_{self.image_size}" /
                     f"episodes_v{EPISODES_VERSION}_seed{s.seed}_n{s.num_examples}")
        name = f"{task_name(self.flavour)}_shots_{shots}_ways_{ways}_all_questions.json"
        if not (directory / name).exists():  # written last
            eval_files.write_episodes(directory, self.flavour, ways, shots, s.num_examples, self.image_size, s.seed)
        return episode_file(directory, self.flavour, ways, shots)

    def _run(self, model, mode: str) -> dict:
        s, out = self.settings, {}
        for ways in s.episode_ways:
            for shots in s.episode_shots:
                path = self._file(ways, shots)
                descriptions = {image: text for e in read_episodes(path) for image, text in e["descriptions"].items()}
                found = evaluate_episodes(answerer(model, mode, descriptions), path, s.task_induction,
                                          batch_size=s.batch_size)
                out[f"{self.name} {ways}-way {shots}-shot"] = (found["accuracy"], {
                    "episodes": len(found["predictions"]), "task_induction": s.task_induction,
                    "examples": found["predictions"][:4]})
        return out
