"""FrozenLM on a tiny random Frozen model: interleaved prompts, batching, blind prompts, scoring, `load_frozen`
of an exported directory, and the best checkpoint of a run (loading a workdir: tests/test_trainer.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import bos_tokenizer, jit_apply

from frozenlm_jax import FrozenLM, load_frozen
from frozenlm_jax.data.batch import TextLayout, stack
from frozenlm_jax.data.images import preprocess_image
from frozenlm_jax.tokenizer import byte_tokenizer
from frozenlm_jax.export import save_exported
from frozenlm_jax.models.frozen import Frozen
from frozenlm_jax.models.lm import LMConfig
from frozenlm_jax.models.vision import encoder_config

LM = LMConfig(family="llama", vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              intermediate_size=64, init_std=0.5)
SIZE, N = 16, 2


@pytest.fixture(scope="module")
def fm():
    """A random Frozen model whose LM never prefers a non-ASCII byte or EOS (their head columns are zero, the
    others' logits spread around zero), so every greedy token is one character of text."""
    model = Frozen(LM, encoder_config("nf_resnet_tiny"), N)
    batch = {"tokens": np.zeros((1, 4), np.int32), "images": np.zeros((1, 1, SIZE, SIZE, 3), np.float32),
             "image_mask": np.ones((1, 1), bool), "image_positions": np.zeros((1, 1), np.int32)}
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)["params"])
    head = params["lm"]["lm_head"]["kernel"]
    params["lm"]["lm_head"]["kernel"] = head.at[:, 128:].set(0.0)
    return FrozenLM(model, params, byte_tokenizer(), SIZE)


def images(seed, count):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(12, 40)), int(rng.integers(12, 40)), 3), dtype=np.uint8)
            for _ in range(count)]


@functools.partial(jax.jit, static_argnums=0)
def logits_of(model, params, batch):
    return jit_apply(model, {"params": params}, batch)


def contract(fm, prompt, max_len, answer=None):
    """The prompt right-padded to max_len (no padding mask needed: the model is causal)."""
    parts = [p if isinstance(p, str) else fm.preprocess(p) for p in prompt]
    return stack([TextLayout(fm.tokenizer, max_len, N).prompt(parts, len(parts), answer=answer)])


def manual_greedy(fm, prompt, steps):
    """Greedy continuation by full recomputation of the Frozen model on the growing sequence."""
    batch = contract(fm, prompt, 96)
    length = sum(len(fm.tokenizer.encode(p)) if isinstance(p, str) else N for p in prompt)
    tokens = []
    for _ in range(steps):
        next_id = int(np.argmax(logits_of(fm.model, fm.params, batch)[0, length - 1]))
        if next_id == fm.tokenizer.eos_id:
            break
        batch["tokens"][0, length] = next_id
        tokens.append(next_id)
        length += 1
    return fm.tokenizer.decode(tokens)


def test_generate_on_interleaved_prompts_of_a_batch_matches_recomputation(fm):
    img1, img2, query, other = images(0, 4)
    few_shot = [img1, "This is a dax.", img2, "This is a blicket.", query, "Q: What is this? A: This is a"]
    zero_shot = [fm.preprocess(other), "Q: What is this? A:"]  # an already preprocessed image
    batch = fm.generate([few_shot, zero_shot], max_new_tokens=6)
    assert batch == [manual_greedy(fm, few_shot, 6), manual_greedy(fm, zero_shot, 6)]
    assert fm.generate(zero_shot, max_new_tokens=6) == batch[1:]  # a single prompt: a list of one
    texts, logprobs = fm.generate([few_shot, zero_shot], max_new_tokens=6, method="beam", num_beams=3,
                                  return_logprobs=True)
    _, greedy_logprobs = fm.generate([few_shot, zero_shot], max_new_tokens=6, return_logprobs=True)
    assert len(texts) == 2 and np.all(logprobs >= greedy_logprobs - 1e-5)
    sampled = fm.generate([few_shot, zero_shot], max_new_tokens=6, method="sample", rng=jax.random.key(0))
    assert sampled == fm.generate([few_shot, zero_shot], max_new_tokens=6, method="sample", rng=jax.random.key(0))


def test_images_are_preprocessed_like_the_training_pipeline(fm, tmp_path):
    import tensorflow as tf

    from frozenlm_jax.data.eval_files import load_image

    [image] = images(1, 1)
    np.testing.assert_allclose(fm.preprocess(image), preprocess_image(image, SIZE))
    (tmp_path / "image.png").write_bytes(tf.io.encode_png(image).numpy())
    np.testing.assert_allclose(fm.preprocess(tmp_path / "image.png"), load_image(tmp_path / "image.png", SIZE))
    np.testing.assert_allclose(fm.preprocess(tmp_path / "image.png"), fm.preprocess(image))
    assert fm.preprocess(image).min() >= -1 and fm.preprocess(image).max() <= 1
    with pytest.raises(ValueError, match=r"preprocessed already, of shape \(16, 16, 3\); got \(8, 8, 3\)"):
        fm.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 pixels \[H, W, 3\]"):
        fm.preprocess(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="a prompt needs at least one image part"):
        fm.generate(["only text"])


def test_stop_strings_cut_the_text(fm):
    prompt = [images(2, 1)[0], "Q: What is this? A:"]
    [free] = fm.generate(prompt, max_new_tokens=8)
    stop = next(c for c in free[1:] if c != free[0])
    [cut] = fm.generate(prompt, max_new_tokens=8, stop=[stop])
    assert cut == free[:free.index(stop)]
    [by_id] = fm.generate(prompt, max_new_tokens=8, stop=[ord(free[0])])
    assert by_id == ""


