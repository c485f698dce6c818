"""The input pipeline: tfds records -> images and tokens in the batch contract -> global `jax.Array`s.

Records are read by index from a tfds data source (ArrayRecord), each host from its own
`tfds.split_for_jax_process` shard, in an order fixed by (seed, epoch). The iterator state is therefore
a few integers (`position` = records consumed so far, epoch = position // shard size), and a run resumed
from it sees exactly the batches an uninterrupted run would have seen. Undecodable images and empty
captions are skipped and counted, never fatal. The batch contract is in `frozenlm_jax/data/batch.py`.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import weakref
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from frozenlm_jax.data.batch import CONTRACT_FIELDS, TextLayout
from frozenlm_jax.tokenizer import Tokenizer

# tf.data runs on the host; an accelerator belongs to JAX.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already started: too late to hide its GPUs
    tf.get_logger().warning("TensorFlow started before frozenlm_jax.data.pipeline was imported and may hold GPU memory")

# Pipelines with a live tf.data iterator: its threads call back into Python, so they are stopped before
# the interpreter shuts down (otherwise exit can hang).
_LIVE_PIPELINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_pipelines():
    for pipeline in list(_LIVE_PIPELINES):
        pipeline.close()


@dataclasses.dataclass(frozen=True)
class CaptionSource:
    """A tfds dataset of images with captions; the keys are '/'-separated paths into its features.

    `frozen_shapes`: image_key="image", caption_key="captions"; `coco_captions`: caption_key="captions/text";
    `conceptual_captions`: caption_key="caption". A caption feature holding several captions gets one
    chosen at random (seeded) per example and epoch.
    """

    name: str
    split: str = "train"
    data_dir: str | None = None
    image_key: str = "image"
    caption_key: str = "captions"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    image_size: int = 64
    max_len: int = 32  # T: tokens per example, including the image's placeholder slots
    num_prefix: int = 2  # n: placeholder slots (prefix embeddings) per image
    batch_size: int = 32  # global; each host gets batch_size // process_count
    seed: int = 0
    shuffle: bool = True
    repeat: bool = True  # False: one pass, ending with a batch padded by fully masked rows
    augment: bool = False  # light, caption-preserving: crop scale, brightness, contrast (no flips: captions say left/right)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on [0, 1] pixels; the default maps to [-1, 1]
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    read_chunk: int = 64  # records fetched per read call
    # "shard": each process reads its `tfds.split_for_jax_process` shard in its own order. "interleave":
    # every process reads the whole split in one global order and takes its rows of each global batch,
    # so the global batches do not depend on the number of processes (needs repeat=True).
    host_order: str = "shard"
    # "random": a seeded random caption of the example's captions per epoch; "first": always the first
    caption_choice: str = "random"

    def __post_init__(self):
        if self.caption_choice not in ("random", "first"):
            raise ValueError(f"caption_choice={self.caption_choice!r}; use 'random' or 'first'")
        if self.host_order not in ("shard", "interleave"):
            raise ValueError(f"host_order={self.host_order!r}; use 'shard' or 'interleave'")
        if self.host_order == "interleave" and not self.repeat:
            raise ValueError("host_order='interleave' is for training streams (repeat=True); evaluate with 'shard'")
        if self.max_len <= self.num_prefix + 1:
            raise ValueError(
                f"max_len={self.max_len} leaves no room for a caption after {self.num_prefix} prefix slots; "
                f"raise max_len"
            )


# ----------------------------------------------------------------------------------------------
# Images.


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """uint8[H, W, 3] from PNG/JPEG/GIF/BMP bytes; grayscale becomes RGB, alpha is dropped."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def preprocess_image(
    image: tf.Tensor,
    size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    augment_seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """uint8[H, W, 3] -> float32[size, size, 3]: centre square crop (aspect kept), resize, normalise.

    With `augment_seed` (int32[2]) the crop covers a random 90-100% of the square at a random offset and
    brightness and contrast vary slightly; colours and left/right stay as the caption says.
    """
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    if augment_seed is not None:
        seeds = tf.random.experimental.stateless_split(augment_seed, 4)
        scale = tf.random.stateless_uniform([], seeds[0], 0.9, 1.0)
        side = tf.maximum(1, tf.cast(tf.cast(side, tf.float32) * scale, tf.int32))
        top = tf.random.stateless_uniform([], seeds[1], 0, height - side + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([], seeds[1] + 1, 0, width - side + 1, dtype=tf.int32)
    else:
        top, left = (height - side) // 2, (width - side) // 2
    image = image[top : top + side, left : left + side]
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True) / 255.0
    if augment_seed is not None:
        image = tf.image.stateless_random_brightness(image, 0.1, seeds[2])
        image = tf.image.stateless_random_contrast(image, 0.9, 1.1, seeds[3])
        image = tf.clip_by_value(image, 0.0, 1.0)
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _decode_or_flag(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(image, True), or (1x1 black, False) for bytes that are not a decodable image."""

    def attempt(data):
        try:
            return decode_image(data), True
        except tf.errors.InvalidArgumentError:
            return tf.zeros([1, 1, 3], tf.uint8), False

    image, ok = tf.py_function(attempt, [encoded], (tf.uint8, tf.bool))
    image.set_shape([None, None, 3])
    ok.set_shape([])
    return image, ok


# ----------------------------------------------------------------------------------------------
# Reading.


def open_source(source: CaptionSource, split: str | None = None):
    """A split (default: the source's) as a random-access tfds data source of serialized records.

    Prepares the dataset first if needed, as `tfds.data_source` does.
    """
    builder = tfds.builder(source.name, data_dir=source.data_dir)
    builder.download_and_prepare()
    info = builder.info
    # tfds 4.9 restores `alternative_file_formats` from dataset_info.json into the info proto but not into
    # the list `as_data_source` consults, so an ArrayRecord copy beside TFRecords would go unseen.
    for value in info.as_proto.alternative_file_formats:
        file_format = tfds.core.FileFormat.from_value(value)
        if file_format not in info.alternative_file_formats:
            info.alternative_file_formats.append(file_format)
    try:
        return builder.as_data_source(
            split=source.split if split is None else split,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
    except NotImplementedError as e:
        raise ValueError(
            f"{source.name} has no random-access (ArrayRecord) files; add them with `python -m "
            f"frozenlm_jax.data.random_access {source.name} --data_dir=...`, or prepare it with "
            f"`tfds build {source.name} --file_format=array_record`"
        ) from e


def open_host_source(source: CaptionSource, process_index: int, process_count: int):
    """This host's shard of the split (`tfds.split_for_jax_process`) as a random-access data source."""
    split = tfds.split_for_jax_process(source.split, process_index=process_index, process_count=process_count)
    return open_source(source, split)


def _feature_at(features, path: str):
    feature = features
    for key in path.split("/"):
        try:
            feature = feature[key]
        except KeyError:
            raise KeyError(f"no feature {path!r} in this dataset; its features: {features}") from None
    return feature


def _nested(path: str, leaf):
    keys = path.split("/")
    tree = leaf
    for key in reversed(keys):
        tree = {key: tree}
    return tree


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


class CaptionPipeline:
    """Per-host batches (dicts of numpy arrays in the batch contract) with an explicit, resumable state.

    `get_state()` returns a small dict to store in the checkpoint (one per process); passing it back as
    `state=` continues with exactly the next batch. `metrics()` reports the skipped-record counts.
    """

    def __init__(
        self,
        source: CaptionSource,
        config: PipelineConfig,
        tokenizer: Tokenizer,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        state: dict | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if config.batch_size % process_count:
            raise ValueError(
                f"batch_size={config.batch_size} is not divisible by process_count={process_count}; "
                f"use a multiple of {process_count}"
            )
        self.source, self.config = source, config
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = config.batch_size // process_count
        self.layout = TextLayout(tokenizer, config.max_len, config.num_prefix)

        if config.host_order == "interleave":
            self._records = open_source(source)
        else:
            self._records = open_host_source(source, process_index, process_count)
        self.num_records = len(self._records)
        if self.num_records == 0:
            raise ValueError(
                f"process {process_index} of {process_count} got no records of {source.name}[{source.split}]; "
                f"use a larger split or fewer processes"
            )
        features = self._records.dataset_info.features
        if not isinstance(_feature_at(features, source.image_key), tfds.features.Image):
            raise ValueError(f"{source.name}: feature {source.image_key!r} is not an Image; set image_key")
        _feature_at(features, source.caption_key)
        decoding = tfds.decode.PartialDecoding(
            _merge(_nested(source.image_key, True), _nested(source.caption_key, True)),
            decoders=_nested(source.image_key, tfds.decode.SkipDecoding()),
        )
        self._features = decoding.extract_features(features)
        self._decoders = decoding.decoders
        self.num_batches = None  # a single pass has a fixed length, equal on every host
        if not config.repeat:
            whole = len(open_source(source))
            self.num_batches = math.ceil(math.ceil(whole / process_count) / self.local_batch_size)
        self._order = functools.lru_cache(maxsize=4)(self._permutation)

        self._state = {
            "seed": config.seed,
            "position": 0,
            "batches": 0,
            "examples": 0,
            "skipped_empty_caption": 0,
            "skipped_bad_image": 0,
        }
        if state is not None:
            self.set_state(state)
        self._iterator = None
        self.last_records = np.zeros(0, np.int64)  # shard indices of the last batch's examples

    # -- state ---------------------------------------------------------------------------------

    def get_state(self) -> dict:
        return {
            **self._state,
            "num_records": self.num_records,
            "process_index": self.process_index,
            "process_count": self.process_count,
        }

    def set_state(self, state: dict) -> None:
        expected = {
            "seed": self.config.seed,
            "num_records": self.num_records,
            "process_index": self.process_index,
            "process_count": self.process_count,
        }
        for key, value in expected.items():
            if int(state[key]) != value:
                raise ValueError(
                    f"the saved input state has {key}={state[key]} but this run has {key}={value}; resume with "
                    f"the same data, seed and process layout, or start without the saved state"
                )
        self._state = {k: int(state[k]) for k in self._state}
        self.close()

    @property
    def epoch(self) -> int:
        return int(self.stream_positions(np.int64(self._state["position"]))) // self.num_records

    def metrics(self) -> dict[str, int]:
        return {
            "data/examples": self._state["examples"],
            "data/epoch": self.epoch,
            "data/skipped_empty_caption": self._state["skipped_empty_caption"],
            "data/skipped_bad_image": self._state["skipped_bad_image"],
        }

    # -- tf.data -------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.config.shuffle:
            return np.arange(self.num_records)
        return np.random.default_rng([self.config.seed, epoch]).permutation(self.num_records)

    def stream_positions(self, local: np.ndarray) -> np.ndarray:
        """Positions in the record stream of this process's local positions (its own stream for "shard";
        its rows of each global batch of the one global stream for "interleave")."""
        if self.config.host_order == "shard":
            return local
        b = self.local_batch_size
        return (local // b) * self.config.batch_size + self.process_index * b + local % b

    def _read(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        positions = self.stream_positions(local)
        epochs, offsets = np.divmod(positions, self.num_records)
        records = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            records[epochs == epoch] = self._order(int(epoch))[offsets[epochs == epoch]]
        return np.asarray([self._records[r] for r in records.tolist()], object), records, positions

    def _example(self, serialized, record, position, local):
        decoded = self._features.deserialize_example(serialized, decoders=self._decoders)
        captions = tf.reshape(_get(decoded, self.source.caption_key), [-1])
        captions = tf.boolean_mask(captions, tf.strings.length(tf.strings.strip(captions)) > 0)
        count = tf.shape(captions)[0]
        seed = tf.stack([tf.constant(self.config.seed, tf.int64), position])
        pick = tf.random.stateless_uniform([], seed, 0, tf.maximum(count, 1), dtype=tf.int32)
        if self.config.caption_choice == "first":
            pick = tf.constant(0, tf.int32)
        caption = tf.cond(count > 0, lambda: captions[pick], lambda: tf.constant(""))
        image, image_ok = _decode_or_flag(_get(decoded, self.source.image_key))
        return {
            "caption": caption,
            "image": image,
            "empty": count == 0,
            "bad": tf.logical_not(image_ok),
            "_record": record,
            "_position": position,
            "_local": local,
        }

    def _finish(self, ex):
        c = self.config
        seed = tf.stack([tf.constant(c.seed + 1, tf.int64), ex["_position"]]) if c.augment else None
        image = preprocess_image(ex["image"], c.image_size, c.image_mean, c.image_std, augment_seed=seed)

        def text(caption):
            tokens, loss_mask, position = self.layout.caption(caption.decode("utf-8"))
            return tokens, loss_mask, np.int32(position)

        tokens, loss_mask, position = tf.numpy_function(text, [ex["caption"]], (tf.int32, tf.bool, tf.int32))
        tokens.set_shape([c.max_len])
        loss_mask.set_shape([c.max_len])
        return {
            "tokens": tokens,
            "images": image[None],
            "image_mask": tf.ones([1], tf.bool),
            "image_positions": tf.reshape(position, [1]),
            "loss_mask": loss_mask,
            "_record": ex["_record"],
            "_local": ex["_local"],
            "_empty": ex["_empty"],
            "_bad": ex["_bad"],
        }

    def _dataset(self) -> tf.data.Dataset:
        c = self.config
        start = self._state["position"]
        stop = np.iinfo(np.int64).max if c.repeat else self.num_records
        positions = tf.data.Dataset.range(start, stop).batch(c.read_chunk)

        def read(chunk):
            serialized, records, positions = tf.numpy_function(self._read, [chunk], (tf.string, tf.int64, tf.int64))
            serialized.set_shape([None])
            records.set_shape([None])
            positions.set_shape([None])
            return serialized, records, positions, chunk

        ds = positions.map(read, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        ds = ds.map(self._example, num_parallel_calls=tf.data.AUTOTUNE)

        def count(totals, ex):
            totals = (totals[0] + tf.cast(ex["empty"], tf.int64), totals[1] + tf.cast(ex["bad"], tf.int64))
            return totals, {**ex, "_empty": totals[0], "_bad": totals[1]}

        ds = ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)
        ds = ds.filter(lambda ex: tf.logical_not(ex["empty"] | ex["bad"]))
        ds = ds.map(self._finish, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(self.local_batch_size, drop_remainder=c.repeat)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(2)

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def close(self) -> None:
        """Stops the background reading; the next batch starts a fresh reader from the current state."""
        self._iterator = None
        _LIVE_PIPELINES.discard(self)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._dataset().as_numpy_iterator()
            _LIVE_PIPELINES.add(self)
            self._base = dict(self._state)  # the skip counters in the dataset start from zero here
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.config.repeat or self._state["batches"] >= self.num_batches:
                raise
            batch = None
        self._state["batches"] += 1
        if batch is None:  # the single pass has ended: fully masked rows keep every host in step
            self.last_records = np.zeros(0, np.int64)
            return self._padded({})
        n = len(batch["_record"])
        self._state["position"] = int(batch["_local"][-1]) + 1
        self._state["examples"] += n
        self._state["skipped_empty_caption"] = self._base["skipped_empty_caption"] + int(batch["_empty"][-1])
        self._state["skipped_bad_image"] = self._base["skipped_bad_image"] + int(batch["_bad"][-1])
        self.last_records = batch["_record"]
        out = {k: batch[k] for k in CONTRACT_FIELDS}
        return out if n == self.local_batch_size else self._padded(out)

    def _padded(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c, b = self.config, self.local_batch_size
        n = len(batch["tokens"]) if batch else 0
        empty = {
            "tokens": np.full((b, c.max_len), self.layout.pad_id, np.int32),
            "images": np.zeros((b, 1, c.image_size, c.image_size, 3), np.float32),
            "image_mask": np.zeros((b, 1), bool),
            "image_positions": np.zeros((b, 1), np.int32),
            "loss_mask": np.zeros((b, c.max_len), bool),
        }
        for k, v in batch.items():
            empty[k][:n] = v
        return empty
