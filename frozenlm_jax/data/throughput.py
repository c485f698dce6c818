"""Measures the input pipeline's throughput (examples/s) on a frozen_shapes train split prepared for it.

    python -m frozenlm_jax.data.throughput --image_size=64 --batch_size=32 --batches=100

Compare the result with the training step's consumption (batch_size × steps/s): training must never
wait on input.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Sequence

import tensorflow_datasets as tfds

from frozenlm_jax.data import shapes
from frozenlm_jax.data.pipeline import CaptionPipeline, CaptionSource, PipelineConfig
from frozenlm_jax.tokenizer import byte_tokenizer


def measure(image_size: int, batch_size: int, batches: int, data_dir: str, augment: bool = False, warmup: int = 5) -> float:
    """Examples per second after `warmup` batches, over `batches` batches of a 2000-example split."""
    config = shapes.FrozenShapesConfig(
        name=f"throughput_{image_size}", image_size=image_size, num_train=2000, num_validation=8, num_test=8
    )
    tfds.builder("frozen_shapes", config=config, data_dir=data_dir).download_and_prepare()
    source = CaptionSource(f"frozen_shapes/{config.name}", data_dir=data_dir)
    pipeline_config = PipelineConfig(image_size=image_size, max_len=64, batch_size=batch_size, augment=augment)
    pipeline = CaptionPipeline(source, pipeline_config, byte_tokenizer(), process_index=0, process_count=1)
    for _ in range(warmup):
        next(pipeline)
    start = time.perf_counter()
    for _ in range(batches):
        next(pipeline)
    rate = batches * batch_size / (time.perf_counter() - start)
    pipeline.close()
    return rate


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "frozenlm_jax_throughput"))
    args = parser.parse_args(argv)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores")
    for size in args.image_size:
        rate = measure(size, args.batch_size, args.batches, args.data_dir, args.augment)
        print(f"image_size={size} batch_size={args.batch_size} augment={args.augment}: {rate:.0f} examples/s")


if __name__ == "__main__":
    main()
