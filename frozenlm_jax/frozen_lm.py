"""`FrozenLM`: a Frozen model ready to use on interleaved image and text prompts (`generate`, `score`).

A prompt is a list of items, each a string or an image: uint8 [H, W, 3] pixels of any size (preprocessed
here exactly like the training pipeline: centre square crop, resize to `image_size`, normalise to
[-1, 1]), a float32 [image_size, image_size, 3] array already preprocessed, or an image file's path (a
`pathlib.Path`; a str is text).
A list of prompts is a batch. `frozenlm_jax.load_frozen(path)` returns one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from frozenlm_jax.data.batch import TextLayout, stack
from frozenlm_jax.data.images import IMAGE_MEAN, IMAGE_STD, decode_image, preprocess_image
from frozenlm_jax.decode import bucket_length, generate_from_embeddings
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.parallel import to_host
from frozenlm_jax.tokenizer import Tokenizer

ANSWER_BUCKET = 8


@functools.partial(jax.jit, static_argnames="model")
def _embed(model: Frozen, params, batch):
    return model.apply({"params": params}, batch, method=Frozen.embed_inputs)


@functools.partial(jax.jit, static_argnames=("model", "answer_len"))
def _target_logprobs(model: Frozen, params, batch, mask, answer_len: int):
    """log p(tokens[t] | tokens[:t]) [B, answer_len] for the last `answer_len` positions of left-padded rows."""

    def run(module, batch, mask):
        hidden = module.lm(inputs_embeds=module.embed_inputs(batch), attention_mask=mask, return_hidden=True)
        return -module.lm.target_nll(hidden[:, -answer_len - 1:-1], batch["tokens"][:, -answer_len:])

    return model.apply({"params": params}, batch, mask, method=run)


def _is_batch(prompts) -> bool:
    """A batch is a non-empty list of prompts (lists); a single prompt is a list of str / image items."""
    if isinstance(prompts, (str, np.ndarray)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("a prompt is a list of str and image items, and a batch a non-empty list of prompts; "
                         f"got {type(prompts).__name__}")
    return all(isinstance(p, (list, tuple)) for p in prompts)


@dataclasses.dataclass
class FrozenLM:
    """A Frozen module with its params (`vision` and `lm`), tokenizer and image preprocessing.

    blank_images: replace every image by a blank one (zeros after normalisation, the mid-gray image)
        while keeping its prefix slots: the blind baseline of the same prompts (see `blind()`).
    """

    model: Frozen
    params: Any
    tokenizer: Tokenizer
    image_size: int
    blank_images: bool = False
    image_mean: tuple[float, float, float] = IMAGE_MEAN  # on [0, 1] pixels, as in PipelineConfig
    image_std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self):
        # Host arrays (as loaded from safetensors) go to the device once, not at every call.
        self.params = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, self.params)
        self._stop_ids: dict[str, tuple[int, ...]] = {}
        # Params spread over several processes (a multi-host trainer's): every process passes the same prompts
        # and places its own rows of the inputs on its devices.
        self._spread_mesh = next((leaf.sharding.mesh for leaf in jax.tree.leaves(self.params)
                                  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable), None)

    def _rows(self, prompts: list) -> list:
        """`prompts`, with copies of the first added up to a multiple of the devices when params are spread."""
        if self._spread_mesh is None:
            return prompts
        return prompts + [prompts[0]] * (-len(prompts) % self._spread_mesh.size)

    def _place(self, inputs: dict):
        """Inputs as the model takes them: when params are spread, global arrays split by rows over every device,
        each process filling its own rows."""
        if self._spread_mesh is None:
            return inputs
        rows = NamedSharding(self._spread_mesh, PartitionSpec(self._spread_mesh.axis_names))
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, rows, lambda index: x[index]), inputs)

    def blind(self) -> "FrozenLM":
        """The same model with every image blanked (mid-gray), for blind baselines."""
        return dataclasses.replace(self, blank_images=True)

    def preprocess(self, image) -> np.ndarray:
        """One prompt image as the model takes it: float32 [image_size, image_size, 3]."""
        size = (self.image_size, self.image_size, 3)
        if isinstance(image, os.PathLike):
            image = decode_image(image)
        array = np.asarray(image)
        if np.issubdtype(array.dtype, np.floating):
            if array.shape != size:
                raise ValueError(f"a float image must be preprocessed already, of shape {size}; got {array.shape}. "
                                 "Pass uint8 pixels to have it resized and normalised")
            return np.zeros(size, np.float32) if self.blank_images else array.astype(np.float32)
        if not np.issubdtype(array.dtype, np.integer) or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"an image must be uint8 pixels [H, W, 3] or a preprocessed float32 {size}; got "
                             f"{array.dtype} {array.shape}")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer pixels must lie in [0, 255]; got {array.min()}..{array.max()}")
        if self.blank_images:
            return np.zeros(size, np.float32)
        return preprocess_image(array.astype(np.uint8), self.image_size, self.image_mean, self.image_std)

    def _batch(self, prompts: list, answers: list[str] | None = None):
        """The batch contract, left-padded to a length bucket, and the real-token mask [B, T]."""
        n = self.model.num_prefix_tokens
        items = [[p if isinstance(p, str) else self.preprocess(p) for p in prompt] for prompt in prompts]
        answers = [None] * len(items) if answers is None else answers
        bos = TextLayout(self.tokenizer, 0, n).bos
        lengths = []
        for prompt, answer in zip(items, answers):
            length = len(bos) + sum(len(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str)
                                    else n for p in prompt)
            if answer is not None:
                length += len(self.tokenizer.encode(" " + answer, add_special_tokens=False)) + 1
            lengths.append(length)
        layout = TextLayout(self.tokenizer, bucket_length(max(lengths)), n)
        max_images = max(sum(not isinstance(p, str) for p in prompt) for prompt in items)
        batch = stack([layout.prompt(p, max_images, answer=a, pad_left=True) for p, a in zip(items, answers)])
        mask = np.arange(layout.max_len)[None] >= layout.max_len - np.asarray(lengths)[:, None]
        return batch, mask, layout

    def generate(self, prompts, max_new_tokens: int = 32, method: str = "greedy",
                 stop: Sequence[str | int] | str = (), *, num_beams: int = 4, length_penalty: float = 0.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rng=None,
                 return_logprobs: bool = False):
        """Continuations (list[str], one per prompt; a single prompt gives a list of one) of a prompt or a batch.

        stop: strings or token ids besides EOS that end a continuation. A string stops decoding at the first
            token whose text contains it and the text is cut before it; an id stops at that token, which is
            left out. method and its options: see `frozenlm_jax.decode.generate_from_embeddings` (sampling
            needs `rng=jax.random.key(seed)`). return_logprobs: also return each continuation's log-prob
            under the model (float32 [B], the stopping token included).
        """
        batch = prompts if _is_batch(prompts) else [prompts]
        stop = [stop] if isinstance(stop, (str, int)) else list(stop or ())
        strings = [s for s in stop if isinstance(s, str)]
        if any(s == "" for s in strings):
            raise ValueError("an empty stop string would stop at once; remove it")
        eos = self.tokenizer.eos_id
        string_ids = {i for s in strings for i in self._tokens_containing(s)} - {eos}
        stop_ids = string_ids | {int(s) for s in stop if not isinstance(s, str)}
        inputs, mask, layout = self._batch(self._rows(batch))
        embeds = _embed(self.model, self.params, self._place(inputs))
        result = generate_from_embeddings(
            self.model.lm_config, self.params["lm"], embeds, mask, max_new_tokens, method=method,
            eos_id=eos, stop_ids=sorted(stop_ids), pad_id=layout.pad_id, num_beams=num_beams,
            length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
        texts = []
        for tokens, stopped_by in zip(result.tokens, result.stop_tokens):
            text = self.tokenizer.decode(tokens + ([stopped_by] if stopped_by in string_ids else []))
            cut = min([text.find(s) for s in strings if s in text], default=len(text))
            texts.append(text[:cut])
        texts, logprobs = texts[:len(batch)], result.logprobs[:len(batch)]
        return (texts, logprobs) if return_logprobs else texts

    def score(self, prompts, answers, eos: bool = True) -> np.ndarray:
        """Log-likelihood (float32 [B]) of each answer continuing its prompt: the sum over " answer" tokens.

        The answer follows the prompt after one space, as in training prompts (`TextLayout.prompt`); with `eos`
        the EOS that ends it counts too. One prompt with a list of answers scores each against that prompt.
        """
        if _is_batch(prompts):
            if isinstance(answers, str) or len(answers) != len(prompts):
                raise ValueError(f"a batch of {len(prompts)} prompts needs a list of as many answers")
        else:
            answers = [answers] if isinstance(answers, str) else list(answers)
            prompts = [prompts] * len(answers)
        count, answers = len(prompts), list(answers)
        inputs, mask, _ = self._batch(self._rows(prompts), self._rows(answers))
        length = inputs["tokens"].shape[1]
        answer_len = min(bucket_length(int(inputs["loss_mask"].sum(axis=1).max()), ANSWER_BUCKET), length - 1)
        weights = inputs["loss_mask"][:, -answer_len:].copy()
        if not eos:
            weights[:, -1] = False  # every row's answer ends with EOS at the last position
        logprobs = to_host(_target_logprobs(self.model, self.params, self._place(inputs), mask, answer_len))
        return (logprobs * weights).sum(axis=1)[:count]

    def _tokens_containing(self, text: str) -> tuple[int, ...]:
        """Every token id of the LM's vocabulary whose decoded text contains `text` (cached)."""
        if text not in self._stop_ids:
            vocab = min(self.tokenizer.vocab_size, self.model.lm_config.vocab_size)
            pieces = self.tokenizer.backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
            self._stop_ids[text] = tuple(i for i, piece in enumerate(pieces) if text in piece)
        return self._stop_ids[text]
