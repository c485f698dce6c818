"""VQA accuracy against the official evaluation (worked by hand), VQA prompting, and BLEU-4 / CIDEr-D against
pycocoevalcap."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_reference

from frozenlm_jax.data import eval_files
from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.eval import caption_metrics, vqa

IMAGE_SIZE = 16


class Recorder:
    """A fake answerer: records its prompts; `answer(prompt)` gives each reply."""

    image_size = IMAGE_SIZE

    def __init__(self, answer=lambda prompt: "yes"):
        self.answer, self.prompts, self.kwargs = answer, [], []

    def generate(self, prompts, **kwargs):
        self.prompts += prompts
        self.kwargs.append(kwargs)
        return [self.answer(p) for p in prompts]


# --- the official normalisation and accuracy ---


@pytest.mark.parametrize("raw, normalised", [
    ("yes?", "yes"), ("red!", "red"),  # punctuation next to no space becomes a space, then whitespace collapses
    ("red , blue", "red blue"),  # punctuation touching a space is deleted
    ("(Red)", "red"),  # brackets, and lowercase
    ("mcdonald's", "mcdonald's"), ("2:30", "2:30"),  # the apostrophe and the colon are not punctuation here
    ("t-shirt", "t shirt"),  # the hyphen is
    ("Two", "2"), ("none", "0"), ("ten", "10"),  # number words become digits
    ("the red one", "red 1"), ("a/b", "b"),  # articles go (after punctuation made "a b")
    ("dont know", "don't know"), ("isnt", "isn't"),  # the contraction map
    ("1,000", "1000"), ("10,000 people?", "10000 people"),  # a thousands comma: all punctuation deleted
    ("yes.", "yes"), ("3.5", "3.5"), ("u.s.", "us"),  # periods go unless a digit follows
    ("." * 40 + "x", "." * 8 + "x"),  # but at most 32 of them (the official `sub` gets re.UNICODE as its count)
    (" red\nblue\t", "red blue"),  # newlines and tabs are spaces, ends stripped
])
def test_normalisation_rules(raw, normalised):
    assert vqa.normalize_answer(raw) == normalised


def _write_vqa_json(directory, rows):
    """rows: (answer_type, [10 human answers]) -> official-format files without `multiple_choice_answer` (as
    OKVQA's); returns the loaded questions."""
    questions = [{"image_id": i, "question": f"question {i}?", "question_id": 100 + i} for i in range(len(rows))]
    annotations = [{"question_id": 100 + i, "image_id": i, "question_type": "what", "answer_type": t,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(answers)]}
                   for i, (t, answers) in enumerate(rows)]
    (directory / "q.json").write_text(json.dumps({"questions": questions}))
    (directory / "a.json").write_text(json.dumps({"annotations": annotations}))
    return vqa.load_vqa(directory / "q.json", directory / "a.json", directory / "images")


def test_accuracy_matches_the_official_script():
    """400 cases (the issue's three, then answers like real ones: case, punctuation, articles, number words,
    contractions, agreeing and disagreeing annotators) scored by the official script itself (GT-Vision-Lab/VQA,
    PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00, its prints ported to Python 3, every answer with its
    own answer_id); the values it gave are the data."""
    cases = json.loads((Path(__file__).parent / "data" / "vqa_official_cases.json").read_text())
    assert len(cases) >= 300
    got = [vqa.vqa_accuracy(c["prediction"], c["answers"]) for c in cases]
    mismatches = [(c, g) for c, g in zip(cases, got) if abs(g - c["official"]) > 1e-12]
    assert not mismatches, mismatches[:5]
    assert got[:3] == [0.0, 1.0, 1.0]  # "two" vs ten "2"; "new york" vs "New York"/"nyc"; "red!" vs "red"/"red!"


def test_official_accuracy_worked_by_hand(tmp_path):
    # Each row: a rule, the human answers, the prediction, and the accuracy over the 10 leave-one-out subsets
    # of 9 annotators, min(matches / 3, 1) each, averaged by hand.
    cases = [
        ("other", ["yes"] * 10, "yes?", 0.0),  # the humans agree: nothing is normalised, "yes?" != "yes"
        ("number", ["2"] * 2 + ["3"] * 8, "Two", (8 * 2 / 3 + 2 * 1 / 3) / 10),  # digits: 2 of 10 -> 0.6
        ("other", ["dog"] * 3 + ["cat"] * 7, "a dog", (7 * 1 + 3 * 2 / 3) / 10),  # articles: 3 of 10 -> 0.9
        ("other", ["don't know"] + ["no"] * 9, "dont know", (9 * 1 / 3 + 1 * 0) / 10),  # contraction: 0.3
        ("number", ["1000"] * 10, "1,000", 0.0),  # the humans agree: the comma stays
        ("number", ["3.5"] * 4 + ["4"] * 6, "3.5.", 1.0),  # period strip; 4 of 10: >= 3 in every subset
        ("other", ["mcdonald's"] * 5 + ["burger king"] * 5, "McDonald's", 1.0),  # disagreeing humans: all
        # answers and the prediction are normalised, lower-casing included
        ("yes/no", ["Yes"] * 10, "yes", 0.0),  # humans agree: compared as given, so "Yes" != "yes"
        ("number", ["0"] * 10, "none", 0.0),  # humans agree: "none" is not turned into "0"
        ("other", ["red"] * 10, "blue", 0.0),
    ]
    questions = _write_vqa_json(tmp_path, [(t, answers) for t, answers, _, _ in cases])
    assert questions[1].answer == "3" and questions[3].answer == "no"  # the most common human answer
    for q, (_, answers, prediction, expected) in zip(questions, cases):
        assert vqa.vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12), (prediction, answers)
    result = vqa.score_vqa({q.question_id: c[2] for q, c in zip(questions, cases)}, questions)
    expected = [c[3] for c in cases]
    assert result["accuracy"] == pytest.approx(np.mean(expected))
    assert result["per_answer_type"] == pytest.approx({
        "number": np.mean([0.6, 0.0, 1.0, 0.0]), "other": np.mean([0.0, 0.9, 0.3, 1.0, 0.0]), "yes/no": 0.0})
    with pytest.raises(ValueError, match="no prediction for 1 questions"):
        vqa.score_vqa({q.question_id: "yes" for q in questions[1:]}, questions)


