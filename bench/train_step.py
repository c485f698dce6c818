"""Frozen training step: ours (JAX) against a PyTorch reference of the same computation; time, memory, MFU.

    python -m bench.train_step                  # headline: SmolLM2-135M + nf_resnet_small, 64 px, batch 32
    python -m bench.train_step --all            # + batch 8, bfloat16 frozen LM, NF-ResNet-50 at 224 px (profiled)
    python -m bench.train_step --torch_compile  # the reference under torch.compile
    python -m bench.train_step --clipcap        # a reference that leaves the LM's gradients on (ClipCap-style)
    python -m bench.train_step --lm=random:llama-1b --lm_dtype=bfloat16 --batches=64 --caption_len=254 --impls=jax

The step: images -> NF-ResNet -> pooled feature -> Dense(C -> n*D) -> n prefix embeddings, placed before the
caption's token embeddings in a frozen LM; loss = next-token cross-entropy on the caption tokens only (the LM
head applied only where a caption token is predicted); Adam (with global-norm clipping) on the vision
parameters only. Ours is `frozenlm_jax.train.step.make_trainer`; the reference is transformers'
`LlamaForCausalLM` loaded from the same GGUF with `requires_grad=False` on every LM parameter, plus the torch
NF-ResNet of `bench.torch_reference` (same shapes as `frozenlm_jax.models.vision`). Each implementation runs
in its own child process (so peak resident memory is its own), alternating A B A B over `--rounds`; medians are
reported with the ratio reference time / our time (the speed-up). MFU: FLOPs of the step (XLA's cost analysis and the
analytic count of `bench.workload.analytic_step_flops`) / step time / a large matmul measured in the same
process (and / --peak_tflops, the chip's spec peak, if given). XLA's cost analysis counts a loop's body once,
so it misses all but one vocabulary chunk of the LM head (`models.lm.head_cross_entropy`); the analytic count
does not. The dot floor (`bench.hlo.dot_floor`, on CPU, in the first round): every dot of our compiled step timed
alone, summed; the reference's step time over it is the most a step running these dots, and nothing else, could
gain.
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
from bench.hlo import dot_floor, xla_profile
from bench.measure import PeakRSS, cpu_model, matmul_tflops, median_seconds
from bench.workload import LM_PRESETS, analytic_step_flops, make_batch, resolve_lm_config, vision_shapes

# The cases of --all, each a change to the headline case.
ALL_CASES = {
    "batch 8": dict(batch=8),
    "bf16 LM": dict(lm_dtype="bfloat16"),
    "NF-ResNet-50 224px": dict(vision="nf_resnet50", image_size=224, batch=8, profile=True),
}


# ----------------------------------------------------------------------------------------------------------------
# Ours: JAX
# ----------------------------------------------------------------------------------------------------------------

def compiler_options(case: dict) -> dict:
    """XLA options of our step: on CPU, the memory-optimised scheduler unless --cpu_scheduler=default."""
    import jax

    if jax.default_backend() == "cpu" and case["cpu_scheduler"] == "memory":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return {}


def abstract_step_args(trainer, batch_size: int, length: int, image_shape):
    """ShapeDtypeStructs (with shardings) of the step's (state, frozen params, batch): to compile it before any
    weight exists."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from frozenlm_jax.models.frozen import abstract_frozen_params
    from frozenlm_jax.train.state import TrainState
    from frozenlm_jax.trees import split_params

    abstract = nn.unbox(abstract_frozen_params(trainer.model, image_shape))
    trainable, frozen = split_params(abstract, trainer.labels)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                       opt_state=jax.eval_shape(trainer.optimizer.init, abstract))
    place = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
    b, t = batch_size, length
    batch = dict(tokens=((b, t), jnp.int32), images=((b, 1) + tuple(image_shape), jnp.float32),
                 image_mask=((b, 1), jnp.bool_), image_positions=((b, 1), jnp.int32), loss_mask=((b, t), jnp.bool_))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=trainer.batch_sharding) for k, (shape, dtype) in batch.items()}
    return place(state, trainer.state_shardings), place(frozen, trainer.frozen_shardings), batch


