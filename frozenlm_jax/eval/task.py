"""The evaluator interface shared by `python -m frozenlm_jax.evaluate` and the trainer's in-loop evaluation.

An evaluator is built from its task name, the `eval` settings (see `frozenlm_jax.config`) and the model's
image size; it names its `columns()` and `run(model, mode)` gives {column: (accuracy or None, details)}.
`frozenlm_jax.eval.suite.EVALUATORS` registers them by name: a new task is one module and one entry there.

Modes (the rows of a report):
- "model": the model on the task's prompts;
- "blind": the same prompts with every image blanked (`FrozenLM.blind`);
- "lm_only": the frozen LM on the prompts' text alone (images dropped);
- "text_oracle": the frozen LM with every image replaced by the true text of its scene (tasks whose images
  have a ground truth; None elsewhere): what this LM could do with a visual prefix as good as words.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence

import ml_collections

from frozenlm_jax.data.batch import TextLayout
from frozenlm_jax.decode import generate
from frozenlm_jax.models.lm import DecoderLM
from frozenlm_jax.weights.registry import cache_dir

MODES = ("model", "blind", "lm_only", "text_oracle")
NOT_APPLICABLE = None


def data_cache() -> pathlib.Path:
    """Where generated shapes-world evaluation files go: `$FROZENLM_CACHE/eval_data`, else
    `~/.cache/frozenlm_jax/eval_data`."""
    return cache_dir() / "eval_data"


@dataclasses.dataclass(frozen=True)
class Column:
    """One accuracy column: `series` is its line in the accuracy-vs-shots plot (shots None: not plotted)."""

    name: str
    task: str
    series: str
    shots: int | None


class Evaluator:
    """One task. Subclasses set `columns()`, `chance()` and `_run(model, mode)`; `run` checks the mode."""

    def __init__(self, name: str, settings: ml_collections.ConfigDict, image_size: int):
        self.name, self.settings, self.image_size = name, settings, image_size

    def columns(self) -> list[Column]:
        raise NotImplementedError

    def chance(self) -> dict[str, float]:
        """{column: the accuracy of the task's stated chance answerer} (docs/evaluation.md defines each)."""
        raise NotImplementedError

    def run(self, model, mode: str = "model") -> dict[str, tuple[float | None, dict]]:
        """{column: (accuracy in [0, 1], or None where `mode` does not apply; details)} of a `FrozenLM`."""
        if mode not in MODES:
            raise ValueError(f"unknown evaluation mode {mode!r}; known: {', '.join(MODES)}")
        return self._run(model, mode)

    def _run(self, model, mode: str) -> dict:
        raise NotImplementedError

    def not_applicable(self, why: str) -> dict:
        return {c.name: (NOT_APPLICABLE, {"not_applicable": why}) for c in self.columns()}


def answerer(model, mode: str, descriptions: Mapping | None = None):
    """What answers the prompts in `mode`: the model, its blind copy, or its LM on text (`TextOnly`)."""
    if mode == "model":
        return model
    if mode == "blind":
        return model.blind()
    return TextOnly(model, descriptions if mode == "text_oracle" else None)


@dataclasses.dataclass
class TextOnly:
    """The LM of a `FrozenLM` alone: each image of a prompt is dropped (`descriptions` None) or replaced by
    `descriptions[image path]` (the text oracle), and the text parts are joined by spaces. Answers greedily
    (generating `max_new_tokens` and cutting at the first stop string gives the same text as stopping there)."""

    model: object
    descriptions: Mapping | None = None

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def _text(self, item) -> str | None:
        if isinstance(item, str):
            return item
        if self.descriptions is None:
            return None
        if item not in self.descriptions:
            raise ValueError(f"no ground-truth description of image {item!r} for the text oracle")
        return self.descriptions[item]

    def generate(self, prompts, max_new_tokens: int = 32, stop: Sequence[str] = ()) -> list[str]:
        tokenizer = self.model.tokenizer
        layout = TextLayout(tokenizer, 0, 0)
        texts = [" ".join(t for t in map(self._text, prompt) if t is not None) for prompt in prompts]
        ids = [layout.bos + tokenizer.encode(text, add_special_tokens=False) for text in texts]
        result = generate(DecoderLM(self.model.model.lm_config), self.model.params["lm"], ids, max_new_tokens,
                          eos_id=tokenizer.eos_id, pad_id=layout.pad_id)
        outputs = [tokenizer.decode(tokens) for tokens in result.tokens]
        return [text[:min([text.find(s) for s in stop if s in text], default=len(text))] for text in outputs]