def test_short_answer():
    assert vqa.short_answer(" red.\nQuestion: what") == "red"
    assert vqa.short_answer("3.5 meters") == "3.5 meters"
    assert vqa.short_answer("two\nthree") == "two"
    assert vqa.short_answer(" red Answer: blue Answer") == "red"
    assert vqa.short_answer("yes Question: Is there") == "yes"
    assert vqa.short_answer("Answers vary") == "Answers vary"


# --- VQA prompting on the shapes VQA files ---


@pytest.fixture(scope="module")
def shapes_vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    splits = {}
    for split, seed, count in (("val", 0, 8), ("train", 1, 4)):
        out = eval_files.write_vqa(root / split, num_images=count, image_size=IMAGE_SIZE, seed=seed)
        splits[split] = vqa.load_vqa(out / "questions.json", out / "annotations.json", out / "images")
    return splits


def _oracle(questions):
    """Answers from the query image and question, looked up in the true annotations."""
    table = {(q.image_path, q.question): q.answer for q in questions}
    return Recorder(lambda prompt: " " + table[prompt[-2], prompt[-1][len("Question: "):-len(" Answer:")]])


def test_oracle_scores_100_and_constant_scores_chance(shapes_vqa):
    val, train = shapes_vqa["val"], shapes_vqa["train"]
    for shots in (0, 2):
        result = vqa.evaluate_vqa(_oracle(val), val, train, shots=shots, batch_size=5, progress=False)
        assert result["accuracy"] == 1.0 and set(result["per_answer_type"].values()) == {1.0}
    # The shapes annotations have 10 identical answers, so a constant answer scores its frequency, overall and
    # per answer type; and, as in the official evaluation of unanimous answers, nothing is normalised: "Two"
    # (the answerer cuts at the period) is not "2".
    answers = [q.answer for q in val]
    common = max(set(answers), key=answers.count)
    assert 0 < answers.count(common) < len(val)  # the fixture can tell chance from 0 and 100%
    result = vqa.evaluate_vqa(Recorder(lambda p: " " + common), val, progress=False)
    assert result["accuracy"] == pytest.approx(answers.count(common) / len(val))
    for answer_type, accuracy in result["per_answer_type"].items():
        of_type = [q.answer for q in val if q.answer_type == answer_type]
        assert accuracy == pytest.approx(of_type.count(common) / len(of_type))
    assert "2" in answers and vqa.evaluate_vqa(Recorder(lambda p: " Two."), val, progress=False)["accuracy"] == 0.0


def test_prompts_examples_and_blind(shapes_vqa):
    val, train = shapes_vqa["val"], shapes_vqa["train"]
    shots = 2
    seen = Recorder()
    result = vqa.evaluate_vqa(seen, val[:3], train, shots=shots, seed=7, batch_size=2, progress=False)
    assert len(seen.prompts) == 3 and result["predictions"] == {q.question_id: "yes" for q in val[:3]}
    assert seen.kwargs[0]["max_new_tokens"] <= 8 and "\n" in seen.kwargs[0]["stop"]
    train_texts = {f"Question: {t.question} Answer: {t.answer}" for t in train}
    for q, prompt in zip(val, seen.prompts):
        assert len(prompt) == 2 * (shots + 1)
        assert all(x.exists() for x in prompt[::2])  # image paths: the answerer preprocesses them
        assert all(t in train_texts for t in prompt[1:-1:2])
        assert prompt[-1] == f"Question: {q.question} Answer:"
        assert prompt[-2] == q.image_path
    # Example draws are fixed by the seed, and differ between seeds.
    again, other = Recorder(), Recorder()
    vqa.evaluate_vqa(again, val[:3], train, shots=shots, seed=7, progress=False)
    vqa.evaluate_vqa(other, val[:3], train, shots=shots, seed=8, progress=False)
    def texts(recorder):
        return [[x for x in p if isinstance(x, str)] for p in recorder.prompts]

    assert texts(again) == texts(seen) and texts(other) != texts(seen)
    # Blind: the same text, every image zeros.
    blind = Recorder()
    vqa.evaluate_vqa(blind, val[:3], train, shots=shots, seed=7, blind=True, progress=False)
    assert texts(blind) == texts(seen)
    assert all(not x.any() and x.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for p in blind.prompts for x in p[::2])


