"""Load time, host peak memory and 1x128-token forward time of an LM, beside transformers' PyTorch model.

    python -m bench.lm_load_forward [--lm=smollm2-135m] [--tokens=128] [--repeats=20]

Loading runs in a fresh child process so its peak resident memory is its own; the forward passes of both
implementations run in this process on the same token ids, alternating, and medians are compared.
Needs the `test` extra (torch) for the reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from bench.measure import cpu_model

LOAD_CHILD = """
import json, resource, sys, time
start = time.perf_counter()
import jax, frozenlm_jax
jax.numpy.zeros(1).block_until_ready()
imported = time.perf_counter()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lm = frozenlm_jax.load_lm(sys.argv[1])
jax.block_until_ready(lm.params)
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": done - imported,
                  "rss_after_import_mib": base_rss / 1024,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure_load(lm: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, lm], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers

    import frozenlm_jax
    from frozenlm_jax.weights.registry import NAMED_LMS, fetch_named

    path = fetch_named(args.lm) if args.lm in NAMED_LMS else None
    load = measure_load(args.lm)
    lm = frozenlm_jax.load_lm(args.lm)
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, (1, args.tokens)).astype(np.int32)
    forward = jax.jit(lambda p, x: lm.model.apply({"params": p}, x))
    compile_start = time.perf_counter()
    forward(lm.params, ids).block_until_ready()
    compile_s = time.perf_counter() - compile_start

    if path is not None:
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32)
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(args.lm, dtype=torch.float32)
    ref.eval()
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        ref(ids_t)

    ours, theirs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward(lm.params, ids).block_until_ready()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            ref(ids_t)
        theirs.append(time.perf_counter() - start)
    ours_ms, theirs_ms = 1e3 * statistics.median(ours), 1e3 * statistics.median(theirs)
    report = {
        "cpu": cpu_model(), "cores": len(__import__("os").sched_getaffinity(0)), "lm": args.lm,
        "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        **{k: round(v, 2) for k, v in load.items()},
        "forward_tokens": args.tokens, "jax_compile_s": round(compile_s, 2),
        "jax_forward_ms": round(ours_ms, 1), "torch_forward_ms": round(theirs_ms, 1),
        "speedup_vs_torch": round(theirs_ms / ours_ms, 2),
        "this_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
