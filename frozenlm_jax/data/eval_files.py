"""Evaluation files from the shapes world: VQA in VQAv2's format and few-shot episodes in Frozen's task format.

    python -m frozenlm_jax.data.eval_files --out_dir=/tmp/shapes_eval

writes `vqa/` (questions, annotations with 10 answers each, PNG images) and `episodes/` (one JSON file per
flavour, ways and shots, with JPEG images named like the paper's released task files). docs/data.md
describes both formats.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.data.batch import TextLayout
from frozenlm_jax.data.images import IMAGE_MEAN, IMAGE_STD, decode_image, preprocess_image

# Seed streams beyond the tfds splits (0, 1, 2 in shapes_world.SPLIT_IDS), so no evaluation image repeats one
# seen in training.
VQA_STREAM = 3
EPISODE_STREAMS = {"real_name": 4, "open_ended": 5}
FLAVOURS = tuple(EPISODE_STREAMS)
EPISODE_QUESTION = "What is this?"


def _write_atomically(path: pathlib.Path, data: bytes | str) -> None:
    """Write `path` whole or not at all: processes generating the same files at once (test workers, hosts
    sharing a cache) never read one half-written."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(partial, path)


def _write_image(path: pathlib.Path, image: np.ndarray) -> None:
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)
    _write_atomically(path, encoded.getvalue())


def vqa_scene(seed: int, index: int):
    """Scene `index` of the VQA set and the rng that then draws its questions."""
    rng = np.random.default_rng([seed, VQA_STREAM, index])
    return world.sample_scene(rng), rng


