"""Autoregressive decoding with the KV cache: greedy, beam search and sampling.

One prefill, then one-token steps under `lax.while_loop`. Prompts of different lengths are left-padded
into one batch (positions are counted over real tokens), and prompt lengths are rounded up to a bucket,
so each (length bucket, batch, max_new_tokens, method) compiles once. Every method returns the tokens
and the sequence log-probability under the model (sum of the generated tokens' log-probs, the stopping
token included), so callers can rank.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from frozenlm_jax.models.lm import DecoderLM, LMConfig, init_cache
from frozenlm_jax.parallel import known_cpu_options, to_host

LENGTH_BUCKET = 16
METHODS = ("greedy", "beam", "sample")


def bucket_length(length: int, bucket: int = LENGTH_BUCKET) -> int:
    """`length` rounded up to a multiple of `bucket`."""
    return -(-length // bucket) * bucket


def left_pad(prompts: list[list[int]], pad_id: int, bucket: int = LENGTH_BUCKET):
    """ids int32 [B, T] and mask bool [B, T], prompts right-aligned, T rounded up to `bucket`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = bucket_length(max(len(p) for p in prompts), bucket)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return ids, mask


@dataclasses.dataclass
class Generation:
    """Decoded continuations, one per prompt.

    tokens: generated ids, cut before the token that stopped the row.
    stop_tokens: that token (EOS or a stop id), or None where `max_new_tokens` ended the row.
    logprobs: float32 [B], sum of the model's log-probs of the generated tokens, the stop token
        included (with temperature, top-k or top-p too: always the unmodified model's distribution).
    step_logits: float32 [B, max_new_tokens, padded_vocab], the logits each token was chosen from
        (only with `return_logits=True`; rows are undefined after they stop).
    """

    tokens: list[list[int]]
    stop_tokens: list[int | None]
    logprobs: np.ndarray
    step_logits: np.ndarray | None = None


def length_penalty_factor(length, alpha):
    """GNMT's ((5 + length) / 6) ** alpha; beam hypotheses are ranked by log-prob / this (alpha 0: none)."""
    return ((5.0 + length) / 6.0) ** alpha


def _argmax(logits):
    """`argmax` over the last axis (the first of ties) as two plain reductions: XLA:CPU's argmax, one
    reduction over (value, index) pairs, took 2.0-2.2 ms for [16, 49152] logits, this 0.7-1.1 ms."""
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    first_best = jnp.min(jnp.where(logits == logits.max(-1, keepdims=True), ids, logits.shape[-1]), axis=-1)
    return jnp.minimum(first_best, logits.shape[-1] - 1)  # a NaN row has no best


def _choose_tokens(method, logits, key, temperature, top_k, top_p):
    """Next tokens [B] from logits [B, V]: argmax, or a sample after temperature, top-k and top-p."""
    greedy = _argmax(logits)
    if method == "greedy":
        return greedy
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # top-p: keep the most likely tokens until their mass reaches top_p (the first always stays).
    ordered = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where((top_p < 1.0) & (scaled < threshold), -jnp.inf, scaled)
    # One key per row, so a row's sample does not depend on the rest of the batch.
    keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(jnp.arange(logits.shape[0]))
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def _on_rows(cache, fn):
    """`fn(array, batch_axis)` on every batch-indexed entry of the cache (see `init_cache` for its layouts)."""
    kv = {n: jax.tree.map(lambda x: fn(x, x.ndim - 4), cache[n]) for n in ("k", "v")}
    return dict(cache, **kv, mask=fn(cache["mask"], 0), next_position=fn(cache["next_position"], 0))


def _reorder_cache(cache, rows):
    """The cache's batch rows `rows` (beam parents)."""
    return _on_rows(cache, lambda x, axis: jnp.take(x, rows, axis=axis))


def _repeat_cache(cache, times):
    return _on_rows(cache, lambda x, axis: jnp.repeat(x, times, axis=axis))