def run_jax(case: dict) -> dict:
    """Our step. It is compiled ahead of time on abstract shapes, before the LM's weights are loaded (the
    compiler's working memory is freed before the weights arrive), then run on the loaded weights."""
    import jax

    from frozenlm_jax import load_lm
    from frozenlm_jax.weights import gguf as gguf_files
    from frozenlm_jax.weights.registry import NAMED_LMS, fetch_named
    from frozenlm_jax.models.frozen import Frozen, vision_prefix
    from frozenlm_jax.models.lm import LMConfig
    from frozenlm_jax.models.vision import encoder_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.train.state import init_train_state
    from frozenlm_jax.train.step import cpu_step_options, make_trainer

    lm_source, lm_dtype = case["lm"], case["lm_dtype"]
    overrides = dict(dtype=lm_dtype, param_dtype=lm_dtype, remat=case["lm_remat"],
                     attention_impl=case.get("attention_impl", "xla"))
    if lm_source.startswith("random:"):
        lm_config = LMConfig(**LM_PRESETS[lm_source.split(":", 1)[1]], **overrides)
    else:  # the config from the GGUF's metadata, as load_lm reads it, without the tensors
        path = fetch_named(lm_source) if lm_source in NAMED_LMS else Path(lm_source)
        lm_config = gguf_files.config_from_gguf(gguf_files.open_gguf(path), path, **overrides)
    vision_overrides = {"pool": case["vision_pool"]} if case.get("vision_pool") else {}
    model = Frozen(lm_config, encoder_config(case["vision"], **vision_overrides), case["prefix"])
    mesh = make_mesh({"data": -1})
    image_size, prefix, caption_len, batch_size = case["image_size"], case["prefix"], case["caption_len"], case["batch"]
    image_shape = (image_size, image_size, 3)

    def build(return_frozen_grads):
        return make_trainer(model, mesh, label_rules=VARIANT_LABEL_RULES["frozen"], image_shape=image_shape,
                            optimizer_kwargs=dict(learning_rate=1e-4), max_targets=caption_len,
                            return_frozen_grads=return_frozen_grads)

    trainer = build(False)
    result = {}
    rss = PeakRSS()
    rss.current = "compile"
    start = time.perf_counter()
    abstract = abstract_step_args(trainer, batch_size, prefix + caption_len, image_shape)
    compiled = trainer.step.lower(*abstract).compile(compiler_options=compiler_options(case))
    result["compile_s"] = round(time.perf_counter() - start, 1)
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    result["xla_flops"] = analysis["flops"]

    rss.next_phase("setup")
    start = time.perf_counter()
    if lm_source.startswith("random:"):
        lm_params = None  # initialised on the device, in its sharding
    else:
        lm = load_lm(lm_source, dtype=lm_dtype, remat=case["lm_remat"], attention_impl=overrides["attention_impl"])
        if lm.config != lm_config:
            raise RuntimeError(f"load_lm's config {lm.config} differs from the GGUF metadata's {lm_config}")
        lm_params = lm.params
        del lm
    state, frozen = init_train_state(trainer, jax.random.key(0), lm_params, image_shape)
    del lm_params  # init_train_state shares frozen leaves: one copy of the LM, as the reference holds
    batch = make_batch(batch_size, image_size, prefix, caption_len, lm_config.vocab_size)
    sharded = trainer.shard_batch(batch)
    jax.block_until_ready((state, frozen, sharded))
    result["load_init_s"] = round(time.perf_counter() - start, 1)

    rss.next_phase("first_step")
    times = []
    for i in range(case["steps"] + case["warmup"]):
        if i == 1:
            rss.next_phase("step")
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, sharded)
        jax.block_until_ready(metrics["loss"])
        if i >= case["warmup"]:
            times.append(time.perf_counter() - start)
    result["loss"] = float(metrics["loss"])
    result["step_times_s"] = [round(t, 4) for t in times]
    result.update(rss.result())
    memory = jax.devices()[0].memory_stats()  # None on CPU
    if memory and "peak_bytes_in_use" in memory:
        result["peak_device_mib"] = round(memory["peak_bytes_in_use"] / 2**20)
    if case.get("profile"):
        # The vision side alone (encoder + prefix projection, forward + backward), compiled as the step is.
        vision = vision_prefix(model)
        images = sharded["images"][:, 0]
        weights = jax.random.normal(jax.random.key(1), jax.eval_shape(
            lambda p, x: vision.apply({"params": p}, x), state.params["vision"], images).shape)
        on_cpu = jax.default_backend() == "cpu"
        vision_grad = jax.jit(jax.grad(lambda p, x: (vision.apply({"params": p}, x) * weights).sum()),
                              compiler_options=cpu_step_options() if on_cpu else None)
        vision_s = median_seconds(lambda: jax.block_until_ready(vision_grad(state.params["vision"], images)))
        result["profile"] = dict(xla_profile(compiled, (state, frozen, sharded)), vision_fwd_bwd_s=vision_s)
    if case.get("dot_floor") and jax.default_backend() == "cpu":  # GPU HLO has library calls, not dots
        result["dot_floor"] = dot_floor(compiled.as_text(), {**cpu_step_options(), **compiler_options(case)})
    del compiled
    result["matmul_tflops"] = round(matmul_tflops(lm_dtype), 3)
    result["device"] = str(jax.devices()[0].device_kind)
    if case.get("lm_weight_grad_flops"):
        # The same step asked to also return the LM's weight gradients: what freezing by argument saves.
        trainer2 = build(True)
        analysis = trainer2.step.lower(*abstract_step_args(trainer2, batch_size, prefix + caption_len, image_shape)
                                       ).compile(compiler_options=compiler_options(case)).cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        result["xla_flops_with_lm_weight_grads"] = analysis["flops"]
    return result


