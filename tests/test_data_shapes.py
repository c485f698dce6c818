"""The frozen_shapes world: the tfds builder, its captions and VQA answers against objects and pixels, episodes."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from frozenlm_jax.data import eval_files, shapes
from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.data.batch import TextLayout
from frozenlm_jax.tokenizer import byte_tokenizer

tf.config.set_visible_devices([], "GPU")

TINY = shapes.FrozenShapesConfig(name="tiny_test", image_size=48, num_train=40, num_validation=24, num_test=24)
COLOR_RE = "(?:" + "|".join(world.COLORS) + ")"
KIND_RE = "(?:" + "|".join(world.KINDS) + ")"
NOUN_RE = rf"\b(an?|two|three) (?:(small|large) )?({COLOR_RE}) ({KIND_RE})(?:e?s)?\b"


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    builder = tfds.builder("frozen_shapes", config=TINY, data_dir=tmp_path_factory.mktemp("tfds"))
    builder.download_and_prepare()
    return builder


def _examples(builder, split):
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _objects(example):
    o = example["objects"]
    return [
        world.Shape(world.KINDS[k], list(world.COLORS)[c], world.SIZES[s], float(x), float(y))
        for k, c, s, x, y in zip(o["kind"], o["color"], o["size"], o["x"], o["y"])
    ]


def check_pixels(image, objects, background):
    """Each object's centre pixel has exactly its palette colour; the corners show the background."""
    size = image.shape[0]
    for s in objects:
        pixel = image[int(s.y * size), int(s.x * size)]
        assert tuple(pixel) == world.COLORS[s.color], (s, pixel)
    corner = image[0, 0].astype(int)
    assert np.abs(corner - world.BACKGROUNDS[background]).max() <= world.GRADIENT_LEVELS


def check_caption(caption, objects, background):
    """Reads a caption back and checks every claim in it against the structured objects."""
    nouns = [s.noun for s in objects]
    mentions = re.findall(NOUN_RE, caption)
    assert mentions, caption
    counts = {"a": 1, "an": 1, "two": 2, "three": 3}
    for count, size, color, kind in mentions:
        matching = [s for s in objects if s.noun == f"{color} {kind}"]
        assert len(matching) >= counts[count], (caption, objects)
        if size:
            assert any(s.size == size for s in matching), (caption, objects)
    relation = re.fullmatch(rf"{NOUN_RE} (above|below|to the left of|to the right of) {NOUN_RE}", caption)
    if relation:
        a, rel, b = f"{relation[3]} {relation[4]}", relation[5], f"{relation[8]} {relation[9]}"
        pairs = [(s, t) for s in objects for t in objects if s is not t and s.noun == a and t.noun == b]
        dy = {"above": lambda s, t: s.y < t.y, "below": lambda s, t: s.y > t.y}
        dx = {"to the left of": lambda s, t: s.x < t.x, "to the right of": lambda s, t: s.x > t.x}
        assert any({**dy, **dx}[rel](s, t) for s, t in pairs), (caption, objects)
        return
    # Every other phrasing describes the whole scene.
    assert sum(counts[m[0]] for m in mentions) == len(objects), (caption, objects)
    assert sorted({f"{m[2]} {m[3]}" for m in mentions}) == sorted(set(nouns)), (caption, objects)
    if " background" in caption:
        assert caption.endswith(f"on a {background} background"), caption
    if ":" in caption:
        assert caption.startswith(f"{world.NUMBER_WORDS[len(objects)]} shape"), caption
    for place in re.findall(rf"({COLOR_RE}) ({KIND_RE}) (in the \w+(?: \w+)?|at the \w+|on the \w+)", caption):
        color, kind, where = place
        where = re.sub(r" and$", "", where)
        assert any(s.noun == f"{color} {kind}" and world.where(s) == where for s in objects), (caption, objects)


