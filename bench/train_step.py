"""Training-step time, peak host memory, MFU and the FLOP saving of freezing by argument.

    python bench/train_step.py [--lm=smollm2-135m] [--vision=nf_resnet_small] [--batches=16,32] [--steps=5]
    python bench/train_step.py --lm=random:llama-1b --lm_dtype=bfloat16 --batches=64 --caption_len=254

Frozen SmolLM2-135M (or a random-weight preset such as Llama-3.2-1B's shape) + a small NF-ResNet at 64 px,
captions of 16 tokens, n = 2 prefix tokens. Each batch size runs in its own child process (so peak RSS is
its own); the FLOPs of the compiled step (XLA's cost analysis) are compared with the same step asked to
also return the LM's weight gradients, and divided by the step time and by the chip's peak: both the
spec peak given with --peak_tflops and a large matmul measured in the same process.
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

# Random-weight LMs of published shapes (no download): name -> LMConfig fields.
LM_PRESETS = {
    "llama-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                     tie_word_embeddings=True),
    "llama-tiny": dict(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128),
}


def matmul_tflops(dtype: str, size: int = 8192, repeats: int = 10) -> float:
    """Achieved TFLOP/s of a [size, size] @ [size, size] matmul in `dtype` on the default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


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

    if lm_source.startswith("random:"):
        from frozenlm_jax.models.lm import LMConfig

        lm_config = LMConfig(**LM_PRESETS[lm_source.split(":", 1)[1]], dtype=lm_dtype, param_dtype=lm_dtype)
        lm_params = None  # initialised on the device, in its sharding
    else:
        lm = load_lm(lm_source, dtype=lm_dtype)
        lm_config, lm_params = lm.config, lm.params
    model = Frozen(lm_config, vision_config(vision), prefix)
    mesh = make_mesh({"data": -1})
    image_shape = (image_size, image_size, 3)
    length = prefix + caption_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm_config.vocab_size, (batch_size, length)).astype(np.int32)
    batch = dict(tokens=tokens, images=rng.uniform(0, 1, (batch_size, 1) + image_shape).astype(np.float32),
                 image_mask=np.ones((batch_size, 1), bool), image_positions=np.zeros((batch_size, 1), np.int32),
                 loss_mask=np.arange(length)[None].repeat(batch_size, 0) >= prefix)
    result = {}
    for return_frozen_grads in ((False, True) if flops_only else (False,)):
        trainer = make_trainer(model, mesh, label_rules=VARIANT_LABEL_RULES["frozen"], image_shape=image_shape,
                               optimizer_kwargs=dict(learning_rate=1e-3), max_targets=caption_len,
                               return_frozen_grads=return_frozen_grads)
        state, frozen = init_params(trainer, jax.random.key(0), lm_params, image_shape)
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
        achieved = result["flops"] / step_s / 1e12
        measured_peak = matmul_tflops(lm_dtype)
        result.update(step_s=round(step_s, 3), examples_per_s=round(batch_size / step_s, 1),
                      tokens_per_step=batch_size * length, tokens_per_s=round(batch_size * length / step_s),
                      achieved_tflops=round(achieved, 2), matmul_tflops=round(measured_peak, 2),
                      mfu_vs_matmul=round(achieved / measured_peak, 3), device=str(jax.devices()[0].device_kind),
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
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the chip's dense spec peak in --lm_dtype (e.g. 989 for an H100/H200 in bfloat16)")
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
        if args.peak_tflops:
            row["mfu_vs_spec"] = round(row["achieved_tflops"] / args.peak_tflops, 3)
        rows.append(row)
    print(json.dumps({"cpu": cpu_model(), "lm": args.lm, "vision": args.vision, "image_size": args.image_size,
                      "caption_len": args.caption_len, "prefix": args.prefix, "lm_dtype": args.lm_dtype,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
