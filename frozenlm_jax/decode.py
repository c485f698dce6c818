"""Autoregressive decoding with the KV cache: one prefill, then one-token steps under `lax.while_loop`.

Prompts of different lengths are left-padded into one batch (positions are counted over real tokens),
and prompt lengths are rounded up to a bucket so each bucket compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from frozenlm_jax.models.lm import DecoderLM, LMConfig, init_cache

LENGTH_BUCKET = 16


def left_pad(prompts: list[list[int]], pad_id: int, bucket: int = LENGTH_BUCKET):
    """ids int32 [B, T] and mask bool [B, T], prompts right-aligned, T rounded up to `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return ids, mask


@functools.lru_cache(maxsize=32)
def _greedy_fn(config: LMConfig, max_new_tokens: int):
    model = DecoderLM(config)

    @jax.jit
    def run(params, embeds, mask, eos_id, pad_id):
        batch, length = mask.shape
        cache = init_cache(config, batch, length + max_new_tokens)
        hidden, cache = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                    return_hidden=True)
        first = jnp.argmax(model.apply({"params": params}, hidden[:, -1], method=DecoderLM.logits), -1)
        out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

        def cond(state):
            step, _, _, done = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, out, cache, done = state
            last = out[:, step - 1]
            logits, cache = model.apply({"params": params}, last[:, None], cache=cache)
            token = jnp.where(done, pad_id, jnp.argmax(logits[:, -1], -1)).astype(jnp.int32)
            return step + 1, out.at[:, step].set(token), cache, done | (token == eos_id)

        state = (jnp.int32(1), out, cache, first == eos_id)
        return jax.lax.while_loop(cond, body, state)[1]

    return run


def greedy_from_embeddings(config: LMConfig, params, embeds, mask, max_new_tokens: int, eos_id: int | None,
                           pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of left-padded prompt embeddings [B, T, D] (mask [B, T]), each cut before EOS.

    This is how a Frozen prompt (visual prefixes among token embeddings) is continued.
    """
    eos = -1 if eos_id is None else eos_id
    out = np.asarray(_greedy_fn(config, max_new_tokens)(params, embeds, jnp.asarray(mask), eos, pad_id))
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


def greedy_generate(model: DecoderLM, params, prompts: list[list[int]], max_new_tokens: int,
                    eos_id: int | None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut before its first EOS."""
    ids, mask = left_pad(prompts, pad_id)
    embeds = model.apply({"params": params}, ids, method=DecoderLM.embed)
    return greedy_from_embeddings(model.config, params, embeds, mask, max_new_tokens, eos_id, pad_id)
