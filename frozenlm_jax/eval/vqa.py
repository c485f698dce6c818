"""VQAv2 / OKVQA evaluation: the official answer normalisation and accuracy, and 0-, 1- and few-shot prompting.

Reads the official question and annotation JSON files plus a local image folder. Prompts follow the paper:
`[img_1, "Question: q1 Answer: a1", ..., img, "Question: q Answer:"]`, with in-context examples drawn from a
train split; answers are short greedy continuations. Accuracies are fractions in [0, 1].

The answerer is any object with `.image_size` and `.generate(prompts, max_new_tokens=..., stop=...) ->
list[str]` (such as `FrozenLM`, which preprocesses them as its encoder needs); images are passed as their files'
paths. The blind variant passes zeros of shape [S, S, 3] instead (the mean image after normalisation).
`ShapesVQA` and `OfficialVQA` are the evaluators of `frozenlm_jax.eval.suite` (shapes_vqa; vqav2, okvqa).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from frozenlm_jax import paths
from frozenlm_jax.data import eval_files
from frozenlm_jax.eval.task import Column, Evaluator, answerer, data_cache

# Image file names, formatted with the question's `image_id`.
SHAPES_IMAGES = "{image_id:012d}.png"  # eval_files.write_vqa
COCO_TRAIN2014 = "COCO_train2014_{image_id:012d}.jpg"  # VQAv2 / OKVQA train
COCO_VAL2014 = "COCO_val2014_{image_id:012d}.jpg"  # VQAv2 / OKVQA val

STOP = ["\n", "."]

# --- The official evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, a013f00) ---
# Reproduced with its quirks, which published numbers include (docs/evaluation.md lists them); tested
# differentially against the official script on 400 cases (tests/data/vqa_official_cases.json).

# Its contraction map, entry for entry (keys with capitals never match: the text is lower-cased first).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped as a look-ahead that always holds,
# so a period not followed by a digit goes; and `re.UNICODE` lands in `sub`'s count: at most 32 of them go.
PERIOD_STRIP = re.compile(r"\.(?!\d)")
PERIODS_STRIPPED = int(re.UNICODE)
COMMA_STRIP = re.compile(r"\d,\d")  # a digit-comma-digit anywhere: punctuation is deleted, not spaced


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: each mark is deleted if it touches a space in the text (or the text has a
    digit-comma-digit), else replaced by a space; then up to 32 periods not followed by a digit go."""
    out = text
    delete = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return PERIOD_STRIP.sub("", out, count=PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words to digits, articles dropped, contractions mapped."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """An answer as the official evaluation compares it when the human answers disagree."""
    return process_digit_article(process_punctuation(_clean(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy: the mean over the leave-one-annotator-out subsets of min(#matches / 3, 1).

    As in the official script, newlines and tabs become spaces and ends are stripped; then, only when the human
    answers disagree, the answers and the prediction are normalised (`normalize_answer`). When all agree,
    prediction and answers are compared as they are ("two" does not match ten "2"; "Yes" does not match "yes").
    """
    if not answers:
        raise ValueError("a question needs at least one human answer to be scored")
    answers, predicted = [_clean(a) for a in answers], _clean(prediction)
    if len(set(answers)) > 1:
        answers, predicted = [normalize_answer(a) for a in answers], normalize_answer(predicted)
    matches = [a == predicted for a in answers]
    total = sum(matches)
    return float(np.mean([min((total - m) / 3, 1.0) for m in matches]))


# --- Data ---


@dataclasses.dataclass(frozen=True)
class VQAQuestion:
    """One question with its human answers; `answer` is `multiple_choice_answer` (VQAv2) or, where the file has
    none (OKVQA), the most common human answer."""

    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...]
    answer: str
    answer_type: str
    question_type: str
    image_path: os.PathLike  # an epath.Path: local or gs://


def load_vqa(questions_file, annotations_file, image_dir, image_pattern: str = SHAPES_IMAGES) -> list[VQAQuestion]:
    """The questions of an official questions/annotations JSON pair, in the questions file's order.

    `image_pattern` names each image file in `image_dir` from its `image_id`: `SHAPES_IMAGES` for
    `eval_files.write_vqa`, `COCO_VAL2014` / `COCO_TRAIN2014` for VQAv2 and OKVQA.
    """
    questions = json.loads(paths.path(questions_file).read_text())["questions"]
    annotations_json = json.loads(paths.path(annotations_file).read_text())
    if "annotations" not in annotations_json:
        raise ValueError(f"{annotations_file} has no 'annotations' list; pass the official annotations file")
    annotations = {a["question_id"]: a for a in annotations_json["annotations"]}
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotations]
    if missing:
        raise ValueError(f"{len(missing)} questions of {questions_file} (e.g. question_id {missing[0]}) have no "
                         f"annotation in {annotations_file}; pass the annotations of the same split")
    out = []
    for q in questions:
        a = annotations[q["question_id"]]
        answers = tuple(x["answer"] for x in a["answers"])
        out.append(VQAQuestion(
            question_id=q["question_id"], image_id=q["image_id"], question=q["question"], answers=answers,
            answer=a.get("multiple_choice_answer") or Counter(answers).most_common(1)[0][0],
            answer_type=a.get("answer_type", "unknown"), question_type=a.get("question_type", "unknown"),
            image_path=paths.path(image_dir) / image_pattern.format(image_id=q["image_id"]),
        ))
    return out