def check_answer(question, answer, objects):
    """Answers a VQA question independently from the objects."""
    nouns = [s.noun for s in objects]
    by_noun = {s.noun: s for s in objects}
    if question == "How many shapes are there?":
        expected = str(len(objects))
    elif m := re.fullmatch(rf"How many ({COLOR_RE}) shapes are there\?", question):
        expected = str(sum(s.color == m[1] for s in objects))
    elif m := re.fullmatch(rf"How many ({KIND_RE})e?s are there\?", question):
        expected = str(sum(s.kind == m[1] for s in objects))
    elif m := re.fullmatch(rf"Is there an? ({COLOR_RE} {KIND_RE})\?", question):
        expected = "yes" if m[1] in nouns else "no"
    elif m := re.fullmatch(rf"What color is the ({KIND_RE})\?", question):
        (expected,) = [s.color for s in objects if s.kind == m[1]]
    elif m := re.fullmatch(rf"What shape is the ({COLOR_RE}) object\?", question):
        (expected,) = [s.kind for s in objects if s.color == m[1]]
    elif m := re.fullmatch(rf"Is the ({COLOR_RE} {KIND_RE}) on the left or on the right\?", question):
        expected = "left" if by_noun[m[1]].x < 0.5 else "right"
    elif m := re.fullmatch(rf"Is the ({COLOR_RE} {KIND_RE}) above or below the ({COLOR_RE} {KIND_RE})\?", question):
        expected = "above" if by_noun[m[1]].y < by_noun[m[2]].y else "below"
    else:
        raise AssertionError(f"unrecognised question {question!r}")
    assert answer == expected, (question, answer, objects)


def test_builder_examples_agree_with_objects_and_pixels(tiny_builder):
    assert tiny_builder.info.splits["train"].num_examples == TINY.num_train
    assert {f.value for f in tiny_builder.info.available_file_formats()} == {"tfrecord", "array_record"}
    for split in ("train", "validation"):
        for ex in _examples(tiny_builder, split):
            objects = _objects(ex)
            background = list(world.BACKGROUNDS)[ex["background"]]
            assert 1 <= len(objects) <= 3 and ex["image"].shape == (48, 48, 3)
            check_pixels(ex["image"], objects, background)
            assert len(ex["captions"]) >= 3
            for caption in ex["captions"]:
                check_caption(caption.decode(), objects, background)


def test_load_and_data_source_read_the_same_records(tiny_builder):
    loaded = tfds.load(f"frozen_shapes/{TINY.name}", split="test", data_dir=tiny_builder.data_dir_root)
    source = tfds.data_source(f"frozen_shapes/{TINY.name}", split="test", data_dir=tiny_builder.data_dir_root,
                              deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE)
    from_load = sorted(int(ex["image_id"]) for ex in tfds.as_numpy(loaded))
    from_source = sorted(int(source[i].features.feature["image_id"].int64_list.value[0]) for i in range(len(source)))
    assert from_load == from_source and len(from_load) == TINY.num_test


def test_builder_is_deterministic_and_splits_differ(tiny_builder):
    for ex in _examples(tiny_builder, "validation")[:5]:
        index = int(ex["image_id"]) - shapes.world.SPLIT_IDS["validation"] * shapes.IMAGE_ID_STRIDE
        scene, captions = shapes.scene_for(TINY, "validation", index)
        np.testing.assert_array_equal(world.render(scene, TINY.image_size), ex["image"])
        assert [c.decode() for c in ex["captions"]] == captions
    images = {split: {ex["image"].tobytes() for ex in _examples(tiny_builder, split)} for split in ("train", "validation", "test")}
    assert not images["train"] & images["validation"] and not images["validation"] & images["test"]
    ids = [int(ex["image_id"]) for ex in _examples(tiny_builder, "test")]
    assert sorted(ids) == [2 * shapes.IMAGE_ID_STRIDE + i for i in range(TINY.num_test)]


def test_world_captions_and_answers_hold_over_many_scenes():
    for index in range(300):
        rng = np.random.default_rng([7, index])
        scene = world.sample_scene(rng)
        image = world.render(scene, 64)
        check_pixels(image, scene.shapes, scene.background)
        for caption in world.captions(scene, rng, count=5):
            check_caption(caption, scene.shapes, scene.background)
        for q in world.questions(scene, rng, count=20):
            check_answer(q.question, q.answer, scene.shapes)


