"""Training-step time, peak host memory and the FLOP saving of freezing by argument.

    python bench/train_step.py [--lm=smollm2-135m] [--vision=nf_resnet_small] [--batches=16,32] [--steps=5]

Frozen SmolLM2-135M + a small NF-ResNet at 64 px, captions of 16 tokens, n = 2 prefix tokens. Each batch
size runs in its own child process (so peak RSS is its own); the FLOPs of the compiled step are compared
with the same step asked to also return the LM's weight gradients.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from lm_load_forward import cpu_model


def run_case(lm_source: str, vision: str, batch_size: int, steps: int, image_size: int, caption_len: int,
             prefix: int, lm_dtype: str, flops_only: bool) -> dict:
    import jax
    import numpy as np

    from frozenlm_jax import load_lm
    from frozenlm_jax.models.frozen import Frozen
    from frozenlm_jax.models.vision import vision_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.train.step import init_params, make_trainer

    lm = load_lm(lm_source, dtype=lm_dtype)
    model = Frozen(lm.config, vision_config(vision), prefix)
    mesh = make_mesh({"data": -1})
    image_shape = (image_size, image_size, 3)
    length = prefix + caption_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.config.vocab_size, (batch_size, length)).astype(np.int32)
    batch = dict(tokens=tokens, images=rng.uniform(0, 1, (batch_size, 1) + image_shape).astype(np.float32),
                 image_mask=np.ones((batch_size, 1), bool), image_positions=np.zeros((batch_size, 1), np.int32),
                 loss_mask=np.arange(length)[None].repeat(batch_size, 0) >= prefix)
    result = {}
    for return_frozen_grads in ((False, True) if flops_only else (False,)):
        trainer = make_trainer(model, mesh, label_rules=VARIANT_LABEL_RULES["frozen"], image_shape=image_shape,
                               optimizer_kwargs=dict(learning_rate=1e-3), max_targets=caption_len,
                               return_frozen_grads=return_frozen_grads)
        state, frozen = init_params(trainer, jax.random.key(0), lm.params, image_shape)
        sharded = trainer.shard_batch(batch)
        start = time.perf_counter()
        compiled = trainer.step.lower(state, frozen, sharded).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        key = "flops_with_lm_weight_grads" if return_frozen_grads else "flops"
        result[key] = analysis["flops"]
        if flops_only:
            continue
        result["compile_s"] = round(time.perf_counter() - start, 1)
        times = []
        for i in range(steps + 2):
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, sharded)
            jax.block_until_ready(metrics["loss"])
            if i >= 2:
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        result.update(step_s=round(step_s, 3), examples_per_s=round(batch_size / step_s, 1),
                      peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--vision", default="nf_resnet_small")
    parser.add_argument("--batches", default="16,32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--caption_len", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=2)
    parser.add_argument("--lm_dtype", default="float32")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.lm, args.vision)
    extra = (args.steps, args.image_size, args.caption_len, args.prefix, args.lm_dtype)
    if args.child:
        batch, flops_only = args.child.split(":")
        print(json.dumps(run_case(*common, int(batch), *extra, flops_only == "1")))
        return

    def child(batch, flops_only):
        cmd = [sys.executable, __file__, *sys.argv[1:], f"--child={batch}:{int(flops_only)}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        row = {"batch": batch, **child(batch, False)}
        flops = child(batch, True)
        row["flops_with_lm_weight_grads"] = flops["flops_with_lm_weight_grads"]
        row["flop_ratio_frozen_by_argument"] = round(row["flops"] / flops["flops_with_lm_weight_grads"], 3)
        rows.append(row)
    print(json.dumps({"cpu": cpu_model(), "lm": args.lm, "vision": args.vision, "image_size": args.image_size,
                      "caption_len": args.caption_len, "prefix": args.prefix, "lm_dtype": args.lm_dtype,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
