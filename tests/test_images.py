"""Inference's image path (numpy/JAX, no TensorFlow) gives the training pipeline's pixels: decoding and
preprocessing within 1/255 of the tf.data path, for PNG and JPEG files and any size."""

import io

import numpy as np
import pytest
from PIL import Image

from frozenlm_jax.data import images

tf = pytest.importorskip("tensorflow")
pipeline = pytest.importorskip("frozenlm_jax.data.pipeline")

ONE_LEVEL = 1 / 255  # of a [0, 1] pixel; the normalised images are (x - 0.5) / 0.5, so twice that there


def encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, quality=90)
    return out.getvalue()


@pytest.mark.parametrize("shape, size", [((37, 50, 3), 16), ((64, 64, 3), 64), ((100, 80, 3), 224),
                                         ((300, 200, 3), 64), ((9, 9, 3), 32)])
def test_preprocessing_matches_the_pipeline(shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.uint8)
    ours = images.preprocess_image(image, size)
    theirs = pipeline.preprocess_image(tf.constant(image), size).numpy()
    assert ours.shape == theirs.shape == (size, size, 3) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() * 0.5 < ONE_LEVEL


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decoding_matches_the_pipeline(fmt, tmp_path):
    smooth = np.linspace(0, 255, 48 * 40 * 3).reshape(48, 40, 3).astype(np.uint8)
    data = encoded(smooth, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    theirs = pipeline.decode_image(tf.constant(data)).numpy().astype(int)
    for ours in (images.decode_image(data), images.decode_image(path)):
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_grayscale_and_alpha_become_rgb():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgba = np.dstack([np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8), np.uint8)])
    for array in (gray, rgba):
        decoded = images.decode_image(encoded(array, "PNG"))
        assert decoded.shape == (8, 8, 3)
        np.testing.assert_array_equal(decoded, pipeline.decode_image(tf.constant(encoded(array, "PNG"))).numpy())