def test_every_shape_kind_fills_its_own_centre_and_differs_from_the_others():
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    masks = {k: world.shape_mask(k, 32, 32, 12, xs, ys) for k in world.KINDS}
    for kind, mask in masks.items():
        assert mask[32, 32] and 40 < mask.sum() < 600, kind
    for a in world.KINDS:
        for b in world.KINDS:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 20, (a, b)
    with pytest.raises(ValueError, match="unknown shape kind 'blob'"):
        world.shape_mask("blob", 1, 1, 1, xs, ys)


def test_vqa_files_follow_vqav2_and_agree_with_pixels(tmp_path):
    out = eval_files.write_vqa(tmp_path / "vqa", num_images=12, image_size=48, seed=3)
    questions = json.loads((out / "questions.json").read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads((out / "annotations.json").read_text())["annotations"]}
    objects = json.loads((out / "objects.json").read_text())
    assert len(questions) == 36 and set(annotations) == {q["question_id"] for q in questions}
    for q in questions:
        a = annotations[q["question_id"]]
        assert a["image_id"] == q["image_id"] and a["answer_type"] in ("yes/no", "number", "other")
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
        scene = objects[str(q["image_id"])]
        shapes_ = [world.Shape(**o) for o in scene["objects"]]
        check_answer(q["question"], a["multiple_choice_answer"], shapes_)
        image = tf.io.decode_png((out / "images" / f"{q['image_id']:012d}.png").read_bytes()).numpy()
        check_pixels(image, shapes_, scene["background"])


@pytest.mark.parametrize("flavour", eval_files.FLAVOURS)
def test_episodes_are_written_read_and_prompted(tmp_path, flavour):
    path = eval_files.write_episodes(tmp_path, flavour, ways=2, shots=3, num_episodes=4, image_size=32, seed=1)
    assert path.name == f"{flavour}_shapes_shots_3_ways_2_all_questions.json"
    episodes = eval_files.read_episodes(path)
    assert len(episodes) == 4
    layout = TextLayout(byte_tokenizer(), max_len=256, num_prefix=2)
    for ep in episodes:
        assert len(ep["support"]) == 6 and ep["image_3"] == f"{flavour}_shapes_shots_3_ways_2_id_{ep['question_id']}_image_3.jpg"
        words = [re.fullmatch(r"This is a (\w+)\.", caption)[1] for _, caption in ep["support"]]
        assert sorted(words[:2]) == sorted(words[2:4]) == sorted(set(words)) == sorted(ep["names"])
        assert ep["answer"] in ep["names"] and ep["names"][ep["answer"]] == ep["category"]
        if flavour == "real_name":
            assert all(word == kind for word, kind in ep["names"].items())
        else:
            assert set(ep["names"]) <= set(world.NONSENSE_WORDS)
        for image_path in [p for p, _ in ep["support"]] + [ep["question_image"]]:
            assert tf.io.decode_jpeg(image_path.read_bytes()).shape == (32, 32, 3)
        example = eval_files.episode_prompt(ep, layout, image_size=32, with_answer=True)
        assert example["images"].shape == (7, 32, 32, 3) and example["image_mask"].all()
        answer_ids = example["tokens"][example["loss_mask"]]
        assert layout.tokenizer.decode(answer_ids) == f" {ep['answer']}<|endoftext|>"


def test_single_object_config_draws_one_object_per_scene():
    single = next(c for c in shapes.FrozenShapes.BUILDER_CONFIGS if c.name == "64_single")
    default = next(c for c in shapes.FrozenShapes.BUILDER_CONFIGS if c.name == "64")
    counts = [len(shapes.scene_for(single, "train", i)[0].shapes) for i in range(50)]
    assert counts == [1] * 50
    assert {len(shapes.scene_for(default, "train", i)[0].shapes) for i in range(50)} == {1, 2, 3}