def test_blind_blanks_every_image(fm):
    img1, img2 = images(3, 2)
    prompt = [img1, "This is a dax.", img2, "Q: What is this? A:"]
    gray = np.zeros((SIZE, SIZE, 3), np.float32)
    blind = fm.blind()
    assert blind.blank_images and not fm.blank_images
    assert blind.generate(prompt, max_new_tokens=5) == fm.generate([gray, "This is a dax.", gray,
                                                                     "Q: What is this? A:"], max_new_tokens=5)
    np.testing.assert_array_equal(blind.preprocess(img1), gray)
    np.testing.assert_allclose(blind.score(prompt, ["dax"]), fm.score([gray, "This is a dax.", gray,
                                                                        "Q: What is this? A:"], ["dax"]))


def test_caption_prompts_start_as_training_sequences_do(fm, monkeypatch):
    """The caption evaluator's prompt is BOS (for a tokenizer that adds one) then the image's prefix slots,
    as `TextLayout.caption` starts a training sequence; one compiled embedding for every batch of a shape."""
    from frozenlm_jax import frozen_lm
    from frozenlm_jax.eval.shapes_captions import ShapesCaptions

    model = FrozenLM(fm.model, fm.params, bos_tokenizer(), SIZE)
    tokens = []
    embed = frozen_lm._embed
    monkeypatch.setattr(frozen_lm, "_embed", lambda m, p, batch: tokens.append(batch["tokens"]) or embed(m, p, batch))
    settings = ml_collections.ConfigDict(dict(num_examples=4, batch_size=2, caption_tokens=3))
    misses = embed._cache_size()
    ShapesCaptions("shapes_captions", settings, SIZE).run(model)
    training_start = TextLayout(model.tokenizer, 8, N).caption("a")[0][:1 + N].tolist()
    assert training_start[0] == model.tokenizer.bos_id
    assert [row[-1 - N:].tolist() for batch in tokens for row in batch] == [training_start] * 4
    assert embed._cache_size() == misses + 1  # two batches, one program


def test_score_equals_the_log_likelihood_and_ranks_the_greedy_answer_first(fm):
    img1, img2, query = images(4, 3)
    prompts = [[img1, "This is a dax.", img2, "This is a blicket.", query, "Q: What is this? A: This is a"],
               [query, "Q: What colour is it? A:"]]
    answers = ["dax", "a reddish blob"]
    got = fm.score(prompts, answers)
    for prompt, answer, score in zip(prompts, answers, got):
        batch = contract(fm, prompt, 96, answer)
        logprobs = jax.nn.log_softmax(logits_of(fm.model, fm.params, batch)[0, :-1])
        targets = batch["tokens"][0, 1:]
        expected = float(np.sum(np.take_along_axis(logprobs, targets[:, None], -1)[:, 0] * batch["loss_mask"][0, 1:]))
        np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-4)
        without_eos = fm.score(prompt, answer, eos=False)[0]
        assert without_eos > score  # EOS's log-prob is negative
    # The answer's first character, chosen greedily after "A: ", outscores every other character.
    prompt = prompts[1]
    [greedy], logprob = fm.generate(prompt[:-1] + [prompt[-1] + " "], max_new_tokens=1, return_logprobs=True)
    candidates = [greedy] + [c for c in "abcxyz.?!" if c != greedy]
    scores = fm.score(prompt, candidates, eos=False)
    assert np.argmax(scores) == 0
    space = fm.score(prompt, [""], eos=False)[0]  # log p(" ") alone
    np.testing.assert_allclose(scores[0] - space, logprob[0], atol=1e-4)


def test_load_frozen_opens_an_exported_directory(fm, tmp_path):
    out = save_exported(tmp_path / "exported", fm.model, fm.params, fm.tokenizer, "random(seed=0)", "0" * 16,
                        SIZE, include_lm_weights=True)
    loaded = load_frozen(out)
    assert isinstance(loaded, FrozenLM) and loaded.image_size == SIZE
    prompt = [images(5, 1)[0], "Q: What is this? A:"]
    assert loaded.generate(prompt, max_new_tokens=5) == fm.generate(prompt, max_new_tokens=5)
    np.testing.assert_allclose(loaded.score(prompt, ["dax"]), fm.score(prompt, ["dax"]), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="neither an exported model .* nor a training workdir"):
        load_frozen(tmp_path)


def test_checkpointer_best_step_is_the_lowest_validation_loss_and_survives_a_resume(tmp_path):
    from frozenlm_jax.checkpointing import Checkpointer

    def save(checkpointer, step, loss):
        checkpointer.save(step, {"x": jnp.zeros(2)}, jax.random.key(0), [{}], loss)
        checkpointer.wait()

    checkpointer = Checkpointer(tmp_path, keep=1, frozen_source="random", frozen_fingerprint="0" * 16)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None)]:
        save(checkpointer, step, loss)
    assert checkpointer.best_step() == 2 and checkpointer.all_steps() == [2, 4]
    checkpointer.close()
    resumed = Checkpointer(tmp_path, keep=1, frozen_source="random", frozen_fingerprint="0" * 16)
    save(resumed, 5, 4.0)
    assert resumed.best_step() == 2 and resumed.all_steps() == [2, 5]  # the best is still known, and kept
    resumed.close()
