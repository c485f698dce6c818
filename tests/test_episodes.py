"""Few-shot episode prompts and scoring on small generated episode files."""

import pytest

from frozenlm_jax.data import eval_files
from frozenlm_jax.eval import episodes

IMAGE_SIZE = 16


class Answerer:
    """A fake answerer: records its prompts; `answer(prompt)` gives each reply."""

    image_size = IMAGE_SIZE

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def generate(self, prompts, **kwargs):
        assert kwargs["max_new_tokens"] <= 8 and "." in kwargs["stop"]
        self.prompts += prompts
        return [self.answer(p) for p in prompts]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("episodes")
    for flavour in eval_files.FLAVOURS:
        eval_files.write_episodes(out, flavour, ways=2, shots=2, num_episodes=6, image_size=IMAGE_SIZE)
    return out


def test_prompt_alternates_images_and_captions(task_dir):
    path = episodes.episode_file(task_dir, "open_ended", ways=2, shots=2)
    episode = eval_files.read_episodes(path)[0]
    items = episodes.episode_items(episode, IMAGE_SIZE)
    assert len(items) == 2 * (len(episode["support"]) + 1) == 10
    for (image_path, caption), image, text in zip(episode["support"], items[0::2], items[1::2]):
        assert image == image_path and image.exists()  # the answerer preprocesses it as its encoder needs
        assert text == caption
    assert items[-2] == episode["question_image"]
    assert items[-1] == "Q: What is this? A: This is a"
    names = list(episode["names"])
    induced = episodes.episode_items(episode, IMAGE_SIZE, task_induction=True)
    assert induced[0] == f"Answer with {names[0]} or {names[1]}." and len(induced) == len(items) + 1
    assert [x for x in induced[1:] if isinstance(x, str)] == [x for x in items if isinstance(x, str)]
    blind = episodes.episode_items(episode, IMAGE_SIZE, blind=True)
    assert all(x.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and not x.any() for x in blind[0::2])
    assert episodes.task_induction_text(["dax", "blicket", "wug"]) == "Answer with dax, blicket or wug."


def test_fast_binding_names_change_per_episode(task_dir):
    path = episodes.episode_file(task_dir, "open_ended", ways=2, shots=2)
    name_sets = []
    for episode in eval_files.read_episodes(path):
        items = episodes.episode_items(episode, IMAGE_SIZE, task_induction=True, blind=True)
        said = {caption.removeprefix("This is a ").removesuffix(".") for caption in items[2:-1:2]}
        assert said == set(episode["names"]) and episode["answer"] in said
        assert all(name in items[0] for name in said)
        name_sets.append(frozenset(said))
    assert len(set(name_sets)) > 1
    real = eval_files.read_episodes(episodes.episode_file(task_dir, "real_name", ways=2, shots=2))
    assert all(name == kind for e in real for name, kind in e["names"].items())


@pytest.mark.parametrize("raw, word", [
    ("Dax.", "dax"), (" dax", "dax"), ("DAX!", "dax"), ("a blicket, I think", "blicket"), ("the Wug", "wug"),
    ("", ""),
])
def test_first_word_normalisation(raw, word):
    assert episodes.first_word(raw) == word


def test_oracle_scores_100_and_constant_scores_chance(task_dir):
    path = episodes.episode_file(task_dir, "open_ended", ways=2, shots=2)
    data = eval_files.read_episodes(path)
    truth = {e["question_image"]: e["answer"] for e in data}
    # The oracle answers in another casing and with punctuation: still right after normalisation.
    oracle = Answerer(lambda prompt: " " + truth[prompt[-2]].capitalize() + ". And more")
    result = episodes.evaluate_episodes(oracle, path, batch_size=4, progress=False)
    assert result["accuracy"] == 1.0 and len(result["predictions"]) == len(data)
    assert result["predictions"][0]["prediction"] == data[0]["answer"]
    assert (result["ways"], result["shots"], result["task_induction"]) == (2, 2, False)
    answers = [e["answer"] for e in data]
    common = max(set(answers), key=answers.count)
    constant = episodes.evaluate_episodes(Answerer(lambda prompt: common), path, progress=False)
    assert constant["accuracy"] == pytest.approx(answers.count(common) / len(data))
    wrong = episodes.evaluate_episodes(Answerer(lambda prompt: "toaster"), path, progress=False)
    assert wrong["accuracy"] == 0.0


def test_grid_covers_flavours_and_task_induction(task_dir):
    seen = Answerer(lambda prompt: "dax")
    rows = episodes.evaluate_episode_grid(seen, task_dir, ways=(2,), shots=(2,), blind=True, progress=False)
    assert [(r["flavour"], r["task_induction"]) for r in rows] == [
        ("real_name", False), ("real_name", True), ("open_ended", False), ("open_ended", True)]
    assert all(r["blind"] and 0 <= r["accuracy"] <= 1 and "predictions" not in r for r in rows)
    assert sum(isinstance(p[0], str) for p in seen.prompts) == 2 * 6  # the induced prompts open with text
    with pytest.raises(FileNotFoundError, match="eval_files"):
        episodes.episode_file(task_dir, "open_ended", ways=5, shots=1)
    with pytest.raises(ValueError, match="known: real_name, open_ended"):
        episodes.episode_file(task_dir, "fast_vqa", ways=2, shots=1)