# ----------------------------------------------------------------------------------------------------------------
# The reference: PyTorch (transformers' LlamaForCausalLM + the NF-ResNet of bench.torch_reference)
# ----------------------------------------------------------------------------------------------------------------

def torch_profile(step, steps: int = 2, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"top_ops_self_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 1) for e in events}}


def run_torch(case: dict, lm: dict, vision: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from bench.torch_reference import VisionPrefix, load_torch_lm

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    lm_dtype = torch.bfloat16 if case["lm_dtype"] == "bfloat16" else torch.float32
    model = load_torch_lm(case["lm"], lm, lm_dtype).to(device)
    model.train()  # as ours: no dropout in Llama, so train and eval compute the same
    clipcap = case.get("clipcap", False)
    for p in model.parameters():
        p.requires_grad_(clipcap)
    prefix, caption_len = case["prefix"], case["caption_len"]
    torch.manual_seed(0)
    vision_model = VisionPrefix(vision, prefix, lm["hidden_size"]).to(device)
    optimizer = torch.optim.Adam(vision_model.parameters(), lr=1e-4)
    batch = make_batch(case["batch"], case["image_size"], prefix, caption_len, lm["vocab_size"])
    images = torch.from_numpy(np.ascontiguousarray(batch["images"][:, 0].transpose(0, 3, 1, 2))).to(device)
    captions = torch.from_numpy(batch["tokens"][:, prefix:].astype(np.int64)).to(device)

    def loss_fn(images, captions):
        prefix_embeds = vision_model(images).to(lm_dtype)
        embeds = torch.cat([prefix_embeds, model.model.embed_tokens(captions)], dim=1)
        hidden = model.model(inputs_embeds=embeds).last_hidden_state
        logits = model.lm_head(hidden[:, prefix - 1:-1]).float()  # only where a caption token is predicted
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), captions.reshape(-1))

    forward = loss_fn
    if case.get("torch_compile"):
        forward = torch.compile(loss_fn)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if clipcap:
            model.zero_grad(set_to_none=True)
        loss = forward(images, captions)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision_model.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    result = {"load_init_s": round(time.perf_counter() - start, 1)}
    rss = PeakRSS()
    rss.next_phase("first_step")
    start = time.perf_counter()
    step()  # first step: torch.compile compiles here
    result["first_step_s"] = round(time.perf_counter() - start, 1)
    rss.next_phase("step")
    times = []
    for i in range(case["steps"] + case["warmup"] - 1):
        start = time.perf_counter()
        loss = step()
        if i >= case["warmup"] - 1:
            times.append(time.perf_counter() - start)
    result["loss"] = float(loss)
    result["step_times_s"] = [round(t, 4) for t in times]
    result.update(rss.result())
    if case.get("profile"):
        result["profile"] = torch_profile(step)
        weights = torch.randn(vision_model(images).shape, device=device)

        def vision_fwd_bwd():
            vision_model.zero_grad(set_to_none=True)
            (vision_model(images) * weights).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()

        result["profile"]["vision_fwd_bwd_s"] = median_seconds(vision_fwd_bwd)
    result["torch_threads"] = torch.get_num_threads()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def run_child(impl: str, case: dict, lm: dict, vision: dict) -> dict:
    env = dict(os.environ)
    if impl == "jax" and case["xla_flags"]:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + case["xla_flags"]).strip()
    return run_json_child("bench.train_step", [f"--child={impl}", "--child_args=" + json.dumps([case, lm, vision])],
                          f"{impl} child failed for case {case}", env)


