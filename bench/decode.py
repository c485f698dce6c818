"""Greedy decoding with the KV cache, tokens/s: ours (`frozenlm_jax.decode.greedy_generate`) against
transformers' `generate` on the same prompts.

    python -m bench.decode                       # SmolLM2-135M, batch 1 and 16, 64 new tokens, 2 rounds
    python -m bench.decode --batches=1,16,64 --max_new_tokens=128
    python -m bench.decode --dtype=bfloat16         # bfloat16 weights and compute, both implementations
    python -m bench.decode --lm=random:llama-tiny --batches=2 --max_new_tokens=4 --rounds=1   # smoke test

Both decode greedily, with no early stopping (ours: eos_id=None; transformers: no eos_token_id and
min_new_tokens = max_new_tokens), from the same left-padded token ids (ours rounds the prompt length up to a bucket of 16,
transformers pads to the longest prompt). Each implementation runs in its own child process, alternating
A B A B; the first (compiling / warm-up) call is timed apart, then medians of `--repeats` calls; the ratio
is reference time / our time. For a real checkpoint the generated tokens of both are compared too (in float32
they agree until a near-tie in the logits; in bfloat16 rounding differs, so they part sooner).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench.children import run_json_child
from bench.measure import PeakRSS, cpu_model
from bench.workload import LM_PRESETS, resolve_lm_config

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "A photo of",
    "Question: What colour is the sky on a clear day? Answer:",
    "The quick brown fox",
    "In machine learning, a language model is",
    "Here is a list of fruits: apples, bananas,",
    "def fibonacci(n):",
]


def prompt_ids(lm: str, lm_config: dict, batch: int) -> list[list[int]]:
    """`batch` prompts (the list above, repeated), as token ids of the LM's tokenizer (random ids for presets)."""
    if lm.startswith("random:"):
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.integers(0, lm_config["vocab_size"], 3 + i % 5).tolist() for i in range(batch)]
    from frozenlm_jax.weights import gguf as gguf_files

    path = Path(lm_config["gguf"])
    tokenizer = gguf_files.tokenizer_from_gguf(gguf_files.open_gguf(path), path)
    return [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]


def run_jax(lm: str, dtype: str, prompts, max_new_tokens: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from frozenlm_jax import load_lm
    from frozenlm_jax.decode import greedy_generate
    from frozenlm_jax.models.lm import DecoderLM, LMConfig

    if lm.startswith("random:"):
        config = LMConfig(**LM_PRESETS[lm.split(":", 1)[1]], dtype=dtype, param_dtype=dtype)
        model = DecoderLM(config)
        params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])(jax.random.key(0))
        import flax.linen as nn

        params = nn.unbox(params)
        pad_id = 0
    else:
        loaded = load_lm(lm, dtype=dtype)
        model, params = loaded.model, loaded.params
        pad_id = loaded.tokenizer.pad_id if getattr(loaded.tokenizer, "pad_id", None) is not None else 0
    tokens, timing = time_calls(
        lambda: greedy_generate(model, params, prompts, max_new_tokens, eos_id=None, pad_id=pad_id), repeats)
    return {"tokens": tokens, **timing}


def time_calls(call, repeats: int):
    """(the first call's result, {first_call_s, times_s of `repeats` more calls, peak RSS of each phase})."""
    rss = PeakRSS()
    rss.next_phase("first_step")
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    rss.next_phase("step")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return result, {"first_call_s": round(first, 2), "times_s": [round(t, 4) for t in times], **rss.result()}


def run_torch(lm: str, dtype: str, lm_config: dict, prompts, max_new_tokens: int, repeats: int) -> dict:
    import torch

    from bench.torch_reference import load_torch_lm

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = load_torch_lm(lm, lm_config, getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None  # as ours with eos_id=None: EOS is an ordinary token, no stop
    length = max(len(p) for p in prompts)
    pad_id = 0
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1

    def call():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                                  use_cache=True)

    out, timing = time_calls(call, repeats)
    return {"tokens": out[:, length:].tolist(), "torch_threads": torch.get_num_threads(), **timing}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m", help="a named LM / .gguf, or random:<preset>")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per child (after the first)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--impls", default="jax,torch")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the LM's weights and compute, in both implementations")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_args", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the torch child never imports jax: the parent passes the LM's shape
        prompts, lm_config = json.loads(args.child_args)
        if args.child == "jax":
            result = run_jax(args.lm, args.dtype, prompts, args.max_new_tokens, args.repeats)
        else:
            result = run_torch(args.lm, args.dtype, lm_config, prompts, args.max_new_tokens, args.repeats)
        print(json.dumps(result))
        return

    lm_config = resolve_lm_config(args.lm)
    impls = [i for i in args.impls.split(",") if i]
    load = os.getloadavg()
    print(f"# {cpu_model()}, {len(os.sched_getaffinity(0))} cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start; LM {args.lm} in {args.dtype}, greedy, {args.max_new_tokens} new tokens, "
          "no early stop", flush=True)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = prompt_ids(args.lm, lm_config, batch)
        runs = {impl: [] for impl in impls}
        for round_index in range(args.rounds):
            for impl in impls:
                child_args = [*sys.argv[1:], f"--child={impl}", "--child_args=" + json.dumps([prompts, lm_config])]
                runs[impl].append(run_json_child("bench.decode", child_args, f"{impl} child failed (batch {batch})"))
                print(f"# batch {batch} round {round_index + 1} {impl}: "
                      f"{statistics.median(runs[impl][-1]['times_s']):.3f} s/call", flush=True)
        row = {"batch": batch, "max_new_tokens": args.max_new_tokens,
               "prompt_tokens": [min(len(p) for p in prompts), max(len(p) for p in prompts)]}
        for impl, results in runs.items():
            call_s = statistics.median(statistics.median(r["times_s"]) for r in results)
            row[impl] = {"call_s": round(call_s, 4),
                         "tokens_per_s": round(batch * args.max_new_tokens / call_s, 1),
                         "ms_per_step": round(1e3 * call_s / args.max_new_tokens, 2),
                         "first_call_s": results[0]["first_call_s"],
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
                         "step_peak_rss_mib": max(r.get("step_peak_rss_mib", 0) for r in results)}
        if "jax" in runs and "torch" in runs:
            row["speedup"] = round(row["torch"]["call_s"] / row["jax"]["call_s"], 2)
            if not args.lm.startswith("random:"):
                ours, theirs = runs["jax"][0]["tokens"], runs["torch"][0]["tokens"]
                same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
                prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, theirs)]
                row["tokens_identical"] = round(same / sum(len(x) for x in ours), 3)
                row["identical_prefix_min"] = min(prefix)
        rows.append(row)
        print(json.dumps(row), flush=True)
    load = os.getloadavg()
    print(f"\n# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| batch | new tokens | ours tok/s | transformers generate tok/s | speed-up | ours first call s (compile) | "
          "ours / ref peak RSS MiB | tokens identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        j, t = r.get("jax"), r.get("torch")
        cell = lambda d, k: "-" if d is None else d[k]  # noqa: E731
        print(f"| {r['batch']} | {r['max_new_tokens']} | {cell(j, 'tokens_per_s')} | {cell(t, 'tokens_per_s')} | "
              f"{r.get('speedup', '-')} | {cell(j, 'first_call_s')} | {cell(j, 'peak_rss_mib')} / "
              f"{cell(t, 'peak_rss_mib')} | {r.get('tokens_identical', '-')} |")


if __name__ == "__main__":
    main()