def _decode(params, embeds, mask, stop_mask, pad_id, key, temperature, top_p, length_penalty, *, config,
            method, max_new_tokens, num_beams, top_k, return_logits):
    """(tokens [B, N], logprobs [B], lengths [B], stopped [B], step logits or None); see `generate_from_embeddings`."""
    model = DecoderLM(config)
    batch, length = mask.shape
    cache = init_cache(config, batch, length + max_new_tokens)
    hidden, cache = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                return_hidden=True)
    logits = model.apply({"params": params}, hidden[:, -1], method=DecoderLM.logits)

    def extend(tokens, cache):
        out, cache = model.apply({"params": params}, tokens[:, None], cache=cache)
        return out[:, -1], cache

    if method == "beam":
        return _beam_search(extend, logits, cache, stop_mask, pad_id, length_penalty, batch, num_beams,
                            max_new_tokens) + (None,)

    def body(state):
        step, out, logprobs, lengths, done, cache, logits, seen = state
        token = _choose_tokens(method, logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        token_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, token)
        logprobs = logprobs + jnp.where(done, 0.0, token_logprob)
        lengths = jnp.where(done, lengths, step + 1)
        if return_logits:
            seen = seen.at[:, step].set(logits)
        done = done | stop_mask[token]
        logits, cache = extend(token, cache)
        return step + 1, out.at[:, step].set(token), logprobs, lengths, done, cache, logits, seen

    def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[4])

    seen = jnp.zeros((batch, max_new_tokens, logits.shape[-1]) if return_logits else (), jnp.float32)
    state = (jnp.int32(0), jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros(batch, jnp.float32),
             jnp.zeros(batch, jnp.int32), jnp.zeros(batch, bool), cache, logits, seen)
    _, out, logprobs, lengths, done, _, _, seen = jax.lax.while_loop(cond, body, state)
    return out, logprobs, lengths, done, seen if return_logits else None


def _beam_search(extend, logits, cache, stop_mask, pad_id, alpha, batch, width, max_new_tokens):
    """Beam search keeping `width` live hypotheses per row; returns the best by log-prob / length penalty.

    Each step ranks the 2·width best extensions: a stopping one among the first `width` becomes a
    finished hypothesis (so width 1 is exactly greedy), the best `width` others stay live. The loop ends
    early once no live hypothesis can beat a row's best finished one.
    """
    vocab = logits.shape[-1]
    n = max_new_tokens
    cache = _repeat_cache(cache, width)
    logits = jnp.repeat(logits, width, axis=0)
    neg = jnp.float32(-jnp.inf)
    live_seq = jnp.full((batch, width, n), pad_id, jnp.int32)
    live_lp = jnp.full((batch, width), neg).at[:, 0].set(0.0)  # only beam 0 expands at the first step
    done_seq = jnp.full((batch, width, n), pad_id, jnp.int32)
    done_score, done_lp = jnp.full((batch, width), neg), jnp.full((batch, width), neg)
    done_len = jnp.zeros((batch, width), jnp.int32)

    def gather(x, index):
        """x [B, K, ...] at index [B, K'] along axis 1."""
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def body(state):
        step, live_seq, live_lp, done_seq, done_score, done_lp, done_len, cache, logits = state
        candidates = live_lp[:, :, None] + jax.nn.log_softmax(logits).reshape(batch, width, vocab)
        top_lp, top_index = jax.lax.top_k(candidates.reshape(batch, width * vocab), 2 * width)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        seq = gather(live_seq, parent).at[:, :, step].set(token)
        stops = stop_mask[token]
        # Finished: stopping extensions ranked among the first `width`, merged with those found earlier.
        finishing = stops & (jnp.arange(2 * width) < width)[None]
        new_score = jnp.where(finishing, top_lp / length_penalty_factor(step + 1, alpha), neg)
        merged = jnp.concatenate([done_score, new_score], axis=1)
        done_score, keep = jax.lax.top_k(merged, width)
        done_seq = gather(jnp.concatenate([done_seq, seq], axis=1), keep)
        done_lp = gather(jnp.concatenate([done_lp, top_lp], axis=1), keep)
        done_len = gather(jnp.concatenate([done_len, jnp.full((batch, 2 * width), step + 1)], axis=1), keep)
        # Live: the best `width` extensions that did not stop.
        live_lp, keep = jax.lax.top_k(jnp.where(stops, neg, top_lp), width)
        live_seq, parent, token = gather(seq, keep), gather(parent, keep), gather(token, keep)
        rows = (jnp.arange(batch)[:, None] * width + parent).reshape(-1)
        logits, cache = extend(token.reshape(-1), _reorder_cache(cache, rows))
        return step + 1, live_seq, live_lp, done_seq, done_score, done_lp, done_len, cache, logits

    def best_possible(step, live_lp):
        """An upper bound on the score of any hypothesis that extends a live one (log-probs only fall)."""
        factor = jnp.maximum(length_penalty_factor(step + 1, alpha), length_penalty_factor(n, alpha))
        return jnp.max(live_lp, axis=1) / factor

    def cond(state):
        step, _, live_lp, _, done_score = state[:5]
        settled = jnp.max(done_score, axis=1) >= best_possible(step, live_lp)
        return (step < n) & ~jnp.all(settled)

    state = (jnp.int32(0), live_seq, live_lp, done_seq, done_score, done_lp, done_len, cache, logits)
    step, live_seq, live_lp, done_seq, done_score, done_lp, done_len, _, _ = jax.lax.while_loop(cond, body, state)
    # Hypotheses still live at max_new_tokens compete with the finished ones (an early exit means none can win).
    live_score = jnp.where(step == n, live_lp / length_penalty_factor(n, alpha), neg)
    scores = jnp.concatenate([done_score, live_score], axis=1)
    best = jnp.argmax(scores, axis=1)[:, None]
    seqs = gather(jnp.concatenate([done_seq, live_seq], axis=1), best)[:, 0]
    logprobs = gather(jnp.concatenate([done_lp, live_lp], axis=1), best)[:, 0]
    lengths = gather(jnp.concatenate([done_len, jnp.full((batch, width), n)], axis=1), best)[:, 0]
    return seqs, logprobs, lengths, best[:, 0] < width


