"""The input pipeline: the batch contract, determinism, resume, host shards, skipped records, global arrays."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import bos_tokenizer
from etils import epath

from frozenlm_jax.data import random_access, shapes
from frozenlm_jax.data.batch import TextLayout, make_global_batch, stack
from frozenlm_jax.data.pipeline import CaptionPipeline, CaptionSource, PipelineConfig
from frozenlm_jax.tokenizer import byte_tokenizer

tf.config.set_visible_devices([], "GPU")

TINY = shapes.FrozenShapesConfig(name="pipeline_test", image_size=32, num_train=40, num_validation=20, num_test=4)
CONFIG = PipelineConfig(image_size=24, max_len=128, batch_size=8, seed=3)  # byte tokens: captions fit
NO_DECODE = tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    tfds.builder("frozen_shapes", config=TINY, data_dir=root).download_and_prepare()
    return os.fspath(root)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _source(data_dir, split="train"):
    return CaptionSource(f"frozen_shapes/{TINY.name}", split=split, data_dir=data_dir)


def _take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _records(data_dir, split, process_index=0, process_count=1):
    subsplit = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
    return tfds.data_source(f"frozen_shapes/{TINY.name}", split=subsplit, data_dir=data_dir, deserialize_method=NO_DECODE)


def test_caption_layout_targets_exactly_the_caption_and_eos(tokenizer):
    layout = TextLayout(tokenizer, max_len=12, num_prefix=2)
    tokens, loss_mask, position = layout.caption("a dax")
    eos = tokenizer.eos_id
    assert position == 0
    assert tokens.tolist() == [eos, eos, *b"a dax", eos, eos, eos, eos, eos]
    assert loss_mask.tolist() == [False] * 2 + [True] * 6 + [False] * 4
    tokens, loss_mask, _ = layout.caption("a much longer caption")  # cut, EOS included
    assert tokens.tolist() == [eos, eos, *b"a much lon"] and loss_mask[2:].all() and not loss_mask[:2].any()

    with_bos = bos_tokenizer()
    layout = TextLayout(with_bos, max_len=10, num_prefix=2)
    tokens, loss_mask, position = layout.caption("ab")
    bos = with_bos.bos_id
    assert position == 1 and layout.pad_id == eos  # no pad id: EOS pads
    assert tokens.tolist() == [bos, eos, eos, *b"ab", eos, eos, eos, eos, eos]
    assert np.flatnonzero(loss_mask).tolist() == [3, 4, 5]


def test_prompt_places_images_where_the_text_leaves_them(tokenizer):
    layout = TextLayout(tokenizer, max_len=40, num_prefix=2)
    img = np.ones((4, 4, 3), np.float32)
    parts = [img, "is a dax.", 2 * img, "Q: what? A:"]
    ex = layout.prompt(parts, max_images=3, answer="dax")
    assert ex["image_positions"].tolist() == [0, 11, 0] and ex["image_mask"].tolist() == [True, True, False]
    np.testing.assert_array_equal(ex["images"][1], 2 * img)
    assert not ex["images"][2].any()
    assert tokenizer.decode(ex["tokens"][2:11]) == "is a dax."
    assert tokenizer.decode(ex["tokens"][ex["loss_mask"]]) == " dax<|endoftext|>"
    left = layout.prompt(parts, max_images=3, pad_left=True)
    shift = 40 - 24
    assert left["image_positions"].tolist() == [shift, shift + 11, 0] and not left["loss_mask"].any()
    np.testing.assert_array_equal(left["tokens"][shift:], ex["tokens"][:24])
    batch = stack([ex, left])
    assert batch["images"].shape == (2, 3, 4, 4, 3) and batch["image_positions"].tolist() == [[0, 11, 0], [16, 27, 0]]
    with pytest.raises(ValueError, match="max_len=40; raise max_len"):
        layout.prompt([img, "x" * 40], max_images=1)
    with pytest.raises(ValueError, match="max_images=1"):
        layout.prompt(parts, max_images=1)


def test_batches_follow_the_contract_and_match_their_records(data_dir, tokenizer):
    pipeline = CaptionPipeline(_source(data_dir), CONFIG, tokenizer, process_index=0, process_count=1)
    batch = next(pipeline)
    assert batch["tokens"].shape == (8, 128) and batch["tokens"].dtype == np.int32
    assert batch["images"].shape == (8, 1, 24, 24, 3) and batch["images"].dtype == np.float32
    assert batch["image_mask"].all() and (batch["image_positions"] == 0).all()
    records = _records(data_dir, "train")
    for row, record in enumerate(pipeline.last_records):
        feature = records[int(record)].features.feature
        captions = [c.decode() for c in feature["captions"].bytes_list.value]
        target = tokenizer.decode(batch["tokens"][row][batch["loss_mask"][row]])
        assert target.endswith("<|endoftext|>") and target.removesuffix("<|endoftext|>") in captions
        assert not batch["loss_mask"][row, :2].any() and batch["loss_mask"][row, 2]
        png = feature["image"].bytes_list.value[0]
        expected = tf.image.resize(tf.io.decode_png(png), [24, 24], antialias=True).numpy() / 127.5 - 1
        np.testing.assert_allclose(batch["images"][row, 0], expected, atol=1e-5)
    assert pipeline.metrics() == {"data/examples": 8, "data/epoch": 0, "data/skipped_empty_caption": 0,
                                  "data/skipped_bad_image": 0}


def test_same_seed_same_batches_and_resume_continues_exactly(data_dir, tokenizer):
    config = PipelineConfig(**{**vars(CONFIG), "augment": True})
    source = _source(data_dir)
    full = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1)
    uninterrupted = _take(full, 7)  # 56 examples: crosses into the second epoch of 40
    assert full.epoch == 1

    first = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1)
    _assert_same(_take(first, 4), uninterrupted[:4])
    state = first.get_state()
    assert state["position"] == 32 and state["batches"] == 4
    first.close()
    resumed = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1, state=state)
    _assert_same(_take(resumed, 3), uninterrupted[4:])

    other_seed = CaptionPipeline(source, PipelineConfig(**{**vars(config), "seed": 4}), tokenizer, process_index=0, process_count=1)
    assert not np.array_equal(next(other_seed)["tokens"], uninterrupted[0]["tokens"])
    with pytest.raises(ValueError, match="seed=3 but this run has seed=4"):
        other_seed.set_state(state)


def test_each_epoch_visits_every_record_once_in_a_new_order(data_dir, tokenizer):
    pipeline = CaptionPipeline(_source(data_dir), CONFIG, tokenizer, process_index=0, process_count=1)
    epochs = []
    for _ in range(2):
        records = []
        for _ in range(5):
            next(pipeline)
            records += pipeline.last_records.tolist()
        epochs.append(records)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert epochs[0] != epochs[1]


def test_two_processes_get_disjoint_shards_that_cover_the_split(data_dir, tokenizer):
    seen = []
    for process_index in range(2):
        pipeline = CaptionPipeline(_source(data_dir), CONFIG, tokenizer, process_index=process_index, process_count=2)
        assert pipeline.local_batch_size == 4 and pipeline.num_records == 20
        records = _records(data_dir, "train", process_index, 2)
        ids = []
        for _ in range(5):
            next(pipeline)
            ids += [records[int(r)].features.feature["image_id"].int64_list.value[0] for r in pipeline.last_records]
        assert len(set(ids)) == 20
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(TINY.num_train))
    with pytest.raises(ValueError, match="batch_size=8 is not divisible by process_count=3"):
        CaptionPipeline(_source(data_dir), CONFIG, tokenizer, process_index=0, process_count=3)


def test_interleaved_hosts_rebuild_the_single_process_batches_and_resume(data_dir, tokenizer):
    import dataclasses

    config = dataclasses.replace(CONFIG, host_order="interleave", augment=True)
    single = _take(CaptionPipeline(_source(data_dir), config, tokenizer, process_index=0, process_count=1), 7)
    hosts = [CaptionPipeline(_source(data_dir), config, tokenizer, process_index=i, process_count=2) for i in range(2)]
    per_host = [_take(p, 4) for p in hosts]
    # Resume host 1 from its state after 4 batches; it must continue as if never stopped.
    resumed = CaptionPipeline(_source(data_dir), config, tokenizer, process_index=1, process_count=2,
                              state=hosts[1].get_state())
    per_host[0] += _take(hosts[0], 3)
    per_host[1] += _take(resumed, 3)
    rebuilt = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*per_host)]
    _assert_same(rebuilt, single)  # 7 batches of 8 cross the 40-record epoch boundary
    with pytest.raises(ValueError, match="host_order='interleave' is for training streams"):
        dataclasses.replace(CONFIG, host_order="interleave", repeat=False)


def test_single_pass_ends_with_masked_padding(data_dir, tokenizer):
    config = PipelineConfig(**{**vars(CONFIG), "repeat": False, "shuffle": False})
    pipeline = CaptionPipeline(_source(data_dir, "validation"), config, tokenizer, process_index=0, process_count=1)
    assert pipeline.num_batches == 3
    batches = list(pipeline)
    assert len(batches) == 3 and pipeline.last_records.tolist() == list(range(16, 20))
    last = batches[-1]
    assert last["image_mask"][:4].all() and not last["image_mask"][4:].any()
    assert last["loss_mask"][:4].any(axis=1).all() and not last["loss_mask"][4:].any()
    assert not last["images"][4:].any()


def test_global_batch_is_sharded_over_the_data_axis(data_dir, tokenizer):
    import jax
    from jax.sharding import Mesh

    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    pipeline = CaptionPipeline(_source(data_dir), CONFIG, tokenizer)  # this process's index and count
    local = next(pipeline)
    batch = make_global_batch(local, mesh)
    assert batch["images"].shape == (8, 1, 24, 24, 3) and batch["tokens"].shape == (8, 128)
    assert batch["tokens"].sharding.spec[0] == "data"
    rows = {shard.index[0].start or 0 for shard in batch["tokens"].addressable_shards}
    assert len(rows) == min(len(devices), 8)
    np.testing.assert_array_equal(np.asarray(batch["loss_mask"]), local["loss_mask"])


class _Records(list):
    def __init__(self, records, dataset_info):
        super().__init__(records)
        self.dataset_info = dataset_info


def _coco_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
    """16 coco_captions records serialized by the real builder's features (tfds' own mock fails to
    serialize coco's nested `objects`): images of odd sizes, 1-5 captions, some blank, and boxes."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(16):
        n_captions, n_objects = int(rng.integers(1, 6)), int(rng.integers(0, 3))
        example = {
            "image": rng.integers(0, 256, (int(rng.integers(20, 50)), int(rng.integers(20, 50)), 3), dtype=np.uint8),
            "image/filename": f"{i:012d}.jpg",
            "image/id": i,
            "captions": {"id": list(range(n_captions)), "text": [f"caption {i}.{j}" if j % 3 else " " for j in range(n_captions)]},
            "objects": {
                "area": [10] * n_objects,
                "bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)] * n_objects,
                "id": list(range(n_objects)),
                "is_crowd": [False] * n_objects,
                "label": [1] * n_objects,
            },
        }
        records.append(builder.info.features.serialize_example(builder.info.features.encode_example(example)))
    return _Records(records, builder.info)


