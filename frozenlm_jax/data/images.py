"""Images for inference, in numpy and JAX (no TensorFlow): decode files, crop, resize and normalise exactly as
the training pipeline's `frozenlm_jax.data.pipeline.preprocess_image` does without augmentation (within 1/255 a
pixel; tests/test_images.py)."""

from __future__ import annotations

import io
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from frozenlm_jax import paths

IMAGE_MEAN = (0.5, 0.5, 0.5)  # on [0, 1] pixels: images become [-1, 1]
IMAGE_STD = (0.5, 0.5, 0.5)


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] from PNG/JPEG/GIF/BMP bytes or a file's path; grayscale becomes RGB, alpha is dropped, an
    animation gives its first frame."""
    if not isinstance(data, bytes) and paths.is_remote(data):
        data = paths.path(data).read_bytes()
    source = io.BytesIO(data) if isinstance(data, bytes) else os.fspath(data)
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def preprocess_image(image: np.ndarray, size: int, mean: Sequence[float] = IMAGE_MEAN,
                     std: Sequence[float] = IMAGE_STD) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: centre square crop (aspect kept), antialiased bilinear
    resize, [0, 1], normalised by `mean` and `std`."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = jnp.asarray(image[top:top + side, left:left + side], jnp.float32)
    resized = jax.image.resize(square, (size, size, 3), method="linear", antialias=True) / 255.0
    return np.asarray((resized - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32))
