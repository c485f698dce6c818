"""Decoding on tiny random LMs: cache vs recomputation, left padding, beam search, sampling, stops, compilation."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_apply

from frozenlm_jax.decode import _argmax, _choose_tokens, _compiled_decode, _decoder, generate
from frozenlm_jax.models.lm import DecoderLM, LMConfig

LLAMA = LMConfig(family="llama", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=64, init_std=0.3)
GPT2 = LMConfig(family="gpt2", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                head_dim=8, intermediate_size=64, activation="gelu_new", max_position_embeddings=64,
                tie_word_embeddings=True, init_std=0.3)
PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1], [33, 34], [70, 1, 2, 3, 4, 5, 6]]


@pytest.fixture(scope="module", params=[LLAMA, GPT2], ids=["llama", "gpt2"])
def lm(request):
    cfg = request.param
    model = DecoderLM(cfg)
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


@pytest.fixture(scope="module")
def llama():
    model = DecoderLM(LLAMA)
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"])


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, ids):
    return jit_apply(model, {"params": params}, ids)


def full_logits(model, params, ids):
    """Logits [len(ids), V] of one sequence, recomputed without a cache (right-padded to a fixed 32)."""
    padded = np.zeros((1, 32), np.int32)
    padded[0, :len(ids)] = ids
    return np.asarray(forward(model, params, padded))[0, :len(ids)]


def sequence_logprob(model, params, prompt, continuation):
    logits = full_logits(model, params, prompt + continuation)
    logprobs = jax.nn.log_softmax(logits[len(prompt) - 1:-1])
    return float(sum(logprobs[i, t] for i, t in enumerate(continuation)))


def test_cached_decoding_matches_full_recomputation(lm):
    model, params = lm
    result = generate(model, params, PROMPTS[:2], 6, return_logits=True)
    for row, (prompt, tokens) in enumerate(zip(PROMPTS, result.tokens)):
        logits = full_logits(model, params, prompt + tokens)
        expected = logits[len(prompt) - 1:len(prompt) + 5, :model.config.vocab_size]
        np.testing.assert_allclose(result.step_logits[row, :, :model.config.vocab_size], expected, atol=1e-4)
        assert tokens == np.argmax(expected, -1).tolist()
        np.testing.assert_allclose(result.logprobs[row], sequence_logprob(model, params, prompt, tokens), atol=1e-4)
    assert result.stop_tokens == [None, None]


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_each_left_padded_row_equals_its_prompt_alone(llama, method):
    model, params = llama
    options = dict(method=method, num_beams=3, eos_id=7)
    batched = generate(model, params, PROMPTS, 8, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, params, [prompt], 8, **options)
        assert alone.tokens[0] == batched.tokens[row]
        assert alone.stop_tokens[0] == batched.stop_tokens[row]
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[row], rtol=1e-5)


@pytest.mark.parametrize("eos_id", [None, 23])
def test_beam_one_is_greedy_and_wider_beams_score_at_least_as_well(llama, eos_id):
    model, params = llama
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 100, rng.integers(2, 12)).tolist() for _ in range(6)]
    greedy = generate(model, params, prompts, 8, eos_id=eos_id)
    beam1 = generate(model, params, prompts, 8, method="beam", num_beams=1, eos_id=eos_id)
    assert beam1.tokens == greedy.tokens and beam1.stop_tokens == greedy.stop_tokens
    np.testing.assert_allclose(beam1.logprobs, greedy.logprobs, rtol=1e-6)
    beam4 = generate(model, params, prompts, 8, method="beam", num_beams=4, eos_id=eos_id)
    assert np.all(beam4.logprobs >= greedy.logprobs - 1e-5)
    assert np.any(beam4.logprobs > greedy.logprobs + 1e-3), "the wider beam should find a better sequence somewhere"
    for prompt, tokens, stop, logprob in zip(prompts, beam4.tokens, beam4.stop_tokens, beam4.logprobs):
        assert len(tokens) == 8 if stop is None else stop == eos_id
        ended = tokens + ([] if stop is None else [stop])
        np.testing.assert_allclose(logprob, sequence_logprob(model, params, prompt, ended), atol=1e-4)
    if eos_id is not None:
        assert any(stop == eos_id for stop in greedy.stop_tokens + beam4.stop_tokens)


def test_length_penalty_prefers_longer_hypotheses(llama):
    model, params = llama
    short = generate(model, params, PROMPTS, 8, method="beam", num_beams=4, eos_id=23, length_penalty=-2.0)
    long = generate(model, params, PROMPTS, 8, method="beam", num_beams=4, eos_id=23, length_penalty=2.0)
    assert sum(map(len, long.tokens)) >= sum(map(len, short.tokens))


def test_sampling_limits_and_reproducibility(llama):
    model, params = llama
    greedy = generate(model, params, PROMPTS, 8)
    cold = generate(model, params, PROMPTS, 8, method="sample", temperature=0.0, rng=jax.random.key(3))
    assert cold.tokens == greedy.tokens
    top1 = generate(model, params, PROMPTS, 8, method="sample", top_k=1, temperature=2.0, rng=jax.random.key(3))
    assert top1.tokens == greedy.tokens
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, rtol=1e-6)  # log-probs of the model, not of top-k
    first = generate(model, params, PROMPTS, 8, method="sample", rng=jax.random.key(5))
    again = generate(model, params, PROMPTS, 8, method="sample", rng=jax.random.key(5))
    other = generate(model, params, PROMPTS, 8, method="sample", rng=jax.random.key(6))
    assert first.tokens == again.tokens and first.tokens != other.tokens
    np.testing.assert_allclose(first.logprobs[0], sequence_logprob(model, params, PROMPTS[0], first.tokens[0]),
                               atol=1e-4)
    # A row's samples do not depend on the other rows of its batch.
    alone = generate(model, params, PROMPTS[:1], 8, method="sample", rng=jax.random.key(5))
    assert alone.tokens[0] == first.tokens[0]


def test_greedy_argmax_takes_the_first_of_ties():
    logits = np.random.default_rng(0).normal(size=(6, 1000)).astype(np.float32)
    logits[1, [3, 700]] = 50.0
    logits[2, :] = -np.inf
    logits[3, [999, 998]] = 50.0
    logits[4, 0] = logits[4].max() + 1
    logits[5, 5] = np.nan
    got = np.asarray(_argmax(jnp.asarray(logits)))
    np.testing.assert_array_equal(got[:5], np.argmax(logits[:5], -1))
    assert got.tolist()[1:4] == [3, 0, 998] and 0 <= got[5] < 1000


def test_top_p_and_top_k_keep_only_the_likeliest_tokens():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 1))
    draw = lambda **kw: np.bincount(np.asarray(_choose_tokens(  # noqa: E731
        "sample", logits, jax.random.key(0), jnp.float32(kw.get("temperature", 1.0)), kw.get("top_k", 0),
        jnp.float32(kw.get("top_p", 1.0)))), minlength=4) / len(logits)
    np.testing.assert_allclose(draw(), probs, atol=0.03)
    np.testing.assert_allclose(draw(top_p=0.7), [0.625, 0.375, 0, 0], atol=0.03)  # 0.5 + 0.3 reach 0.7
    np.testing.assert_allclose(draw(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.03)
    np.testing.assert_allclose(draw(top_p=0.2), [1, 0, 0, 0], atol=0)  # the first token always stays
    np.testing.assert_allclose(draw(top_k=2), [0.625, 0.375, 0, 0], atol=0.03)
    # top-p applies to the top-k distribution: within the top 3, the first two hold 0.8 / 0.95 = 0.84
    np.testing.assert_allclose(draw(top_k=3, top_p=0.81), [0.625, 0.375, 0, 0], atol=0.03)


def test_stop_tokens_cut_the_output(llama):
    model, params = llama
    free = generate(model, params, PROMPTS, 8, return_logits=True)
    stop = free.tokens[0][3]
    cut = generate(model, params, PROMPTS, 8, stop_ids=[stop], return_logits=True)
    for row, tokens in enumerate(free.tokens):
        end = tokens.index(stop) if stop in tokens else len(tokens)
        assert cut.tokens[row] == tokens[:end]
        assert cut.stop_tokens[row] == (stop if stop in tokens else None)
        ended = tokens[:end + 1]
        logprobs = jax.nn.log_softmax(free.step_logits[row, :len(ended)])
        np.testing.assert_allclose(cut.logprobs[row], sum(logprobs[i, t] for i, t in enumerate(ended)), rtol=1e-5)
    beam = generate(model, params, PROMPTS, 8, method="beam", num_beams=3, stop_ids=[stop, free.tokens[1][0]])
    assert all(stop not in tokens and free.tokens[1][0] not in tokens for tokens in beam.tokens)


def test_a_new_prompt_of_the_same_bucket_does_not_recompile(llama):
    model, params = llama
    decode = _decoder(model.config)
    generate(model, params, [[1, 2, 3], [4, 5]], 5, method="sample", rng=jax.random.key(0))
    compiled = decode._cache_size()
    generate(model, params, [[9] * 12, [8, 7, 6, 5]], 5, method="sample", rng=jax.random.key(1), temperature=0.5,
             top_p=0.9, eos_id=3, stop_ids=[4, 5])
    assert decode._cache_size() == compiled
    generate(model, params, [[9] * 17, [8]], 5, method="sample", rng=jax.random.key(1))  # the next length bucket
    assert decode._cache_size() == compiled + 1


def test_decoding_compiles_dots_with_xnnpack_only_in_float32_on_cpu():
    assert _decoder(LLAMA) is _compiled_decode(xnnpack_dots=jax.default_backend() == "cpu")
    assert _decoder(dataclasses.replace(LLAMA, dtype="bfloat16")) is _compiled_decode(xnnpack_dots=False)


@pytest.mark.parametrize("options, message", [
    (dict(method="nucleus"), "unknown decoding method 'nucleus'; supported: greedy, beam, sample"),
    (dict(method="sample"), r"needs rng=jax.random.key\(seed\)"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(stop_ids=[100]), r"stop token ids \[100\] are outside the vocabulary \[0, 100\)"),
    (dict(method="beam", num_beams=0), r"num_beams=0; beam search needs 1 <= num_beams <= 64"),
])
def test_bad_options_are_clear_errors(llama, options, message):
    model, params = llama
    with pytest.raises(ValueError, match=message):
        generate(model, params, [[1, 2]], 4, **options)
