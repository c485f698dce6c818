"""The `frozen_shapes` tfds dataset: captioned procedural shapes, generated locally with no download.

Importing this module registers the builder, after which `tfds.load("frozen_shapes")`,
`tfds.data_source("frozen_shapes")` and `tfds build` find it. It is written as TFRecord (for `tfds.load`)
plus an ArrayRecord copy (for `tfds.data_source` and the input pipeline, which read by index).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from frozenlm_jax.data import shapes_world as world
from frozenlm_jax.data.random_access import write_array_record_copy

# Each split draws its scenes from its own seed stream: np.random.default_rng([seed, split_id, index]).
# image_id = split_id * IMAGE_ID_STRIDE + index, so ids are unique across splits.
IMAGE_ID_STRIDE = 10_000_000
# The default train split: ~24k examples cover a 15-minute CPU run (about 27 examples/s of training)
# without repeating, and prepare in about 20 s on 2 cores (see docs/data.md).
DEFAULT_TRAIN_SIZE = 24_000


@dataclasses.dataclass
class FrozenShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    num_train: int = DEFAULT_TRAIN_SIZE
    num_validation: int = 1_000
    num_test: int = 1_000
    seed: int = 0
    num_objects: int | None = None  # objects per scene; None: 1-3

    def __post_init__(self):
        if not 16 <= self.image_size <= 224:
            raise ValueError(f"image_size={self.image_size} is outside the supported 16..224 pixels")


def scene_for(config: FrozenShapesConfig, split: str, index: int):
    """The scene, captions and rng state for example `index` of `split`: the single source of truth."""
    rng = np.random.default_rng([config.seed, world.SPLIT_IDS[split], index])
    scene = world.sample_scene(rng, config.num_objects)
    return scene, world.captions(scene, rng)


class FrozenShapes(tfds.core.GeneratorBasedBuilder):
    """Images of 1-3 coloured shapes with several captions each and their structured objects."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        FrozenShapesConfig(name="64", description="64x64 pixels, 24k train examples (the default)."),
        FrozenShapesConfig(name="64_large", description="64x64 pixels, 240k train examples.", num_train=240_000),
        FrozenShapesConfig(name="64_single", description="64x64 pixels, one object per scene, 24k train examples.",
                           num_objects=1),
        FrozenShapesConfig(name="128", description="128x128 pixels, 24k train examples.", image_size=128),
        FrozenShapesConfig(name="224", description="224x224 pixels, 24k train examples.", image_size=224),
        FrozenShapesConfig(name="tiny", description="16x16 pixels, 512 train examples: for tests (configs/tiny.py).",
                           image_size=16, num_train=512, num_validation=64, num_test=64),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "64"
    # tfds finds a builder's source through the `importlib_resources` backport, which it does not install on
    # Python >= 3.9; naming the file here skips that lookup.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "image_id": tfds.features.Scalar(np.int64),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "background": tfds.features.ClassLabel(names=list(world.BACKGROUNDS)),
                    "objects": tfds.features.Sequence(
                        {
                            "kind": tfds.features.ClassLabel(names=list(world.KINDS)),
                            "color": tfds.features.ClassLabel(names=list(world.COLORS)),
                            "size": tfds.features.ClassLabel(names=list(world.SIZES)),
                            "x": tfds.features.Scalar(np.float32),
                            "y": tfds.features.Scalar(np.float32),
                        }
                    ),
                }
            ),
            supervised_keys=None,
            homepage="https://arxiv.org/abs/2106.13884",
        )

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        if self.info.file_format == tfds.core.FileFormat.TFRECORD:
            write_array_record_copy(self.info)

    def _split_generators(self, dl_manager):
        del dl_manager  # procedural: nothing to download
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        for index in range(num_examples):
            scene, captions = scene_for(config, split, index)
            yield index, {
                "image": world.render(scene, config.image_size),
                "image_id": world.SPLIT_IDS[split] * IMAGE_ID_STRIDE + index,
                "captions": captions,
                "background": scene.background,
                "objects": {
                    "kind": [s.kind for s in scene.shapes],
                    "color": [s.color for s in scene.shapes],
                    "size": [s.size for s in scene.shapes],
                    "x": [s.x for s in scene.shapes],
                    "y": [s.y for s in scene.shapes],
                },
            }