# XLA:CPU's default library for dots, YNNPACK, ran decoding's small-batch float32 matmuls at about half
# XNNPACK's rate on a 2-core AMD EPYC (60 [16, 576] x [576, 1536] matmuls: 52 against 29 ms; greedy SmolLM2 at
# batch 16: 83 against 118-130 tok/s, the same tokens; batch 1 unchanged, 24.5 against 25.8). Scratch timings.
# In bfloat16, XNNPACK's dots held a float32 copy of the weights (SmolLM2 at batch 1: peak RSS 1,709 against
# 933 MiB), so bfloat16 keeps the default.
_CPU_DECODE_OPTIONS = (("xla_cpu_experimental_xnn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
                       ("xla_cpu_experimental_ynn_fusion_type", ""))
_STATIC_ARGS = ("config", "method", "max_new_tokens", "num_beams", "top_k", "return_logits")


@functools.cache
def _compiled_decode(xnnpack_dots: bool):
    """`_decode` under jit, with `_CPU_DECODE_OPTIONS` if `xnnpack_dots`."""
    options = known_cpu_options(_CPU_DECODE_OPTIONS) if xnnpack_dots else None
    return jax.jit(_decode, static_argnames=_STATIC_ARGS, compiler_options=options or None)


def _decoder(config: LMConfig):
    """The jitted `_decode` for `config`: XNNPACK dots on CPU in float32."""
    return _compiled_decode(xnnpack_dots=jax.default_backend() == "cpu" and config.dtype == "float32")


def stop_mask_for(config: LMConfig, eos_id: int | None, stop_ids: Iterable[int] = ()) -> np.ndarray:
    """bool [padded_vocab]: the ids that end a row (EOS and `stop_ids`)."""
    ids = list(stop_ids) + ([] if eos_id is None else [eos_id])
    bad = [i for i in ids if not 0 <= int(i) < config.vocab_size]
    if bad:
        raise ValueError(f"stop token ids {bad} are outside the vocabulary [0, {config.vocab_size})")
    mask = np.zeros(config.padded_vocab_size, bool)
    mask[np.asarray(ids, np.int64)] = True
    return mask


def generate_from_embeddings(config: LMConfig, params, embeds, mask, max_new_tokens: int, *,
                             method: str = "greedy", eos_id: int | None = None, stop_ids: Iterable[int] = (),
                             pad_id: int = 0, num_beams: int = 4, length_penalty: float = 0.0,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rng=None,
                             return_logits: bool = False) -> Generation:
    """Continue left-padded prompt embeddings [B, T, D] (mask bool [B, T], real tokens right-aligned).

    method: "greedy"; "beam" (`num_beams` hypotheses, ranked by log-prob / ((5 + len) / 6) ** length_penalty,
        len counting the generated tokens with the stop token); or "sample" (with `rng`, a `jax.random.key`:
        logits / `temperature` (0: greedy), then the `top_k` best (0: all), then the smallest set of those
        with mass `top_p` in their renormalised distribution). A row stops at EOS, at any of `stop_ids`
        (e.g. newline ids) or after `max_new_tokens`.
    Shapes (B, T), `max_new_tokens`, `method`, `num_beams`, `top_k` and `return_logits` select the
    compiled program; the other arguments are traced values and never recompile it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; supported: {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; generate at least 1 token")
    if method == "sample" and rng is None:
        raise ValueError("method='sample' needs rng=jax.random.key(seed)")
    if method == "beam" and not 1 <= num_beams <= config.padded_vocab_size // 2:
        raise ValueError(f"num_beams={num_beams}; beam search needs 1 <= num_beams <= {config.padded_vocab_size // 2}")
    if method == "beam" and return_logits:
        raise ValueError("return_logits is for greedy and sampling; beam search has no single step distribution")
    if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature < 0:
        raise ValueError(f"top_p={top_p} must be in (0, 1], top_k={top_k} >= 0 (0: off), temperature={temperature} "
                         ">= 0 (0: greedy)")
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or tuple(embeds.shape[:2]) != mask.shape:
        raise ValueError(f"mask {mask.shape} must be [B, T] as embeds {tuple(embeds.shape)} [B, T, D]")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the LM's "
                         f"{config.max_position_embeddings} positions; shorten the prompt or max_new_tokens")
    key = jax.random.key(0) if rng is None else rng
    out, logprobs, lengths, stopped, seen = _decoder(config)(
        params, embeds, jnp.asarray(mask), jnp.asarray(stop_mask_for(config, eos_id, stop_ids)), jnp.int32(pad_id),
        key, jnp.float32(temperature), jnp.float32(top_p), jnp.float32(length_penalty), config=config,
        method=method, max_new_tokens=max_new_tokens, num_beams=num_beams if method == "beam" else 1,
        top_k=top_k if method == "sample" else 0, return_logits=return_logits)
    out, lengths, stopped = to_host(out), to_host(lengths), to_host(stopped)
    tokens = [row[: n - s].tolist() for row, n, s in zip(out, lengths, stopped)]
    stop_tokens = [int(row[n - 1]) if s else None for row, n, s in zip(out, lengths, stopped)]
    return Generation(tokens, stop_tokens, to_host(logprobs), None if seen is None else to_host(seen))


def generate(model: DecoderLM, params, prompts: list[list[int]], max_new_tokens: int, **options) -> Generation:
    """Continue token-id prompts of any lengths (left-padded into one batch); options as in
    `generate_from_embeddings`."""
    ids, mask = left_pad(prompts, options.get("pad_id", 0))
    embeds = model.apply({"params": params}, ids, method=DecoderLM.embed)
    return generate_from_embeddings(model.config, params, embeds, mask, max_new_tokens, **options)


def greedy_from_embeddings(config: LMConfig, params, embeds, mask, max_new_tokens: int, eos_id: int | None,
                           pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of left-padded prompt embeddings [B, T, D] (mask [B, T]), each cut before EOS."""
    return generate_from_embeddings(config, params, embeds, mask, max_new_tokens, eos_id=eos_id,
                                    pad_id=pad_id).tokens


def greedy_generate(model: DecoderLM, params, prompts: list[list[int]], max_new_tokens: int,
                    eos_id: int | None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut before its first EOS."""
    return generate(model, params, prompts, max_new_tokens, eos_id=eos_id, pad_id=pad_id).tokens
