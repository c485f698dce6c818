"""`python -m frozenlm_jax.evaluate` on a configs/tiny.py run: the report's rows × columns,
its markdown tables and plot, the default output folder, and clear errors for bad task names and outputs;
the task suite's scores of a constant answerer on the generated data."""

import json
import shutil
from collections import Counter

import pytest
from conftest import tiny_config

from frozenlm_jax import evaluate
from frozenlm_jax.data.eval_files import read_episodes, write_episodes, write_vqa
from frozenlm_jax.eval.suite import TASKS, Suite
from frozenlm_jax.eval.vqa import load_vqa

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def eval_cache(tmp_path_factory, monkeypatch):
    """Generated evaluation files go to a temporary cache shared by this module's tests."""
    monkeypatch.setenv("FROZENLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """Two copies of the session's configs/tiny.py run (so each loads as its own row)."""
    first = tmp_path_factory.mktemp("runs") / "frozen_a"
    shutil.copytree(tiny_run[0], first)
    second = first.parent / "frozen_b"
    shutil.copytree(first, second)
    return first, second


class Constant:
    """An answerer that gives every prompt the same text."""

    image_size = 16

    def __init__(self, text):
        self.text = text

    def generate(self, prompts, max_new_tokens, stop):
        return [self.text] * len(prompts)

    def blind(self):
        return self


def test_suite_scores_a_constant_answer_at_its_rate_in_the_generated_data(tmp_path):
    settings = tiny_config(tmp_path).eval
    settings.num_examples = 12
    suite = Suite("shapes_vqa,fast_binding", settings, 16)
    vqa_dir = write_vqa(tmp_path / "vqa", 4, 16, seed=0)  # the suite's: 12 questions, 3 per image, seed 0
    answers = [q.answer for q in load_vqa(vqa_dir / "questions.json", vqa_dir / "annotations.json",
                                          vqa_dir / "images")]
    episodes = read_episodes(write_episodes(tmp_path / "episodes", "open_ended", 2, 1, 12, 16, seed=0))
    word = episodes[0]["answer"]
    common = Counter(answers).most_common(1)[0][0]
    expected_vqa = answers.count(common) / 12
    expected_binding = sum(e["answer"] == word for e in episodes) / 12
    assert 0 < expected_vqa < 1 and 0 < expected_binding < 1
    assert suite.evaluate(Constant(common))["scores"] == {
        "shapes_vqa 0-shot": expected_vqa, "shapes_vqa 1-shot": expected_vqa, "fast_binding 2-way 1-shot": 0.0}
    blind = suite.evaluate(Constant(f"{word}. Q:"), "blind")
    assert blind["scores"]["fast_binding 2-way 1-shot"] == expected_binding
    # Chance: VQA's most frequent answer per question type (no worse than one answer for all), 1 / ways.
    chance = suite.chance()
    assert chance["fast_binding 2-way 1-shot"] == 0.5
    assert expected_vqa <= chance["shapes_vqa 0-shot"] == chance["shapes_vqa 1-shot"] < 1


def test_text_oracle_replaces_every_image_by_its_scene_text(runs, monkeypatch, tmp_path):
    """The LM reads the scene's true text where each image stood (shapes VQA and episodes)."""
    from frozenlm_jax.eval import task
    from frozenlm_jax.export import load_frozen

    model = load_frozen(runs[0])
    seen = []

    def recording_generate(lm, params, ids, max_new_tokens, **options):
        seen.extend(model.tokenizer.decode(i) for i in ids)
        return generate(lm, params, ids, max_new_tokens, **options)

    generate = task.generate
    monkeypatch.setattr(task, "generate", recording_generate)
    settings = tiny_config(tmp_path).eval
    settings.update(num_examples=3, vqa_shots=(1,))
    found = Suite("shapes_vqa,fast_binding,shapes_captions", settings, 16).evaluate(model, "text_oracle")["scores"]
    assert found["shapes_captions colour"] is None and 0 <= found["shapes_vqa 1-shot"] <= 1
    vqa_prompt, episode_prompt = seen[0], seen[-1]
    assert vqa_prompt.count(" background Question: ") == 2, vqa_prompt  # the example's image and the query's
    assert episode_prompt.count(" background This is a ") == 2, episode_prompt
    assert episode_prompt.endswith("background Q: What is this? A: This is a"), episode_prompt


def test_report_of_two_runs_with_blind_rows_and_the_lm_alone(runs, tmp_path):
    first, second = runs
    out = tmp_path / "report"
    evaluate.main([f"--workdir={first}", f"--workdir={second}", f"--lm_only={first}", "--text_oracle",
                   f"--out={out}"])
    report = json.loads((out / "results.json").read_text())
    names = ["frozen_a", "frozen_a (blind)", "frozen_b", "frozen_b (blind)", "LM only (no images)",
             "text oracle (scene text for images)", "chance"]
    assert [r["name"] for r in report["rows"]] == names
    columns = ["shapes_captions colour", "shapes_captions shape", "shapes_vqa 0-shot", "shapes_vqa 1-shot",
               "fast_binding 2-way 1-shot", "real_name 2-way 1-shot"]
    assert [c["name"] for c in report["columns"]] == columns
    for row in report["rows"]:
        assert list(row["scores"]) == columns
        for column, score in row["scores"].items():
            if row["kind"] in ("lm_only", "text_oracle") and column.startswith("shapes_captions"):
                assert score is None  # nothing to caption without an image
            else:
                assert 0.0 <= score <= 1.0, (row["name"], column, score)
    chance = report["rows"][-1]["scores"]
    assert chance["fast_binding 2-way 1-shot"] == 0.5 and 0.1 < chance["shapes_captions shape"] < 0.5
    assert report["rows"][0]["scores"] == report["rows"][2]["scores"]  # the same run, the same data
    markdown = (out / "results.md").read_text()
    assert "## shapes_vqa\n\n| run | 0-shot | 1-shot |" in markdown
    assert "## fast_binding\n\n| run | 2-way 1-shot |" in markdown
    assert "| LM only (no images) | n/a | n/a |" in markdown and "| chance | 50.0 |" in markdown
    assert (out / "accuracy_vs_shots.png").read_bytes().startswith(PNG_MAGIC)


def test_one_workdir_writes_to_its_eval_folder_with_the_tasks_asked(runs):
    first, _ = runs
    evaluate.main([f"--workdir={first}", "--tasks=shapes_vqa,fast_binding", "--num_examples=5", "--shots=0,2",
                   "--ways=3"])
    report = json.loads((first / "eval" / "results.json").read_text())
    assert [c["name"] for c in report["columns"]] == ["shapes_vqa 0-shot", "shapes_vqa 2-shot",
                                                      "fast_binding 3-way 2-shot"]
    details = report["rows"][0]["details"]
    assert details["shapes_vqa 2-shot"]["questions"] == details["fast_binding 3-way 2-shot"]["episodes"] == 5
    assert [r["name"] for r in report["rows"]] == ["frozen_a", "frozen_a (blind)", "chance"]
    assert (first / "eval" / "accuracy_vs_shots.png").read_bytes().startswith(PNG_MAGIC)


def test_unknown_task_and_missing_out_are_clear_errors(runs):
    first, second = runs
    with pytest.raises(ValueError, match="unknown task\\(s\\) 'vqa3'; known: " + ", ".join(TASKS)):
        evaluate.main([f"--workdir={first}", "--tasks=shapes_vqa,vqa3"])
    with pytest.raises(ValueError, match="pass out=DIR \\(--out\\)"):
        evaluate.main([f"--workdir={first}", f"--workdir={second}"])
    with pytest.raises(ValueError, match="read the official files from eval.data_dir"):
        evaluate.main([f"--workdir={first}", "--tasks=vqav2"])
