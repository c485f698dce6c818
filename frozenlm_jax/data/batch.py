"""The batch contract shared by data, model, trainer and evaluators, framework-free (numpy; no TensorFlow).

A batch is a dict of arrays: `tokens` int32 [B, T] (text ids, with n placeholder slots where each image's
prefix goes), `images` float32 [B, K, H, W, 3] (up to K preprocessed images per example), `image_mask` bool
[B, K] (which image slots are real), `image_positions` int32 [B, K] (the index in `tokens` of each image's first
slot) and `loss_mask` bool [B, T] (True where `tokens[t]` is a target, predicted from position t - 1).
docs/architecture.md describes it in full.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from frozenlm_jax.tokenizer import Tokenizer

CONTRACT_FIELDS = ("tokens", "images", "image_mask", "image_positions", "loss_mask")


class TextLayout:
    """Places text and image placeholder slots on the token axis, following the LM's own special tokens.

    BOS leads the sequence only if the tokenizer itself adds one; EOS ends every caption and is a target;
    the pad id (which may equal EOS) fills the rest and the placeholder slots, and is excluded only by
    `loss_mask`.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, num_prefix: int):
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos_id; captions must end with EOS (set Tokenizer.eos_id)")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.num_prefix = num_prefix
        self.pad_id = tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id
        adds_bos = tokenizer.bos_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_id]
        self.bos = [tokenizer.bos_id] if adds_bos else []

    def caption(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
        """`[BOS?] [slot × n] caption EOS pad…`: tokens, loss_mask (caption and EOS) and the image position.

        A caption too long for `max_len` is cut, EOS included, so the model never learns to stop early.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_id]
        head = self.bos + [self.pad_id] * self.num_prefix
        ids = ids[: self.max_len - len(head)]
        tokens = np.full(self.max_len, self.pad_id, np.int32)
        tokens[: len(head)] = head
        tokens[len(head) : len(head) + len(ids)] = ids
        loss_mask = np.zeros(self.max_len, bool)
        loss_mask[len(head) : len(head) + len(ids)] = True
        return tokens, loss_mask, len(self.bos)

    def prompt(
        self, parts: Sequence[str | np.ndarray], max_images: int, answer: str | None = None, pad_left: bool = False
    ) -> dict[str, np.ndarray]:
        """One example of interleaved images (preprocessed float32[H, W, 3]) and text, in the batch contract.

        Text parts are tokenised as given (no spaces added); `answer`, if given, follows as " answer" EOS and
        is the only target; without it nothing is a target and the model continues the prompt. `pad_left`
        puts the padding first, for batched decoding.
        """
        images = [p for p in parts if not isinstance(p, str)]
        if not images:
            raise ValueError("a prompt needs at least one image part")
        if len(images) > max_images:
            raise ValueError(f"the prompt has {len(images)} images but max_images={max_images}; raise max_images")
        tokens, targets, positions = list(self.bos), [False] * len(self.bos), []
        for part in parts:
            if isinstance(part, str):
                ids = self.tokenizer.encode(part, add_special_tokens=False)
                tokens, targets = tokens + ids, targets + [False] * len(ids)
            else:
                positions.append(len(tokens))
                tokens, targets = tokens + [self.pad_id] * self.num_prefix, targets + [False] * self.num_prefix
        if answer is not None:
            ids = self.tokenizer.encode(" " + answer, add_special_tokens=False) + [self.tokenizer.eos_id]
            tokens, targets = tokens + ids, targets + [True] * len(ids)
        if len(tokens) > self.max_len:
            raise ValueError(f"the prompt needs {len(tokens)} tokens but max_len={self.max_len}; raise max_len")
        offset = self.max_len - len(tokens) if pad_left else 0
        out_tokens = np.full(self.max_len, self.pad_id, np.int32)
        out_tokens[offset : offset + len(tokens)] = tokens
        loss_mask = np.zeros(self.max_len, bool)
        loss_mask[offset : offset + len(tokens)] = targets
        image_array = np.zeros((max_images, *images[0].shape), np.float32)
        image_array[: len(images)] = np.stack(images)
        image_positions = np.zeros(max_images, np.int32)
        image_positions[: len(images)] = np.asarray(positions) + offset
        return {
            "tokens": out_tokens,
            "images": image_array,
            "image_mask": np.arange(max_images) < len(images),
            "image_positions": image_positions,
            "loss_mask": loss_mask,
        }


def stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batch from single examples of the same layout (e.g. prompts of one few-shot task)."""
    return {k: np.stack([e[k] for e in examples]) for k in CONTRACT_FIELDS}


def make_global_batch(batch: dict[str, np.ndarray], mesh, data_axis: str | tuple[str, ...] = "data") -> dict:
    """Per-host numpy batch -> global `jax.Array`s whose batch axis is sharded over `data_axis` of `mesh`."""
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