def score_vqa(predictions: Mapping[int, str], questions: Sequence[VQAQuestion]) -> dict:
    """Overall and per-answer-type accuracy of `predictions` (question_id -> answer text) over `questions`.

    Per answer type is the mean of per-question accuracies (the official script there averages only each
    question's last leave-one-out subset, a slip that leaves the overall accuracy unaffected).
    """
    absent = [q.question_id for q in questions if q.question_id not in predictions]
    if absent:
        raise ValueError(f"no prediction for {len(absent)} questions (e.g. question_id {absent[0]})")
    if not questions:
        raise ValueError("no questions to score")
    per_question = {q.question_id: vqa_accuracy(predictions[q.question_id], q.answers) for q in questions}
    by_type = defaultdict(list)
    for q in questions:
        by_type[q.answer_type].append(per_question[q.question_id])
    return {
        "accuracy": float(np.mean(list(per_question.values()))),
        "per_answer_type": {t: float(np.mean(v)) for t, v in sorted(by_type.items())},
        "per_question": per_question,
    }


# --- Prompting ---


def draw_examples(question: VQAQuestion, train: Sequence[VQAQuestion], shots: int, seed: int) -> list[VQAQuestion]:
    """`shots` distinct in-context examples from `train`, fixed by (`seed`, the question's id)."""
    if shots > len(train):
        raise ValueError(f"shots={shots} but the train split has only {len(train)} questions")
    rng = np.random.default_rng([seed, question.question_id])
    return [train[i] for i in rng.choice(len(train), size=shots, replace=False)]


def vqa_prompt(question: VQAQuestion, examples: Sequence[VQAQuestion], image_size: int, blind: bool = False) -> list:
    """`[img_1, "Question: q1 Answer: a1", ..., img, "Question: q Answer:"]`, images as paths; `blind` puts zeros
    in every image."""
    items: list = []
    for example in examples:
        items += [_image(example.image_path, image_size, blind),
                  f"Question: {example.question} Answer: {example.answer}"]
    return items + [_image(question.image_path, image_size, blind), f"Question: {question.question} Answer:"]


def _image(path: os.PathLike, image_size: int, blind: bool):
    if blind:
        return np.zeros((image_size, image_size, 3), np.float32)
    if not path.exists():
        raise FileNotFoundError(f"image {path} not found; check the image folder and image_pattern "
                                f"(e.g. {COCO_VAL2014!r} for COCO val2014, {SHAPES_IMAGES!r} for shapes)")
    return path


