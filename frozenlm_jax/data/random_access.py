"""ArrayRecord copies of TFRecord-prepared tfds datasets, so the input pipeline can read them by index.

    python -m frozenlm_jax.data.random_access coco_captions --data_dir=~/tensorflow_datasets

adds `.array_record` shards beside the `.tfrecord` ones (same records, same order) and records the extra
format in the dataset info; `tfds.load` keeps reading the TFRecords, `tfds.data_source` reads the copy.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


def write_array_record_copy(info: tfds.core.DatasetInfo) -> None:
    """Writes an ArrayRecord shard for every TFRecord shard of every split in `info` and registers the format."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if info.file_format != tfds.core.FileFormat.TFRECORD:
        raise ValueError(f"{info.full_name} is stored as {info.file_format}, not TFRecord; nothing to copy from")
    for split_info in info.splits.values():
        template = split_info.filename_template
        copy = template.replace(filetype_suffix=ARRAY_RECORD.file_suffix)
        sources = sorted(template.sharded_filepaths(split_info.num_shards))
        targets = sorted(copy.sharded_filepaths(split_info.num_shards))
        for source, target in zip(sources, targets):
            writer = ArrayRecordWriter(os.fspath(target), "group_size:1")
            for record in tf.data.TFRecordDataset(os.fspath(source)).as_numpy_iterator():
                writer.write(record)
            writer.close()
    info.add_alternative_file_format(ARRAY_RECORD)


def add_random_access_copy(name: str, data_dir: str | None = None) -> None:
    """Gives an already prepared dataset an ArrayRecord copy, unless it has one."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"{name} is not prepared in {builder.data_dir}; run `tfds build {name}` first")
    if ARRAY_RECORD in builder.info.available_file_formats():
        print(f"{name} in {builder.data_dir} already has ArrayRecord files")
        return
    write_array_record_copy(builder.info)
    builder.info.write_to_directory(builder.data_dir)
    print(f"wrote ArrayRecord files for {name} in {builder.data_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="tfds name, with config and version if needed: coco_captions/2017")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    add_random_access_copy(args.name, args.data_dir)


if __name__ == "__main__":
    main()