def summarise(case: dict, runs: dict[str, list[dict]], lm: dict, vision: dict, peak_tflops: float) -> dict:
    tokens = case["batch"] * (case["prefix"] + case["caption_len"])
    flops = analytic_step_flops(lm, vision, case["batch"], case["image_size"], case["prefix"], case["caption_len"])
    row = {"case": case["name"], "batch": case["batch"], "vision": case["vision"], "image_size": case["image_size"],
           "lm_dtype": case["lm_dtype"], "analytic_flops": flops}
    for impl, results in runs.items():
        step_s = statistics.median(statistics.median(r["step_times_s"]) for r in results)
        out = {"step_s": round(step_s, 4), "examples_per_s": round(case["batch"] / step_s, 2),
               "tokens_per_s": round(tokens / step_s, 1),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
               **{k: max(r.get(k, 0) for r in results)
                  for k in ("compile_peak_rss_mib", "setup_peak_rss_mib", "first_step_peak_rss_mib",
                            "step_peak_rss_mib")},
               "rounds_step_s": [round(statistics.median(r["step_times_s"]), 4) for r in results],
               "loss": results[0]["loss"], "analytic_tflops_per_s": round(flops["total"] / step_s / 1e12, 3)}
        for key in ("peak_device_mib", "rss_after_setup_mib", "compile_s", "first_step_s", "load_init_s", "matmul_tflops", "device", "xla_flops",
                    "xla_flops_with_lm_weight_grads", "profile", "torch_threads", "dot_floor"):
            if key in results[0]:
                out[key] = results[0][key]
        if "matmul_tflops" in out:
            peak = statistics.median(r["matmul_tflops"] for r in results)
            out["matmul_tflops"] = peak
            out["mfu_xla_flops_vs_matmul"] = round(out["xla_flops"] / step_s / 1e12 / peak, 3)
            out["mfu_analytic_vs_matmul"] = round(flops["total"] / step_s / 1e12 / peak, 3)
            if peak_tflops:
                out["mfu_analytic_vs_spec"] = round(flops["total"] / step_s / 1e12 / peak_tflops, 3)
        if "xla_flops_with_lm_weight_grads" in out:
            out["flop_ratio_frozen_by_argument"] = round(out["xla_flops"] / out["xla_flops_with_lm_weight_grads"], 3)
        row[impl] = out
    if "jax" in runs and "torch" in runs:
        row["speedup"] = round(row["torch"]["step_s"] / row["jax"]["step_s"], 2)
        if row["jax"].get("dot_floor", {}).get("seconds"):  # a step of our dots and nothing else
            row["speedup_at_dot_floor"] = round(row["torch"]["step_s"] / row["jax"]["dot_floor"]["seconds"], 2)
        row["memory_ratio"] = round(row["jax"]["peak_rss_mib"] / row["torch"]["peak_rss_mib"], 2)
    return row