def test_vqa_errors(shapes_vqa, tmp_path):
    val = shapes_vqa["val"]
    with pytest.raises(ValueError, match="pass train="):
        vqa.evaluate_vqa(Recorder(), val, shots=1, progress=False)
    moved = [vqa.VQAQuestion(**{**vars(q), "image_path": tmp_path / "nowhere.png"}) for q in val[:1]]
    with pytest.raises(FileNotFoundError, match="image_pattern"):
        vqa.evaluate_vqa(Recorder(), moved, progress=False)
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({"questions": [{"image_id": 5, "question": "q?", "question_id": 10**9}]}))
    with pytest.raises(ValueError, match="have no annotation"):
        vqa.load_vqa(questions, val[0].image_path.parent.parent / "annotations.json", tmp_path)


# --- captioning metrics against pycocoevalcap ---


@pytest.fixture(scope="module")
def coco():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        missing_reference("pycocoevalcap is not installed (pip install -e '.[test]')")
    return Bleu, Cider


def _caption_fixture():
    """10 shapes images x 4-5 reference captions; hypotheses: own captions, other images', cut and padded."""
    refs, hyps = {}, {}
    for i in range(10):
        scene = world.sample_scene(np.random.default_rng([11, i]))
        refs[f"img{i}"] = world.captions(scene, np.random.default_rng([11, i, 1]), 5)
    keys = list(refs)
    for i, key in enumerate(keys):
        own, other = refs[key][i % len(refs[key])], refs[keys[(i + 1) % 10]][0]
        hyps[key] = [own, other, " ".join(own.split()[:3]), own + " with a shape", "a shape"][i % 5]
    return refs, hyps


def test_bleu_and_cider_d_match_pycocoevalcap(coco):
    Bleu, Cider = coco
    refs, hyps = _caption_fixture()
    # The same pre-tokenised text into both (coco-caption tokenises with Java first; see the next test).
    bleus, _ = Bleu(4).compute_score(refs, {k: [h] for k, h in hyps.items()}, verbose=0)
    assert caption_metrics.bleu(refs, hyps, tokenized=True) == pytest.approx(bleus[3], abs=1e-9)
    assert caption_metrics.bleu(refs, hyps, max_n=2, tokenized=True) == pytest.approx(bleus[1], abs=1e-9)
    score, per_image = Cider().compute_score(refs, {k: [h] for k, h in hyps.items()})
    assert caption_metrics.cider_d(refs, hyps, tokenized=True) == pytest.approx(score, abs=1e-9)
    ours = caption_metrics.cider_d_scores(refs, hyps, tokenized=True)
    np.testing.assert_allclose([ours[k] for k in refs], per_image, atol=1e-9)
    # Sanity: a perfect corpus and the limits of the implementation.
    exact = {k: r[0] for k, r in refs.items()}
    assert caption_metrics.bleu(refs, exact) == pytest.approx(1.0)
    assert caption_metrics.bleu(refs, {k: "zebra" for k in refs}) == 0.0
    with pytest.raises(ValueError, match="same images"):
        caption_metrics.cider_d(refs, {"img0": "a"})


CAPTIONS = [
    "A man's dog (black) is running.", 'Two people don\'t "like" it!', "A black-and-white photo, of 3.5 cats; hmm...",
    "The U.S. flag at 5 p.m. -- wow", "it's 1,000 dollars & $5 cats' toys", "Can't won't I'm we'll they've he'd",
    "a {curly} [square] photo: yes?", "'quoted' `back` word-word -- end", "The cat.The dog", "e-mail 10:30 50% a/b",
    "I  am   here\tnow", "o'clock ma'am", "cannot gonna wanna", "A little girl holding a kite on the beach.",
]


def test_tokenizer_matches_coco_caption_ptb(coco):
    if shutil.which("java") is None:
        missing_reference("java is needed to run coco-caption's Stanford PTBTokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    reference = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    for i, caption in enumerate(CAPTIONS):
        assert " ".join(caption_metrics.tokenize(caption)) == reference[i][0], caption
    # End to end on raw captions: our tokenizer + metrics == Java PTB + pycocoevalcap.
    Bleu, Cider = coco
    refs, hyps = _caption_fixture()
    raw_refs = {k: [r.capitalize() + "." for r in v] for k, v in refs.items()}
    raw_hyps = {k: h.upper() + "!" for k, h in hyps.items()}
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in raw_refs.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": h}] for k, h in raw_hyps.items()})
    assert caption_metrics.cider_d(raw_refs, raw_hyps) == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert caption_metrics.bleu(raw_refs, raw_hyps) == pytest.approx(Bleu(4).compute_score(gts, res, 0)[0][3], abs=1e-9)
