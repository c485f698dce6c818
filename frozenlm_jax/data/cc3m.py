"""The `conceptual_captions` tfds dataset (CC3M, the paper's training data) from a local manual directory.

Importing this module registers the builder. The images must be downloaded beforehand (the URLs are
third-party); see `MANUAL_DOWNLOAD_INSTRUCTIONS` or docs/data.md. Rows whose image is missing or
undecodable, or whose caption is empty, are skipped; the counts are logged and kept in the dataset's
metadata (`builder.info.metadata["skipped"]`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import pathlib
import tarfile

import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

TSV_FILES = {"train": "Train_GCC-training.tsv", "validation": "Validation_GCC-1.1.0-Validation.tsv"}
IMAGE_DIRS = {"train": "training", "validation": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
SKIP_REASONS = ("missing_image", "undecodable_image", "empty_caption")

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Put in the manual directory (default <data_dir>/downloads/manual/, or
`download_config=tfds.download.DownloadConfig(manual_dir=...)`), for each split you have:

  {TSV_FILES['train']}   (train) and/or {TSV_FILES['validation']}   (validation):
      the released TSV files, one `caption<TAB>url` row per image (a `caption<TAB>url` header is skipped);
  {IMAGE_DIRS['train']}/ and/or {IMAGE_DIRS['validation']}/:  the downloaded images, either
      - one file per TSV row named by its 0-based row number (`0.jpg`, `000000001.jpg`, ...), or
      - img2dataset webdataset shards `*.tar`, each sample a `KEY.jpg` with its caption in `KEY.txt`
        (and `KEY.json` with the url); then the TSV file is not needed.
"""


def _is_decodable(data: bytes) -> bool:
    try:
        tf.io.decode_image(data, channels=3, expand_animations=False)
        return True
    except tf.errors.InvalidArgumentError:
        return False


def _rows_from_files(tsv: pathlib.Path, image_dir: pathlib.Path):
    """(row, caption, url, image path or None) for every TSV row; a `caption<TAB>url` header is not a row."""
    images = {}
    for path in image_dir.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES and path.stem.isdigit():
            images[int(path.stem)] = path
    with tsv.open(newline="", encoding="utf-8") as f:
        lines = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = (fields for i, fields in enumerate(lines) if i > 0 or fields[:2] != ["caption", "url"])
        for row, fields in enumerate(rows):
            caption, url = (fields + ["", ""])[:2]
            yield row, caption, url, images.get(row)


def _rows_from_shards(image_dir: pathlib.Path):
    """(key, caption, url, image bytes) for every image in img2dataset's webdataset shards."""
    for shard in sorted(image_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                if f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                    continue
                text = members.get(f"{stem}.txt")
                caption = tar.extractfile(text).read().decode("utf-8") if text else ""
                meta = members.get(f"{stem}.json")
                url = json.loads(tar.extractfile(meta).read()).get("url", "") if meta else ""
                key = pathlib.PurePath(stem).name
                yield int(key) if key.isdigit() else key, caption, url, tar.extractfile(members[name]).read()


class ConceptualCaptions(tfds.core.GeneratorBasedBuilder):
    """Conceptual Captions 3M image-caption pairs, from a manual directory of downloaded images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    # tfds finds a builder's source through the `importlib_resources` backport, which it does not install on
    # Python >= 3.9; naming the file here skips that lookup.
    code_path = epath.Path(__file__)
    VALIDATION_WORKERS = 8  # threads decoding images to find the corrupt ones (TF releases the GIL)

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "url": tfds.features.Text(),
                    "key": tfds.features.Text(),  # the TSV row number, or the webdataset key
                }
            ),
            homepage="https://ai.google.com/research/ConceptualCaptions/",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual = pathlib.Path(dl_manager.manual_dir)
        splits = {}
        for split in TSV_FILES:
            image_dir = manual / IMAGE_DIRS[split]
            if image_dir.is_dir() and any(image_dir.glob("*.tar")):
                splits[split] = self._generate_examples(split, _rows_from_shards(image_dir))
            elif image_dir.is_dir() and (manual / TSV_FILES[split]).is_file():
                rows = _rows_from_files(manual / TSV_FILES[split], image_dir)
                splits[split] = self._generate_examples(split, self._read_images(rows))
        if not splits:
            raise FileNotFoundError(
                f"no Conceptual Captions data in {manual}: found neither webdataset shards in "
                f"{IMAGE_DIRS['train']}/ or {IMAGE_DIRS['validation']}/ nor a TSV file with its image folder."
                f"\n{MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        self.info.metadata["skipped"] = {split: dict.fromkeys(SKIP_REASONS, 0) for split in splits}
        return splits

    @staticmethod
    def _read_images(rows):
        for key, caption, url, path in rows:
            yield key, caption, url, path.read_bytes() if path is not None else None

    def _generate_examples(self, split: str, rows):
        skipped = self.info.metadata["skipped"][split]
        with concurrent.futures.ThreadPoolExecutor(self.VALIDATION_WORKERS) as pool:
            while block := [r for _, r in zip(range(256), rows)]:
                checks = pool.map(lambda r: r[3] is not None and _is_decodable(r[3]), block)
                for (key, caption, url, data), decodable in zip(block, checks):
                    if data is None:
                        skipped["missing_image"] += 1
                    elif not decodable:
                        skipped["undecodable_image"] += 1
                    elif not caption.strip():
                        skipped["empty_caption"] += 1
                    else:
                        yield str(key), {"image": data, "caption": caption.strip(), "url": url, "key": str(key)}
        if any(skipped.values()):
            logging.warning("conceptual_captions[%s]: skipped %s", split, skipped)

