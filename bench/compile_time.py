"""Compile time of the training step and of greedy decoding, `scan_layers` off and on, as the LM gets deeper.

    python -m bench.compile_time                       # llama-tiny width, 2, 4, 8, 16, 32 layers
    python -m bench.compile_time --depths=2,4 --vision=nf_resnet_tiny   # smoke test

Random-weight LMs of llama-tiny width (hidden 64, 4 heads, 2 KV heads, MLP 128) so that the time is the
compiler's, not the weights'. Train step: `make_trainer(...).step.lower(...)` (trace + lowering) and
`.compile()` (XLA), timed apart. Decoding: the first call of `greedy_generate` (trace, compile and run)
minus the median of later calls (run only). Each depth runs in its own child process (nothing cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench.children import run_json_child
from bench.measure import cpu_model
from bench.workload import LM_PRESETS, make_batch


def measure(depth: int, scan: bool, vision: str, image_size: int, batch: int, caption_len: int,
            max_new_tokens: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from frozenlm_jax.decode import greedy_generate
    from frozenlm_jax.models.frozen import Frozen
    from frozenlm_jax.models.lm import DecoderLM, LMConfig
    from frozenlm_jax.models.vision import encoder_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.train.state import init_train_state
    from frozenlm_jax.train.step import make_trainer

    config = LMConfig(**dict(LM_PRESETS["llama-tiny"], num_layers=depth), scan_layers=scan)
    model = Frozen(config, encoder_config(vision), 2)
    image_shape = (image_size, image_size, 3)
    trainer = make_trainer(model, make_mesh({"data": -1}), label_rules=VARIANT_LABEL_RULES["frozen"],
                           image_shape=image_shape, optimizer_kwargs=dict(learning_rate=1e-4),
                           max_targets=caption_len)
    state, frozen = init_train_state(trainer, jax.random.key(0), None, image_shape)
    sharded = trainer.shard_batch(make_batch(batch, image_size, 2, caption_len, config.vocab_size))
    jax.block_until_ready((state, frozen, sharded))
    start = time.perf_counter()
    lowered = trainer.step.lower(state, frozen, sharded)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start

    lm = DecoderLM(config)
    params = nn.unbox(jax.jit(lambda r: lm.init(r, jnp.zeros((1, 1), jnp.int32))["params"])(jax.random.key(0)))
    prompts = [[1, 2, 3, 4, 5]] * 2
    start = time.perf_counter()
    jax.block_until_ready(greedy_generate(lm, params, prompts, max_new_tokens, eos_id=None))
    first = time.perf_counter() - start
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(greedy_generate(lm, params, prompts, max_new_tokens, eos_id=None))
        runs.append(time.perf_counter() - start)
    return {"depth": depth, "scan_layers": scan, "step_lower_s": round(lower_s, 2),
            "step_compile_s": round(compile_s, 2), "decode_compile_s": round(first - statistics.median(runs), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="2,4,8,16,32")
    parser.add_argument("--vision", default="nf_resnet_tiny")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--caption_len", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--scans", default="0,1", help="scan_layers settings to measure (0: unrolled, 1: scan)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.vision, args.image_size, args.batch, args.caption_len, args.max_new_tokens)
    if args.child:
        depth, scan = args.child.split(":")
        print(json.dumps(measure(int(depth), scan == "1", *common)))
        return
    load = os.getloadavg()
    print(f"# {cpu_model()}, {len(os.sched_getaffinity(0))} cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start; llama-tiny width, vision {args.vision} at {args.image_size} px", flush=True)
    # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR, as the tests set) would time cache loads.
    uncached_env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for scan in [s == "1" for s in args.scans.split(",")]:
            rows.append(run_json_child("bench.compile_time", [*sys.argv[1:], f"--child={depth}:{int(scan)}"],
                                       f"child failed (depth {depth}, scan_layers={scan})", uncached_env))
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    print(f"\n# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| layers | train step lower s (unrolled / scan) | train step XLA compile s (unrolled / scan) | "
          "decode compile s (unrolled / scan) |")
    print("|---|---|---|---|")
    by = {(r["depth"], r["scan_layers"]): r for r in rows}
    missing = dict(step_lower_s="-", step_compile_s="-", decode_compile_s="-")
    for depth in sorted({r["depth"] for r in rows}):
        a, b = by.get((depth, False), missing), by.get((depth, True), missing)
        print(f"| {depth} | {a['step_lower_s']} / {b['step_lower_s']} | {a['step_compile_s']} / {b['step_compile_s']} | "
              f"{a['decode_compile_s']} / {b['decode_compile_s']} |")


if __name__ == "__main__":
    main()