def markdown(rows: list[dict], reference: str) -> str:
    lines = [f"| case | ours s/step | {reference} s/step | speed-up | ours ex/s | ours tok/s | ours peak RSS MiB "
             f"(steady step) | ref peak RSS MiB (steady step) | ours MFU (analytic / XLA FLOPs, vs matmul) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        j, t = r.get("jax"), r.get("torch")
        cell = lambda d, k: "-" if d is None else d[k]  # noqa: E731
        rss = lambda d: "-" if d is None else f"{d['peak_rss_mib']} ({d.get('step_peak_rss_mib', '-')})"  # noqa: E731
        mfu = "-" if j is None else f"{j['mfu_analytic_vs_matmul']:.1%} / {j['mfu_xla_flops_vs_matmul']:.1%}"
        lines.append(f"| {r['case']} | {cell(j, 'step_s')} | {cell(t, 'step_s')} | {r.get('speedup', '-')} | "
                     f"{cell(j, 'examples_per_s')} | {cell(j, 'tokens_per_s')} | {rss(j)} | {rss(t)} | {mfu} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m", help="a named LM / .gguf, or random:<preset>")
    parser.add_argument("--vision", default="nf_resnet_small",
                        help="an NF-ResNet (the torch reference and the analytic FLOPs are NF-ResNets)")
    parser.add_argument("--batches", default="32", help="comma-separated batch sizes of the headline case")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--caption_len", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=2)
    parser.add_argument("--lm_dtype", default="float32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per child (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="A B rounds (each implementation once per round); the median of 3 survives one round "
                             "slowed by another process")
    parser.add_argument("--all", action="store_true", help="also batch 8, bf16 LM and NF-ResNet-50 at 224 px")
    parser.add_argument("--only", default="", help=f"run only these cases of --all (comma-separated, of "
                                                     f"{', '.join(ALL_CASES)}), not the headline")
    parser.add_argument("--impls", default="jax,torch", help="which implementations to run")
    parser.add_argument("--torch_compile", action="store_true", help="the reference under torch.compile")
    parser.add_argument("--clipcap", action="store_true",
                        help="a reference that keeps requires_grad=True on the LM (only vision is updated)")
    parser.add_argument("--profile", action="store_true", help="profile every case (not just NF-ResNet-50)")
    parser.add_argument("--lm_remat", default="none", help="ours: the LM's remat policy (none, full, save_dots)")
    parser.add_argument("--attention_impl", default="xla", help="ours: the LM's attention (xla, cudnn)")
    parser.add_argument("--cpu_scheduler", default="memory", choices=("memory", "default"),
                        help="ours on CPU: XLA's memory-optimised scheduler or its default (concurrency) one")
    parser.add_argument("--xla_flags", default="", help="ours: extra XLA_FLAGS for the JAX child")
    parser.add_argument("--lm_weight_grad_flops", action="store_true",
                        help="also compile the step with LM weight gradients, for the FLOPs freezing saves")
    parser.add_argument("--no_dot_floor", action="store_true",
                        help="on CPU, skip timing each of our step's dots alone (the floor under our step's time)")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="the chip's dense spec peak in --lm_dtype (e.g. 989 for an H100/H200 in bfloat16)")
    parser.add_argument("--json", default=None, help="also write the full results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_args", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, lm, vision = json.loads(args.child_args)
        result = run_jax(case) if args.child == "jax" else run_torch(case, lm, vision)
        print(json.dumps(result))
        return
    from frozenlm_jax.models.vision import NF_RESNET_CONFIGS

    if args.vision not in NF_RESNET_CONFIGS:
        parser.error(f"--vision={args.vision}: the torch reference and the analytic FLOPs are NF-ResNets; "
                     f"use one of {', '.join(NF_RESNET_CONFIGS)}")

    impls = [i for i in args.impls.split(",") if i]
    base = dict(lm=args.lm, vision=args.vision, image_size=args.image_size, caption_len=args.caption_len,
                prefix=args.prefix, lm_dtype=args.lm_dtype, steps=args.steps, warmup=args.warmup,
                torch_compile=args.torch_compile, clipcap=args.clipcap, profile=args.profile,
                lm_remat=args.lm_remat, attention_impl=args.attention_impl, cpu_scheduler=args.cpu_scheduler, xla_flags=args.xla_flags,
                lm_weight_grad_flops=args.lm_weight_grad_flops, dot_floor=not args.no_dot_floor)
    cases = [dict(base, batch=int(b), name=f"batch {b}") for b in args.batches.split(",")]
    extra = list(ALL_CASES) if args.all else []
    if args.only:
        extra = [name.strip() for name in args.only.split(",")]
        unknown = [name for name in extra if name not in ALL_CASES]
        if unknown:
            sys.exit(f"unknown case(s) {unknown} in --only; cases: {', '.join(ALL_CASES)}")
        cases = []
    cases += [dict(base, batch=int(args.batches.split(",")[0]), name=name) | ALL_CASES[name] for name in extra]
    lm = resolve_lm_config(args.lm)
    reference = "torch.compile" if args.torch_compile else "torch eager"
    if args.clipcap:
        reference += " (ClipCap: LM grads on)"
    load = os.getloadavg()
    print(f"# {cpu_model()}, {len(os.sched_getaffinity(0))} cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start; LM {args.lm}, {args.caption_len}-token captions, n = {args.prefix}; "
          f"ours: LM remat {args.lm_remat}, XLA:CPU scheduler {args.cpu_scheduler}"
          f"{', XLA_FLAGS ' + args.xla_flags if args.xla_flags else ''}; reference: {reference}", flush=True)
    rows = []
    for case in cases:
        vision = vision_shapes(case["vision"])
        runs = {impl: [] for impl in impls}
        for round_index in range(args.rounds):
            for impl in impls:
                child_case = dict(case, lm_weight_grad_flops=case["lm_weight_grad_flops"] and round_index == 0,
                                  dot_floor=case["dot_floor"] and round_index == 0)
                runs[impl].append(run_child(impl, child_case, lm, vision))
                print(f"# {case['name']} round {round_index + 1} {impl}: "
                      f"{statistics.median(runs[impl][-1]['step_times_s']):.3f} s/step", flush=True)
        row = summarise(case, runs, lm, vision, args.peak_tflops)
        rows.append(row)
        print(json.dumps(row), flush=True)
    load = os.getloadavg()
    print(f"\n# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(markdown(rows, reference))
    for row in rows:
        rounds = "; ".join(f"{impl} {row[impl]['rounds_step_s']}" for impl in ("jax", "torch") if impl in row)
        print(f"{row['case']}: per-round median step s: {rounds}")
    for row in rows:
        if "jax" in row:
            flops = row["analytic_flops"]
            print(f"\n{row['case']}: analytic step FLOPs {flops['total'] / 1e9:.4g} G (vision fwd "
                  f"{flops['vision_fwd'] / 1e9:.1f}, vision bwd {flops['vision_bwd'] / 1e9:.1f}, LM fwd "
                  f"{flops['lm_fwd'] / 1e9:.1f}, LM activation bwd {flops['lm_bwd_activations'] / 1e9:.1f}); "
                  f"XLA cost analysis {row['jax']['xla_flops'] / 1e9:.1f} G; measured matmul peak "
                  f"{row['jax']['matmul_tflops']} TFLOP/s; achieved {row['jax']['analytic_tflops_per_s']} TFLOP/s")
            if "dot_floor" in row["jax"]:
                floor = row["jax"]["dot_floor"]
                print(f"  our {floor['dots']} dots timed alone: {floor['seconds']:.3f} s at their fastest = "
                      f"{floor['seconds'] / row['jax']['step_s']:.0%} of our step, {floor['median_seconds']:.3f} s "
                      f"at their median (convolutions not included)"
                      + (f"; the reference's step / that: {row['speedup_at_dot_floor']}x, the most a step running "
                         f"these dots could gain" if "speedup_at_dot_floor" in row else ""))
            if "flop_ratio_frozen_by_argument" in row["jax"]:
                print(f"  XLA FLOPs with LM weight gradients too: "
                      f"{row['jax']['xla_flops_with_lm_weight_grads'] / 1e9:.1f} G "
                      f"(freezing by argument: x{row['jax']['flop_ratio_frozen_by_argument']})")
        for impl in ("jax", "torch"):
            if impl in row and "profile" in row[impl]:
                profile = row[impl]["profile"]
                share = profile["vision_fwd_bwd_s"] / row[impl]["step_s"]
                print(f"  {impl}: vision alone (forward + backward) {profile['vision_fwd_bwd_s']:.3f} s "
                      f"= {share:.0%} of the step; profile {json.dumps(profile)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