def write_vqa(out_dir, num_images: int = 500, image_size: int = 64, seed: int = 0, questions_per_image: int = 3):
    """VQAv2-format questions and annotations (10 identical answers each) over freshly generated scenes.

    Files: `questions.json`, `annotations.json`, `objects.json` (the structured scene of every image and its
    `shapes_world.describe` text, for error analysis and the text oracle) and `images/<image_id:012d>.png`. Returns the output directory.
    """
    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    questions, annotations, objects = [], [], {}
    for image_id in range(num_images):
        scene, rng = vqa_scene(seed, image_id)
        _write_image(out / "images" / f"{image_id:012d}.png", world.render(scene, image_size))
        objects[image_id] = {"background": scene.background, "objects": [vars(s) for s in scene.shapes],
                             "description": world.describe(scene)}
        for q in world.questions(scene, rng, questions_per_image):
            question_id = len(questions)
            questions.append({"image_id": image_id, "question": q.question, "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": q.question_type,
                    "answer_type": q.answer_type,
                    "multiple_choice_answer": q.answer,
                    "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)],
                }
            )
    common = {"info": {"description": "frozen_shapes VQA", "seed": seed}, "license": {}, "data_subtype": "shapes"}
    _write_atomically(out / "questions.json", json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    _write_atomically(out / "annotations.json", json.dumps({**common, "annotations": annotations}))
    _write_atomically(out / "objects.json", json.dumps(objects))
    return out


def task_name(flavour: str) -> str:
    return f"{flavour}_shapes"


def write_episodes(
    out_dir,
    flavour: str,
    ways: int,
    shots: int,
    num_episodes: int = 100,
    image_size: int = 64,
    seed: int = 0,
) -> pathlib.Path:
    """Few-shot episodes: `ways` shape kinds × `shots` captioned support images, then a question image.

    `real_name`: captions name the true shape ("This is a star."); `open_ended`: each kind gets a nonsense
    word for this episode only ("This is a dax."), so only the prompt can tell the answer. Every support and
    question image holds one object, so its category is unambiguous. `description_<i>` and `question_description`
    hold each image's `shapes_world.describe` text (for the text oracle). Returns the JSON file's path.
    """
    if flavour not in EPISODE_STREAMS:
        raise ValueError(f"unknown episode flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
    if not 1 <= ways <= len(world.KINDS):
        raise ValueError(f"ways={ways} must be between 1 and the {len(world.KINDS)} shape kinds")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = f"{task_name(flavour)}_shots_{shots}_ways_{ways}"
    episodes = []
    for x in range(num_episodes):
        rng = np.random.default_rng([seed, EPISODE_STREAMS[flavour], ways, shots, x])
        kinds = [world.KINDS[i] for i in rng.choice(len(world.KINDS), size=ways, replace=False)]
        if flavour == "open_ended":
            words = [world.NONSENSE_WORDS[i] for i in rng.choice(len(world.NONSENSE_WORDS), size=ways, replace=False)]
        else:
            words = kinds
        support = [k for _ in range(shots) for k in rng.permutation(ways)]  # every kind once per shot
        episode = {"question_id": x, "task": task_name(flavour), "ways": ways, "shots": shots}
        for i, k in enumerate(support, start=1):
            name = f"{task}_id_{x}_image_{i}.jpg"
            scene = world.sample_scene(rng, num_objects=1, kinds=(kinds[k],))
            _write_image(out / name, world.render(scene, image_size))
            episode[f"image_{i}"] = name
            episode[f"caption_{i}"] = f"This is a {words[k]}."
            episode[f"description_{i}"] = world.describe(scene)
        answer = int(rng.integers(ways))
        name = f"{task}_id_{x}_question.jpg"
        scene = world.sample_scene(rng, num_objects=1, kinds=(kinds[answer],))
        _write_image(out / name, world.render(scene, image_size))
        episode.update(
            question_image=name,
            question_description=world.describe(scene),
            question=EPISODE_QUESTION,
            answer=words[answer],
            category=kinds[answer],
            names=dict(zip(words, kinds)),
        )
        episodes.append(episode)
    path = out / f"{task}_all_questions.json"
    _write_atomically(path, json.dumps(episodes, indent=1))
    return path


def read_episodes(path) -> list[dict]:
    """The episodes of one `..._all_questions.json` file, with `support` = [(image path, caption), ...],
    `question_image` as a path and `descriptions` = {image path: scene text} (empty for files without them);
    the paper's released task files read the same way."""
    path = pathlib.Path(path)
    episodes = []
    for raw in json.loads(path.read_text()):
        support, i = [], 1
        while f"image_{i}" in raw:
            support.append((path.parent / raw[f"image_{i}"], raw[f"caption_{i}"]))
            i += 1
        question_image = path.parent / raw["question_image"]
        descriptions = {image: raw[f"description_{j}"] for j, (image, _) in enumerate(support, start=1)
                        if f"description_{j}" in raw}
        if "question_description" in raw:
            descriptions[question_image] = raw["question_description"]
        episodes.append({**raw, "support": support, "question_image": question_image, "descriptions": descriptions})
    return episodes


def load_image(path, image_size: int, mean=IMAGE_MEAN, std=IMAGE_STD) -> np.ndarray:
    """An image file, preprocessed like the training pipeline: float32[image_size, image_size, 3]."""
    return preprocess_image(decode_image(path), image_size, mean, std)


def episode_prompt(
    episode: dict,
    layout: TextLayout,
    image_size: int,
    with_answer: bool = False,
    pad_left: bool = False,
    max_images: int | None = None,
) -> dict[str, np.ndarray]:
    """`[img] This is a dax. [img] This is a blicket. [img] Q: What is this? A:` in the batch contract.

    `with_answer` appends " dax" EOS as the only target (for scoring by likelihood); otherwise the model
    is to continue the prompt. `max_images` defaults to this episode's image count.
    """
    parts: list[str | np.ndarray] = []
    for image_path, caption in episode["support"]:
        parts += [load_image(image_path, image_size), caption]
    parts += [load_image(episode["question_image"], image_size), f"Q: {episode['question']} A:"]
    max_images = len(episode["support"]) + 1 if max_images is None else max_images
    answer = episode["answer"] if with_answer else None
    return layout.prompt(parts, max_images=max_images, answer=answer, pad_left=pad_left)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vqa_images", type=int, default=500)
    parser.add_argument("--episodes", type=int, default=100, help="episodes per (flavour, ways, shots) file")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out_dir)
    write_vqa(out / "vqa", args.vqa_images, args.image_size, args.seed)
    for flavour in FLAVOURS:
        for ways in (2, 5):
            for shots in (1, 3, 5):
                path = write_episodes(out / "episodes", flavour, ways, shots, args.episodes, args.image_size, args.seed)
                print(f"wrote {path}")
    print(f"wrote {out / 'vqa'}")


if __name__ == "__main__":
    main()
