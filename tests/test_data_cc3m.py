"""The Conceptual Captions builder over a small manual directory: image files by row, webdataset shards."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from frozenlm_jax.data import cc3m
from frozenlm_jax.data.pipeline import CaptionPipeline, CaptionSource, PipelineConfig
from frozenlm_jax.tokenizer import byte_tokenizer

tf.config.set_visible_devices([], "GPU")


def _jpeg(value, shape=(30, 40, 3)):
    return tf.io.encode_jpeg(np.full(shape, value, np.uint8)).numpy()


def _png(value, shape):
    return tf.io.encode_png(np.full(shape, value, np.uint8)).numpy()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Train: files named by TSV row; validation: an img2dataset shard. Each has bad rows."""
    manual = tmp_path_factory.mktemp("manual")
    rows = [
        ("a dog on a beach", _jpeg(200), "000000000.jpg"),
        ("a corrupt download", _jpeg(10)[:40], "1.jpg"),  # truncated JPEG
        ("an image that never arrived", None, None),
        ("a gray square", _png(90, (20, 20, 1)), "3.png"),
        ("   ", _jpeg(50), "4.jpg"),
        ("a see-through thing", _png(120, (16, 24, 4)), "5.png"),
    ]
    (manual / "training").mkdir()
    with open(manual / cc3m.TSV_FILES["train"], "w") as f:
        f.write("caption\turl\n")  # the header img2dataset wants; rows still count from the first image
        for row, (caption, data, name) in enumerate(rows):
            f.write(f"{caption}\thttp://example.com/{row}.jpg\n")
            if data is not None:
                (manual / "training" / name).write_bytes(data)
    (manual / "validation").mkdir()
    with tarfile.open(manual / "validation" / "00000.tar", "w") as tar:
        members = {
            "000000000.jpg": _jpeg(30),
            "000000000.txt": b"a valid shard sample",
            "000000000.json": json.dumps({"url": "http://example.com/v0.jpg", "key": "000000000"}).encode(),
            "000000001.jpg": b"<html>404</html>",
            "000000001.txt": b"an error page saved as jpg",
        }
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = cc3m.ConceptualCaptions(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual)))
    return os.fspath(data_dir)


def test_good_rows_are_kept_and_bad_ones_counted(prepared):
    builder = tfds.builder("conceptual_captions", data_dir=prepared)  # reloaded from the prepared files
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["validation"].num_examples == 1
    assert builder.info.metadata["skipped"] == {
        "train": {"missing_image": 1, "undecodable_image": 1, "empty_caption": 1},
        "validation": {"missing_image": 0, "undecodable_image": 1, "empty_caption": 0},
    }
    source = tfds.data_source("conceptual_captions", split="validation", data_dir=prepared,
                              deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE)
    feature = source[0].features.feature
    assert feature["caption"].bytes_list.value[0] == b"a valid shard sample"
    assert feature["url"].bytes_list.value[0] == b"http://example.com/v0.jpg"


def test_rows_run_through_the_pipeline_as_rgb(prepared):
    tokenizer = byte_tokenizer()
    source = CaptionSource("conceptual_captions", data_dir=prepared, caption_key="caption")
    config = PipelineConfig(image_size=16, max_len=40, batch_size=3, shuffle=False, repeat=False)
    pipeline = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1)
    (batch,) = list(pipeline)
    captions = [tokenizer.decode(t[m][:-1]) for t, m in zip(batch["tokens"], batch["loss_mask"])]
    assert sorted(captions) == ["a dog on a beach", "a gray square", "a see-through thing"]
    for caption, image in zip(captions, batch["images"][:, 0]):
        expected = {"a dog on a beach": 200, "a gray square": 90, "a see-through thing": 120}[caption]
        np.testing.assert_allclose(image, expected / 127.5 - 1, atol=0.03)  # grey and RGBA become RGB
    assert pipeline.metrics()["data/skipped_bad_image"] == 0


def test_missing_manual_data_says_what_to_put_where(tmp_path):
    builder = cc3m.ConceptualCaptions(data_dir=tmp_path / "tfds")
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(tmp_path / "manual"))
    with pytest.raises(AssertionError, match="does not exist or is empty(.|\n)*Train_GCC-training.tsv"):
        builder.download_and_prepare(download_config=config)  # tfds' own check, with our instructions
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / cc3m.TSV_FILES["train"]).write_text("a caption\thttp://example.com/0.jpg\n")
    with pytest.raises(FileNotFoundError, match="found neither webdataset shards") as error:
        builder.download_and_prepare(download_config=config)  # a TSV without its image folder
    assert "img2dataset" in str(error.value) and os.fspath(tmp_path / "manual") in str(error.value)