def short_answer(text: str) -> str:
    """A generation up to its first newline, sentence-ending period (a period inside a number stays) or the
    prompt's next field ("Question:", "Answer:"), which a model that does not stop writes next."""
    return re.split(r"\n|\.(?!\d)|\b(?:Question|Answer):", text, maxsplit=1)[0].strip()


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def evaluate_vqa(
    answerer,
    questions: Sequence[VQAQuestion],
    train: Sequence[VQAQuestion] = (),
    shots: int = 0,
    seed: int = 0,
    blind: bool = False,
    max_new_tokens: int = 5,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """`score_vqa` of the answerer's greedy answers with `shots` examples from `train`, plus the answers.

    `blind` blanks every image (query and examples) to zeros: the paper's blind baseline.
    """
    if shots < 0:
        raise ValueError(f"shots={shots} must be >= 0")
    if shots and not train:
        raise ValueError(f"shots={shots} needs in-context examples: pass train= (load_vqa of the train split)")
    predictions = {}
    for batch in tqdm(list(_batches(questions, batch_size)), desc=f"VQA {shots}-shot", disable=not progress):
        prompts = [vqa_prompt(q, draw_examples(q, train, shots, seed), answerer.image_size, blind) for q in batch]
        outputs = answerer.generate(prompts, max_new_tokens=max_new_tokens, stop=STOP)
        if len(outputs) != len(prompts):
            raise ValueError(f"the answerer returned {len(outputs)} answers for {len(prompts)} prompts")
        predictions.update({q.question_id: short_answer(o) for q, o in zip(batch, outputs)})
    return {**score_vqa(predictions, questions), "predictions": predictions, "shots": shots, "blind": blind}


def prior_answers(questions: Sequence[VQAQuestion]) -> dict[str, str]:
    """{question type: its most frequent answer among `questions`} (ties: the first seen)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        by_type[q.question_type][q.answer] += 1
    return {t: counts.most_common(1)[0][0] for t, counts in by_type.items()}


class _VQA(Evaluator):
    """Columns "<task> <k>-shot" for k in `eval.vqa_shots`; the data is loaded on first use."""

    descriptions: dict | None = None  # {image path: scene text}, for the text oracle

    def __init__(self, name, settings, image_size):
        super().__init__(name, settings, image_size)
        self._data = None

    def columns(self) -> list[Column]:
        return [Column(f"{self.name} {k}-shot", self.name, self.name, k) for k in self.settings.vqa_shots]

    def data(self) -> tuple[list[VQAQuestion], list[VQAQuestion]]:
        """(questions, in-context pool), loaded once."""
        if self._data is None:
            self._data = self._load()
        return self._data

    def chance(self) -> dict[str, float]:
        """Always answering the most frequent answer of the question's type (among the evaluated questions)."""
        questions = self.data()[0]
        prior = prior_answers(questions)
        accuracy = score_vqa({q.question_id: prior[q.question_type] for q in questions}, questions)["accuracy"]
        return {c.name: accuracy for c in self.columns()}

    def _run(self, model, mode: str) -> dict:
        questions, train = self.data()
        if mode == "text_oracle" and self.descriptions is None:
            return self.not_applicable(f"{self.name} images have no ground-truth text")
        s, out = self.settings, {}
        for shots in s.vqa_shots:
            found = evaluate_vqa(answerer(model, mode, self.descriptions), questions, train, shots, s.seed,
                                 batch_size=s.batch_size)
            examples = [{"question": q.question, "answer": q.answer, "prediction": found["predictions"][q.question_id]}
                        for q in questions[:4]]
            out[f"{self.name} {shots}-shot"] = (found["accuracy"], {
                "questions": len(questions), "per_answer_type": found["per_answer_type"], "examples": examples})
        return out


QUESTIONS_PER_IMAGE = 3  # of eval_files.write_vqa


class ShapesVQA(_VQA):
    """VQA on generated shapes-world scenes (`eval_files.write_vqa`, cached in `data_cache()`): questions from
    seed `eval.seed`, in-context examples from seed + 1; the text oracle reads each image's scene text."""

    def _load(self):
        s, size = self.settings, self.image_size
        images = math.ceil(s.num_examples / QUESTIONS_PER_IMAGE)
        train_images = max(images, math.ceil(max(s.vqa_shots, default=0) / QUESTIONS_PER_IMAGE))
        sets, self.descriptions = [], {}
        for seed, count in ((s.seed, images), (s.seed + 1, train_images)):
            directory = data_cache() / f"shapes_{size}" / f"vqa_v2_seed{seed}_images{count}"
            if not (directory / "objects.json").exists():  # written last
                print(f"writing shapes VQA (seed {seed}, {count} images) to {directory}")
                eval_files.write_vqa(directory, count, size, seed)
            questions = load_vqa(directory / "questions.json", directory / "annotations.json", directory / "images",
                                 SHAPES_IMAGES)
            scenes = json.loads((directory / "objects.json").read_text())
            self.descriptions.update({q.image_path: scenes[str(q.image_id)]["description"] for q in questions})
            sets.append(questions)
        return sets[0][:s.num_examples], sets[1]


# Official file names in DATA_DIR/<task>/, formatted with split = "train" or "val"; images in
# DATA_DIR/<task>/<split>2014/ (COCO's own folders; a symlink to one shared copy will do).
OFFICIAL_FILES = {
    "vqav2": ("v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json"),
    "okvqa": ("OpenEnded_mscoco_{split}2014_questions.json", "mscoco_{split}2014_annotations.json"),
}


class OfficialVQA(_VQA):
    """VQAv2 or OKVQA from the official files in `eval.data_dir/<task>/` (layout of `OFFICIAL_FILES`):
    `eval.num_examples` val questions drawn with `eval.seed` (0: all), in-context examples from train."""

    def _load(self):
        s = self.settings
        directory = paths.path(s.data_dir) / self.name  # local or gs://
        paths.preflight(directory)

        def split(name: str, pattern: str):
            questions, annotations = (directory / f.format(split=name) for f in OFFICIAL_FILES[self.name])
            for path in (questions, annotations, directory / f"{name}2014"):
                if not path.exists():
                    raise FileNotFoundError(f"{path} not found: task {self.name!r} expects {directory} to hold "
                                            f"{questions.name}, {annotations.name} and the images in {name}2014/")
            return load_vqa(questions, annotations, directory / f"{name}2014", pattern)

        questions = _subset(split("val", COCO_VAL2014), s.num_examples, s.seed)
        train = split("train", COCO_TRAIN2014) if any(s.vqa_shots) else []
        return questions, train


def _subset(questions: list, count: int, seed: int) -> list:
    """`count` questions drawn without replacement (in file order), or all when count is 0 or too large."""
    if count <= 0 or count >= len(questions):
        return questions
    chosen = np.random.default_rng(seed).choice(len(questions), size=count, replace=False)
    return [questions[i] for i in sorted(chosen)]
