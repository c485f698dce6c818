"""The LM module on tiny random configs: cache, scan, padding, dtypes, head, decoding."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_apply

from frozenlm_jax.decode import greedy_generate
from frozenlm_jax.models import lm as lm_module
from frozenlm_jax.models.lm import (DecoderLM, LMConfig, RopeScaling, _write_in_place, accumulating_dot_general,
                                    head_cross_entropy, init_cache)

LLAMA = LMConfig(family="llama", vocab_size=100, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=96, rope_theta=500.0,
                 rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 32))
GPT2 = LMConfig(family="gpt2", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                head_dim=16, intermediate_size=128, activation="gelu_new", max_position_embeddings=64,
                tie_word_embeddings=True)
MISTRAL = LLAMA.replace(sliding_window=4, rope_scaling=None)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg, seed=0):
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(DecoderLM(cfg).init(jax.random.key(seed), ids)["params"])
    # Perturb every leaf (norm scales and biases included) so no parameter is trivially neutral.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def random_ids(shape, vocab=100, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2, MISTRAL], ids=["llama", "gpt2", "mistral"])
def test_kv_cache_matches_full_recompute(cfg):
    params = init_params(cfg)
    model = DecoderLM(cfg)
    ids = random_ids((2, 11))
    full = jit_apply(model, {"params": params}, ids)
    cache = init_cache(cfg, 2, 16)
    prefill, cache = jit_apply(model, {"params": params}, ids[:, :7], cache=cache)
    steps = [prefill]
    for t in range(7, 11):
        logits, cache = jit_apply(model, {"params": params}, ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)
    assert int(cache["index"]) == 11 and cache["next_position"].tolist() == [11, 11]


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_scan_layers_matches_unrolled(cfg):
    params = init_params(cfg)
    layers = [params.pop(f"layers_{i}") for i in range(cfg.num_layers)]
    scanned = dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
    unrolled = dict(params, **{f"layers_{i}": layer for i, layer in enumerate(layers)})
    ids = random_ids((2, 9))
    expected = jit_apply(DecoderLM(cfg), {"params": unrolled}, ids)
    got = jit_apply(DecoderLM(cfg.replace(scan_layers=True)), {"params": scanned}, ids)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    cache = init_cache(cfg.replace(scan_layers=True), 2, 12)
    _, cache = jit_apply(DecoderLM(cfg.replace(scan_layers=True)), {"params": scanned}, ids[:, :8], cache=cache)
    step, _ = jit_apply(DecoderLM(cfg.replace(scan_layers=True)), {"params": scanned}, ids[:, 8:], cache=cache)
    np.testing.assert_allclose(step[:, 0], expected[:, 8], atol=2e-5)
    with pytest.raises(ValueError, match="this cache is for scan_layers=False, the model has scan_layers=True"):
        jit_apply(DecoderLM(cfg.replace(scan_layers=True)), {"params": scanned}, ids, cache=init_cache(cfg, 2, 12))


def test_remat_does_not_change_logits():
    params = init_params(LLAMA)
    ids = random_ids((2, 9))
    expected = jit_apply(DecoderLM(LLAMA), {"params": params}, ids)
    for policy in ("full", "save_dots"):
        got = jit_apply(DecoderLM(LLAMA.replace(remat=policy)), {"params": params}, ids)
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_left_padding_with_counted_positions_matches_unpadded(cfg):
    params = init_params(cfg)
    model = DecoderLM(cfg)
    ids = random_ids((1, 6))
    alone = jit_apply(model, {"params": params}, ids)
    padded = jnp.concatenate([jnp.full((1, 3), 7, jnp.int32), ids], axis=1)
    mask = jnp.arange(9)[None] >= 3
    got = jit_apply(model, {"params": params}, padded, attention_mask=mask)
    np.testing.assert_allclose(got[:, 3:], alone, atol=2e-5)


def test_inputs_embeds_and_hidden_head_match_ids_path():
    params = init_params(LLAMA)
    model = DecoderLM(LLAMA)
    ids = random_ids((2, 5))
    logits = jit_apply(model, {"params": params}, ids)
    embeds = jit_apply(model, {"params": params}, ids, method=DecoderLM.embed)
    hidden = jit_apply(model, {"params": params}, inputs_embeds=embeds, return_hidden=True)
    assert hidden.shape == (2, 5, LLAMA.hidden_size)
    np.testing.assert_allclose(jit_apply(model, {"params": params}, hidden, method=DecoderLM.logits), logits, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        jit_apply(model, {"params": params}, ids, inputs_embeds=embeds)


def test_padded_vocab_rows_never_win():
    cfg = LLAMA.replace(tie_word_embeddings=False)
    assert cfg.padded_vocab_size == 128
    params = init_params(cfg)
    # Make the padding columns of the head enormous: they still must not win an argmax.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, cfg.vocab_size:].set(1e4)
    logits = jit_apply(DecoderLM(cfg), {"params": params}, random_ids((2, 7)))
    assert logits.shape == (2, 7, 128)
    assert int(jnp.argmax(logits, -1).max()) < cfg.vocab_size
    assert bool(jnp.all(jax.nn.softmax(logits)[..., cfg.vocab_size:] == 0))


def log_softmax_nll(hidden, weight, targets, vocab_size):
    logits = jnp.where(jnp.arange(weight.shape[0]) < vocab_size, hidden @ weight.T, -jnp.inf)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], 1)[:, 0]


@pytest.mark.parametrize("chunk", [8192, 128], ids=["one_chunk", "four_chunks"])
def test_head_cross_entropy_matches_log_softmax(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(37, 24)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(512, 24)) * 0.5, jnp.float32)  # 500 ids + 12 padding rows
    targets = jnp.asarray(rng.integers(0, 500, 37))
    weights = jnp.asarray(rng.normal(size=37), jnp.float32)  # a cotangent that is not all ones
    fused = lambda h, w: (head_cross_entropy(h, w, targets, 500, chunk=chunk) * weights).sum()  # noqa: E731
    plain = lambda h, w: (log_softmax_nll(h, w, targets, 500) * weights).sum()  # noqa: E731
    np.testing.assert_allclose(head_cross_entropy(hidden, weight, targets, 500, chunk=chunk),
                               log_softmax_nll(hidden, weight, targets, 500), rtol=1e-5, atol=1e-5)
    # Frozen head: the gradient computed in the forward pass.
    np.testing.assert_allclose(jax.grad(fused)(hidden, weight), jax.grad(plain)(hidden, weight), atol=1e-5)
    # Trained head: both gradients, recomputed in the backward pass.
    for got, expected in zip(jax.grad(fused, (0, 1))(hidden, weight), jax.grad(plain, (0, 1))(hidden, weight)):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_head_cross_entropy_keeps_no_logits():
    hidden, weight = jnp.ones((64, 16)), jnp.ones((4096, 16))
    targets = jnp.zeros(64, jnp.int32)

    def compiled_gradient(nll):
        loss = lambda h, w: nll(h, w, targets, 4000).sum()  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(hidden, weight).compile().as_text()

    assert "f32[64,4096]" in compiled_gradient(log_softmax_nll)  # what the check would find
    assert "f32[64,4096]" not in compiled_gradient(functools.partial(head_cross_entropy, chunk=1024))
    # A bfloat16 head is sliced as bits: no float32 copy of its chunks (XLA:CPU hoisted one out of the loop).
    hidden, weight = hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    assert "f32[1024,4,16]" not in compiled_gradient(functools.partial(head_cross_entropy, chunk=1024))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_target_nll_matches_logits(tie):
    cfg = LLAMA.replace(tie_word_embeddings=tie)
    params, model = init_params(cfg), DecoderLM(cfg)
    hidden = jit_apply(model, {"params": params}, random_ids((2, 6)), return_hidden=True)
    targets = random_ids((2, 6), seed=1)
    logits = jit_apply(model, {"params": params}, hidden, method=DecoderLM.logits)
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    got = jit_apply(model, {"params": params}, hidden, targets, method=DecoderLM.target_nll)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_params_and_compute():
    cfg = LLAMA.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = nn.unbox(jax.jit(DecoderLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    f32_params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    ids = random_ids((2, 8))
    got = jit_apply(DecoderLM(cfg), {"params": params}, ids)
    expected = jit_apply(DecoderLM(LLAMA), {"params": f32_params}, ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, atol=0.05)


@pytest.mark.parametrize("lhs_shape, rhs_shape, contract", [
    ((3, 5, 8), (8, 6), ((2,), (0,))),              # Dense
    ((3, 5, 4, 2), (4, 2, 6), ((2, 3), (0, 1))),    # DenseGeneral over two axes (o_proj)
    ((3, 5, 8), (6, 8), ((2,), (1,))),              # tied head: hidden x embedding^T
    ((5, 4, 2), (7, 2, 4), ((1, 2), (2, 1))),       # contracted axes paired out of order
    ((1, 1, 8), (6, 8), ((2,), (1,))),              # one row (decoding at batch 1): padded to two
], ids=["dense", "two_axes", "tied_head", "crossed", "one_row"])
def test_accumulating_dot_general_matches_float32_autodiff(lhs_shape, rhs_shape, contract):
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=lhs_shape), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=rhs_shape), jnp.bfloat16)
    dims = (contract, ((), ()))
    out_shape = jax.eval_shape(lambda a, b: jax.lax.dot_general(a, b, dims), lhs, rhs).shape
    weights = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    def loss(dot, a, b, w):
        return (dot(a, b, dims).astype(jnp.float32) * w).sum()

    got = jax.jit(jax.grad(lambda a, b, w: loss(accumulating_dot_general, a, b, w), argnums=(0, 1)))(lhs, rhs, weights)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    expected = jax.grad(lambda a, b: loss(jax.lax.dot_general, a, b, weights), argnums=(0, 1))(up(lhs), up(rhs))
    forward = accumulating_dot_general(lhs, rhs, dims)
    assert forward.dtype == jnp.bfloat16 and forward.shape == out_shape
    np.testing.assert_allclose(up(forward), jax.lax.dot_general(up(lhs), up(rhs), dims), rtol=0.01, atol=0.05)
    assert accumulating_dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32).dtype == jnp.float32
    for g, e, x in zip(got, expected, (lhs, rhs)):
        assert g.dtype == x.dtype and g.shape == x.shape
        # bfloat16 rounding of the cotangent and of the result: about 3 significant digits
        np.testing.assert_allclose(up(g), e, rtol=0.02, atol=0.02 * float(jnp.abs(e).max()))


def test_bfloat16_dots_accumulate_in_float32_on_cpu():
    """Every LM matmul in bfloat16 reaches XLA as a bfloat16 x bfloat16 -> float32 dot in the forward pass and in
    the backward pass (XLA:CPU upcasts bfloat16-result dots to float32 matmuls, at half the speed)."""
    cfg = LLAMA.replace(dtype="bfloat16", param_dtype="bfloat16", tie_word_embeddings=True)
    params = nn.unbox(jax.jit(DecoderLM(cfg).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    embeds = jnp.ones((2, 6, cfg.hidden_size), jnp.bfloat16)

    def loss(x):
        return jax.nn.logsumexp(DecoderLM(cfg).apply({"params": params}, inputs_embeds=x), axis=-1).mean()

    hlo = jax.jit(jax.grad(loss)).lower(embeds).as_text()
    # The weight matmuls: every dot without batch dimensions (attention's are batched over B and heads).
    weight_dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line and "batching_dims" not in line]
    # 7 per layer forward, 7 activation-gradient dots per layer backward (no weight gradients: not asked for),
    # the tied head forward and backward
    assert len(weight_dots) == 2 * 7 * cfg.num_layers + 2
    for line in weight_dots:
        assert re.search(r"\(tensor<[\dx]+xbf16>, tensor<[\dx]+xbf16>\) -> tensor<[\dx]+xf32>$", line.strip()), line


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cache_write_in_place(dtype):
    """The KV-cache write equals dynamic_update_slice, and a bfloat16 cache is not converted whole to float32
    (XLA:CPU would then copy the entire cache at every write)."""
    buffer = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 40, 8)), dtype)
    update = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 1, 8)), jnp.float32)
    write = jax.jit(_write_in_place, donate_argnums=0)
    expected = jax.lax.dynamic_update_slice(buffer, update.astype(dtype), (0, 0, 7, 0))
    compiled = write.lower(buffer, update, (0, 0, jnp.int32(7), 0)).compile().as_text()
    got = write(buffer, update, (0, 0, jnp.int32(7), 0))
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    if dtype == "bfloat16":
        assert "f32[3,2,40,8]" not in compiled


def test_decoding_step_reads_each_layers_cache_where_it_is():
    """One token step on a cache: each layer's keys and values are only written in place and read by the
    attention matmuls, never sliced or transposed into a copy (at every layer and step, that would copy the
    whole cache)."""
    params = init_params(LLAMA)
    model = DecoderLM(LLAMA)
    _, cache = jit_apply(model, {"params": params}, random_ids((2, 5)), cache=init_cache(LLAMA, 2, 40))
    step = jax.jit(lambda p, ids, c: model.apply({"params": p}, ids, cache=c), donate_argnums=2)
    hlo = step.lower(params, random_ids((2, 1)), cache).compile().as_text()
    shapes = "2,2,40,16|2,40,2,16|2,2,16,40"  # head-major, sequence-major, transposed keys
    layer_cache = re.compile(rf"^\s*(?:ROOT )?%?([\w.\-]+) = f32\[({shapes})\]\S* ([\w\-]+)\(", re.M)
    made = [(name, op) for name, _, op in layer_cache.findall(hlo)]
    assert made, "no instruction holds a layer's cache: the pattern is stale"
    copies = [(name, op) for name, op in made
              if op not in ("parameter", "get-tuple-element", "bitcast", "dynamic-update-slice")
              and "dynamic-update-slice" not in name]
    assert not copies, copies


def test_sliding_window_limits_attention():
    cfg = MISTRAL.replace(num_layers=1)
    params = init_params(cfg)
    ids = random_ids((1, 10))
    base = jit_apply(DecoderLM(cfg), {"params": params}, ids)
    changed = jit_apply(DecoderLM(cfg), {"params": params}, ids.at[0, 0].set((ids[0, 0] + 1) % 100))
    # A window of 4: token 0 is seen from positions 0..3 only.
    assert not np.allclose(base[0, :4], changed[0, :4], atol=1e-4)
    np.testing.assert_allclose(base[0, 4:], changed[0, 4:], atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(family="bert"), "unknown LM family 'bert'; supported: llama, gpt2"),
    (dict(num_kv_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(remat="some"), "unknown remat policy 'some'"),
    (dict(attention_impl="flash"), "unknown attention_impl 'flash'; supported: xla, cudnn"),
    (dict(rope_scaling=RopeScaling("yarn", 2.0)), "unsupported rope scaling 'yarn'"),
])
def test_config_errors_name_the_bad_value(bad, message):
    with pytest.raises(ValueError, match=message):
        LLAMA.replace(**bad)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_batched_greedy_generation_matches_recomputation(cfg):
    params = init_params(cfg, seed=3)
    model = DecoderLM(cfg)
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    got = greedy_generate(model, params, prompts, max_new_tokens=6, eos_id=None)
    # Recompute without a cache; the model is causal, so right-padding to one shape changes nothing.
    apply = jax.jit(lambda ids: model.apply({"params": params}, ids))
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        for _ in range(6):
            logits = apply(jnp.asarray([ids + [0] * (16 - len(ids))]))
            ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
        assert tokens == ids[len(prompt):]
    # EOS stops a row: declare its second token EOS and it comes back cut before it.
    eos = got[0][1]
    first = greedy_generate(model, params, prompts[:1], max_new_tokens=6, eos_id=eos)[0]
    assert first == got[0][:got[0].index(eos)]


def _loss_and_input_grad(cfg, params, embeds, attention_mask=None):
    model = DecoderLM(cfg)

    def loss(x):
        logits = model.apply({"params": params}, inputs_embeds=x, attention_mask=attention_mask)
        return (logits[..., :cfg.vocab_size] ** 2).mean(), logits
    (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(embeds)
    return logits, grad


@pytest.mark.parametrize("cfg", [LLAMA, MISTRAL], ids=["llama", "mistral_window"])
def test_fused_attention_path_matches_the_xla_path(cfg, monkeypatch):
    """The `attention_impl="cudnn"` branch (jax.nn.dot_product_attention with a causal mask and the sliding
    window, grouped heads, its output projection), run here through the same API's XLA implementation."""
    params = init_params(cfg)
    embeds = jax.random.normal(jax.random.key(2), (2, 9, cfg.hidden_size))
    expected = _loss_and_input_grad(cfg, params, embeds)
    fused = lm_module.fused_causal_attention
    calls = []
    monkeypatch.setattr(lm_module, "cudnn_can_serve", lambda cfg, causal_only, cached: causal_only and not cached)
    monkeypatch.setattr(lm_module, "fused_causal_attention",
                        lambda q, k, v, window, impl: calls.append(impl) or fused(q, k, v, window, "xla"))
    got = _loss_and_input_grad(cfg.replace(attention_impl="cudnn"), params, embeds)
    assert calls == ["cudnn"] * cfg.num_layers
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5)
    # A padding mask is not causal-only: the XLA path serves it, so a padded key changes nothing it masks.
    mask = jnp.ones((2, 9), bool).at[1, :3].set(False)
    calls.clear()
    padded = _loss_and_input_grad(cfg.replace(attention_impl="cudnn"), params, embeds, mask)
    assert calls == []
    np.testing.assert_allclose(padded[0], _loss_and_input_grad(cfg, params, embeds, mask)[0], atol=0)


def test_cudnn_attention_falls_back_to_xla_on_cpu():
    cfg = LLAMA.replace(dtype="bfloat16")
    params = init_params(cfg)
    ids = random_ids((2, 8))
    expected = jit_apply(DecoderLM(cfg), {"params": params}, ids)
    got = jit_apply(DecoderLM(cfg.replace(attention_impl="cudnn")), {"params": params}, ids)
    np.testing.assert_array_equal(got, expected)