def test_coco_captions_features_run_through_the_pipeline(tokenizer):
    source = CaptionSource("coco_captions", split="train", caption_key="captions/text")
    with tfds.testing.mock_data(num_examples=16, as_data_source_fn=_coco_data_source):
        pipeline = CaptionPipeline(source, CONFIG, tokenizer, process_index=0, process_count=1)
        batches = _take(pipeline, 3)  # crosses an epoch of 16
    captions = {tokenizer.decode(t[m][:-1]) for batch in batches for t, m in zip(batch["tokens"], batch["loss_mask"])}
    assert captions and all(c.startswith("caption ") and not c.endswith(".0") for c in captions)
    for batch in batches:
        assert batch["images"].shape == (8, 1, 24, 24, 3) and np.isfinite(batch["images"]).all()
        assert np.abs(batch["images"]).max() <= 1.0 + 1e-6
        for tokens, loss_mask in zip(batch["tokens"], batch["loss_mask"]):
            targets = tokens[loss_mask]
            assert loss_mask[2] and not loss_mask[:2].any() and len(targets) >= 2
            assert targets[-1] == tokenizer.eos_id or loss_mask[-1]  # EOS ends it unless it was cut


class BadRecordsTest(tfds.core.GeneratorBasedBuilder):
    """Ten captioned PNGs, of which one is not an image and one has only a blank caption."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)  # a test module is not a package: tell tfds where the builder lives
    pkg_dir_path = epath.Path(__file__).parent

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(10):
            image = tf.io.encode_png(np.full((6 + i, 9, 3), 20 * i, np.uint8)).numpy()
            yield i, {"image": b"not an image" if i == 3 else image, "caption": "   " if i == 6 else f"picture {i}"}


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer):
    BadRecordsTest(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    source = CaptionSource("bad_records_test", data_dir=os.fspath(tmp_path), caption_key="caption")
    config = PipelineConfig(**{**vars(CONFIG), "batch_size": 4})
    pipeline = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1)
    captions = []
    for batch in _take(pipeline, 4):  # 16 examples: all 8 good records twice
        captions += [tokenizer.decode(t[m][:-1]) for t, m in zip(batch["tokens"], batch["loss_mask"])]
    assert sorted(set(captions)) == sorted(f"picture {i}" for i in range(10) if i not in (3, 6))
    position = pipeline.get_state()["position"]
    assert 18 <= position <= 20  # epoch 0 (10 records) and enough of epoch 1 for 8 more good ones
    seen_in_epoch_1 = pipeline._order(1)[: position - 10].tolist()
    assert pipeline.metrics() == {
        "data/examples": 16,
        "data/epoch": position // 10,
        "data/skipped_bad_image": 1 + (3 in seen_in_epoch_1),
        "data/skipped_empty_caption": 1 + (6 in seen_in_epoch_1),
    }
    resumed = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1, state=pipeline.get_state())
    assert resumed.metrics() == pipeline.metrics()


def test_tfrecord_only_datasets_get_a_random_access_copy(tmp_path, tokenizer):
    BadRecordsTest(data_dir=tmp_path, file_format="tfrecord").download_and_prepare()
    source = CaptionSource("bad_records_test", data_dir=os.fspath(tmp_path), caption_key="caption")
    with pytest.raises(ValueError, match="python -m frozenlm_jax.data.random_access bad_records_test"):
        CaptionPipeline(source, CONFIG, tokenizer, process_index=0, process_count=1)
    random_access.add_random_access_copy("bad_records_test", os.fspath(tmp_path))
    config = PipelineConfig(**{**vars(CONFIG), "batch_size": 8, "shuffle": False, "repeat": False})
    pipeline = CaptionPipeline(source, config, tokenizer, process_index=0, process_count=1)
    batch, padding = list(pipeline)  # 10 records make 2 batches of 8; the 2 bad ones leave the second empty
    assert sorted(tokenizer.decode(t[m][:-1]) for t, m in zip(batch["tokens"], batch["loss_mask"])) == sorted(
        f"picture {i}" for i in range(10) if i not in (3, 6)
    )
    assert not padding["loss_mask"].any() and not padding["image_mask"].any()
    skip_images = {"image": tfds.decode.SkipDecoding()}  # tfds.load still reads the TFRecords
    assert len(list(tfds.load("bad_records_test", split="train", data_dir=os.fspath(tmp_path), decoders=skip_images))) == 10
