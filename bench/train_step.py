"""Frozen training step: ours (JAX) against a PyTorch reference of the same computation; time, memory, MFU.

    python bench/train_step.py                  # headline: SmolLM2-135M + nf_resnet_small, 64 px, batch 32
    python bench/train_step.py --all            # + batch 8, bfloat16 frozen LM, NF-ResNet-50 at 224 px (profiled)
    python bench/train_step.py --torch_compile  # the reference under torch.compile
    python bench/train_step.py --clipcap        # a reference that leaves the LM's gradients on (ClipCap-style)
    python bench/train_step.py --lm=random:llama-1b --lm_dtype=bfloat16 --batches=64 --caption_len=254 --impls=jax

The step: images -> NF-ResNet -> pooled feature -> Dense(C -> n*D) -> n prefix embeddings, placed before the
caption's token embeddings in a frozen LM; loss = next-token cross-entropy on the caption tokens only (the LM
head applied only where a caption token is predicted); Adam (with global-norm clipping) on the vision
parameters only. Ours is `frozenlm_jax.train.step.make_trainer`; the reference is transformers'
`LlamaForCausalLM` loaded from the same GGUF with `requires_grad=False` on every LM parameter, plus the torch
NF-ResNet below (same shapes as `frozenlm_jax.models.vision`). Each implementation runs in its own child
process (so peak resident memory is its own), alternating A B A B over `--rounds`; medians are reported with
the ratio reference time / our time (the speed-up). MFU: FLOPs of the step (XLA's cost analysis and the
analytic count of `analytic_step_flops`) / step time / a large matmul measured in the same process
(and / --peak_tflops, the chip's spec peak, if given). XLA's cost analysis counts a loop's body once, so it
misses all but one vocabulary chunk of the LM head (`models.lm.head_cross_entropy`); the analytic count
does not. The dot floor (`dot_floor`, on CPU, in the first round): every dot of our compiled step timed alone,
summed; the reference's step time over it is the most a step running these dots, and nothing else, could gain.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_load_forward import cpu_model  # noqa: E402

# Random-weight LMs of published shapes (no download): name -> LMConfig fields.
LM_PRESETS = {
    "llama-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, intermediate_size=8192, rope_theta=500000.0,
                     tie_word_embeddings=True),
    "llama-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, intermediate_size=11008),
    # SmolLM2-135M's shape (the default LM), for machines without its GGUF.
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, intermediate_size=1536, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-tiny": dict(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128),
}
# The cases of --all, each a change to the headline case.
ALL_CASES = {
    "batch 8": dict(batch=8),
    "bf16 LM": dict(lm_dtype="bfloat16"),
    "NF-ResNet-50 224px": dict(vision="nf_resnet50", image_size=224, batch=8, profile=True),
}


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset this process's high-water RSS (Linux: clear_refs 5; it resets ru_maxrss too)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_peak_rss_mib() -> int:
    """This process's high-water resident memory (ru_maxrss) since start or the last reset, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024)
    return 0


class PeakRSS:
    """Peak resident memory of each phase of a child: ours `compile` (ahead of time, from process start), then
    `setup` (load, init; the reference's from process start), `first_step` and `step` (the steady-state
    steps). Between phases, freed memory goes back to the OS (malloc_trim, the same for both
    implementations) and the high-water mark is reset; `peak_rss_mib` is the whole life's."""

    def __init__(self):
        self.phases: dict[str, int] = {}
        self.current = "setup"

    def next_phase(self, name: str):
        self.phases[self.current] = current_peak_rss_mib()
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.phases[f"rss_after_{self.current}"] = rss_mib()
        if not reset_peak_rss():  # no reset possible: one high-water mark covers every phase
            self.phases = {}
        self.current = name

    def result(self) -> dict:
        self.phases[self.current] = current_peak_rss_mib()
        peaks = [v for k, v in self.phases.items() if not k.startswith("rss_after")]
        return {"peak_rss_mib": max(peaks), **{f"{k}_peak_rss_mib" if not k.startswith("rss_after") else f"{k}_mib": v
                                                for k, v in self.phases.items()}}


def median_seconds(call, repeats: int = 3) -> float:
    """Median wall time of `call()` over `repeats` calls, after one untimed call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def resolve_lm_config(lm: str) -> dict:
    """HF-style shape of the LM (from the preset, or from the GGUF's metadata without loading tensors)."""
    if lm.startswith("random:"):
        name = lm.split(":", 1)[1]
        if name not in LM_PRESETS:
            raise SystemExit(f"unknown LM preset {name!r}; available: {', '.join(LM_PRESETS)}")
        return dict(LM_PRESETS[name])
    from frozenlm_jax.checkpoints import gguf as gguf_files
    from frozenlm_jax.checkpoints.registry import NAMED_LMS, fetch_named

    path = fetch_named(lm) if lm in NAMED_LMS else Path(lm)
    config = gguf_files.config_from_gguf(gguf_files.open_gguf(path), path)
    fields = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "rope_theta", "tie_word_embeddings", "norm_eps")
    return {f: getattr(config, f) for f in fields} | {"gguf": str(path)}


def vision_shapes(name: str) -> dict:
    from frozenlm_jax.models.vision import vision_config

    return dataclasses.asdict(vision_config(name))


def conv_layers(vision: dict, image_size: int):
    """(kernel, stride, c_in, c_out, out_size) of every convolution of the NF-ResNet, in order."""
    layers = []
    size = math.ceil(image_size / vision["stem_stride"])
    layers.append((vision["stem_kernel"], vision["stem_stride"], 3, vision["stem_width"], size))
    if vision["stem_pool"]:
        size = math.ceil(size / 2)
    channels = vision["stem_width"]
    for stage, (depth, width) in enumerate(zip(vision["depths"], vision["widths"])):
        for index in range(depth):
            stride = 2 if index == 0 and stage > 0 else 1
            out = math.ceil(size / stride)
            mid = max(1, int(width * vision["bottleneck_ratio"]))
            if stride != 1 or channels != width:
                layers.append((1, stride, channels, width, out))
            layers += [(1, 1, channels, mid, size), (3, stride, mid, mid, out), (1, 1, mid, width, out)]
            channels, size = width, out
    return layers


def analytic_step_flops(lm: dict, vision: dict, batch: int, image_size: int, prefix: int, caption_len: int,
                        padded_vocab: int | None = None) -> dict:
    """Matmul/convolution FLOPs of one Frozen step (2 per multiply-add; elementwise work not counted).

    vision: forward, and backward = gradients w.r.t. weights and inputs (none w.r.t. the image);
    prefix projection: forward + both gradients; LM: forward, and the activation-only backward (no weight
    gradients: 1x forward for every linear layer, 2x for attention's two activation-activation products),
    over all positions but the last (which predicts nothing; the reference computes it too, ours does not);
    LM head: only at the `caption_len` target positions, forward + input gradient.
    """
    convs = conv_layers(vision, image_size)
    conv = [2 * batch * out * out * k * k * cin * cout for k, _, cin, cout, out in convs]
    vision_fwd = sum(conv)
    vision_bwd = 2 * vision_fwd - conv[0]
    d, t = lm["hidden_size"], prefix + caption_len - 1
    q, kv = lm["num_heads"] * lm["head_dim"], lm["num_kv_heads"] * lm["head_dim"]
    linear_per_token = 2 * (d * q + 2 * d * kv + q * d + 3 * d * lm["intermediate_size"])
    attention_per_seq = 4 * t * t * q  # QK^T and PV over the full T x T (masked, not skipped)
    lm_layers_fwd = lm["num_layers"] * (batch * t * linear_per_token + batch * attention_per_seq)
    lm_layers_bwd = lm["num_layers"] * (batch * t * linear_per_token + 2 * batch * attention_per_seq)
    vocab = padded_vocab or -(-lm["vocab_size"] // 128) * 128
    head = 2 * batch * caption_len * d * vocab
    proj = 2 * batch * vision["widths"][-1] * prefix * d
    parts = {"vision_fwd": vision_fwd, "vision_bwd": vision_bwd, "prefix_proj": 3 * proj,
             "lm_fwd": lm_layers_fwd + head, "lm_bwd_activations": lm_layers_bwd + head}
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Ours: JAX
# ----------------------------------------------------------------------------------------------------------------

def matmul_tflops(dtype: str, size: int | None = None, seconds: float = 1.0) -> float:
    """Achieved TFLOP/s of a [size, size] @ [size, size] matmul in `dtype` on the default device, accumulating in
    float32 as the LM's matmuls do (`accumulating_dot_general`)."""
    import jax
    import jax.numpy as jnp

    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)  # random data: zeros or ones run faster on GPUs
    matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    start = time.perf_counter()
    out = matmul(a)
    out.block_until_ready()
    once = time.perf_counter() - start
    repeats = max(2, min(50, int(seconds / max(once, 1e-6))))
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a)
    out.block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def make_batch(batch_size: int, image_size: int, prefix: int, caption_len: int, vocab_size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    length = prefix + caption_len
    captions = rng.integers(0, vocab_size, (batch_size, caption_len)).astype(np.int32)
    tokens = np.concatenate([np.zeros((batch_size, prefix), np.int32), captions], axis=1)
    return dict(tokens=tokens,
                images=rng.uniform(0, 1, (batch_size, 1, image_size, image_size, 3)).astype(np.float32),
                image_mask=np.ones((batch_size, 1), bool), image_positions=np.zeros((batch_size, 1), np.int32),
                loss_mask=np.arange(length)[None].repeat(batch_size, 0) >= prefix)


HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z\-]+)\(")


def hlo_computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """The computations of an HLO module's text (name -> instruction lines) and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    current = entry = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(2)
            bodies[current] = []
            entry = current if header.group(1) else entry
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def hlo_op_categories(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "convolution", "matmul", "attention" (cuDNN's) or "other", looking inside fusions'
    computations."""
    bodies, _ = hlo_computations(hlo_text)

    def category(opcode: str, line: str, depth: int = 0) -> str:
        if opcode == "convolution":
            return "convolution"
        if opcode == "dot":
            return "matmul"
        if opcode == "custom-call":  # GPU libraries: cuBLAS gemms, cuDNN convolutions and fused attention
            target = (re.findall(r'custom_call_target="([^"]+)"', line) or [""])[0]
            for word, kind in (("gemm", "matmul"), ("matmul", "matmul"), ("conv", "convolution"),
                               ("fmha", "attention")):
                if word in target:
                    return kind
        called = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
        found = set()
        for name in called if depth < 3 else ():
            for inner in bodies.get(name, ()):
                match = HLO_INSTRUCTION.match(inner)
                if match:
                    found.add(category(match.group(2), inner, depth + 1))
        return "convolution" if "convolution" in found else "matmul" if "matmul" in found else "other"

    categories = {}
    for lines in bodies.values():
        for line in lines:
            match = HLO_INSTRUCTION.match(line)
            if match:
                categories[match.group(1)] = category(match.group(2), line)
    return categories


HLO_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64", "s32": "int32",
              "s8": "int8"}


def hlo_dots(hlo_text: str) -> dict[tuple, int]:
    """The dots an HLO module runs: (lhs (dtype, shape), rhs (dtype, shape), dimension numbers, result dtype) ->
    how many times one step runs it (fusions and calls count once, a while body its known trip count)."""
    bodies, entry = hlo_computations(hlo_text)
    shape_of = re.compile(r"(\w+)\[([\d,]*)\]")

    def parse_shape(text: str):
        dtype, dims = shape_of.match(text).groups()
        return HLO_DTYPES[dtype], tuple(int(d) for d in dims.split(",") if d)

    def dims(line: str, name: str) -> tuple[int, ...]:
        found = re.search(name + r"=\{([\d,]*)\}", line)
        return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()

    times: dict[str, int] = {}

    def visit(name: str, count: int):
        times[name] = times.get(name, 0) + count
        for line in bodies.get(name, ()):
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            for kind, called in re.findall(r"(calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)",
                                           line):
                visit(called, count * (int(trips.group(1)) if trips and kind == "body" else 1))

    visit(entry, 1)
    dots: dict[tuple, int] = {}
    for name, count in times.items():
        lines = bodies[name]
        defined = {}
        for line in lines:
            match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])", line)
            if match:
                defined[match.group(1)] = match.group(2)
        for line in lines:
            match = re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+\[[\d,]*\])\S* dot\(([^)]*)\)", line)
            if not match:
                continue
            operands = [defined[re.findall(r"%?([\w.\-]+)$", o.strip())[0]] for o in match.group(2).split(",")]
            numbers = ((dims(line, "lhs_contracting_dims"), dims(line, "rhs_contracting_dims")),
                       (dims(line, "lhs_batch_dims"), dims(line, "rhs_batch_dims")))
            key = (parse_shape(operands[0]), parse_shape(operands[1]), numbers, parse_shape(match.group(1))[0])
            dots[key] = dots.get(key, 0) + count
    return dots


def dot_floor(hlo_text: str, compiler_options: dict, min_seconds: float = 0.3) -> dict:
    """The seconds a step's dots take when each is timed alone, compiled with `compiler_options`, on warm caches,
    less the time of an empty call: `seconds` from each one's fastest call, a floor under the step's time that
    no fusion or layout change can go below, and `median_seconds` from its median call. Convolutions are not
    included."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    rows, total, total_median = [], 0.0, 0.0
    for (lhs, rhs, numbers, out_dtype), count in hlo_dots(hlo_text).items():
        a, b = (jax.numpy.asarray(rng.standard_normal(shape), dtype) for dtype, shape in (lhs, rhs))
        dot = jax.jit(lambda x, y: jax.lax.dot_general(x, y, numbers, preferred_element_type=out_dtype),
                      compiler_options=compiler_options)
        empty = jax.jit(lambda x, y: x.reshape(-1)[:1], compiler_options=compiler_options)
        samples = []
        for call in (dot, empty):
            call(a, b).block_until_ready()
            times, start = [], time.perf_counter()
            while len(times) < 5 or time.perf_counter() - start < min_seconds:
                began = time.perf_counter()
                call(a, b).block_until_ready()
                times.append(time.perf_counter() - began)
            samples.append(times)
        fastest = max(min(samples[0]) - min(samples[1]), 0.0)
        typical = max(statistics.median(samples[0]) - statistics.median(samples[1]), 0.0)
        flops = 2 * math.prod(lhs[1]) * math.prod(rhs[1]) // math.prod(
            lhs[1][d] for d in numbers[0][0]) // math.prod(lhs[1][d] for d in numbers[1][0])
        total, total_median = total + count * fastest, total_median + count * typical
        rows.append({"lhs": list(lhs[1]), "rhs": list(rhs[1]), "dtype": lhs[0], "count": count,
                     "ms": round(count * fastest * 1e3, 1), "median_ms": round(count * typical * 1e3, 1),
                     "gflops_per_s": round(flops / fastest / 1e9, 1) if fastest else None})
    rows.sort(key=lambda r: -r["ms"])
    return {"seconds": round(total, 5), "median_seconds": round(total_median, 5),
            "dots": sum(r["count"] for r in rows), "by_shape": rows[:8]}


def xla_profile(compiled, args, steps: int = 2, top: int = 12) -> dict:
    """The compiled step's ops ranked by total time over `steps` runs, from a jax.profiler trace."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            out = None
            for _ in range(steps):
                out = compiled(*args)
                jax.block_until_ready(out)
                args = (out[0],) + tuple(args[1:])
        files = list(Path(trace_dir).rglob("*.xplane.pb"))
        if not files:
            return {}
        data = jax.profiler.ProfileData.from_file(str(files[0]))
    # On CPU, events named after an instruction of the compiled HLO are its ops (XLA:CPU thunks run on several
    # threads). On a GPU or TPU, the device planes' events are the kernels that ran: named after their fusion for
    # XLA's own, after the library kernel for cuBLAS/cuDNN (an H200 with jax 0.11 had one line, the stream's);
    # host planes then hold only launches and are left out.
    categories = hlo_op_categories(compiled.as_text())
    device_planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    totals: dict[str, float] = {}
    for plane in device_planes or data.planes:
        for line in plane.lines:
            for event in line.events:
                name = event.name
                if device_planes:
                    categories.setdefault(name, "matmul" if "gemm" in name.lower() else "other")
                if name in categories:
                    totals[name] = totals.get(name, 0.0) + event.duration_ns / 1e6
    by_kind: dict[str, float] = {}
    by_category: dict[str, float] = {}
    for name, ms in totals.items():
        kind = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        by_category[categories[name]] = by_category.get(categories[name], 0.0) + ms
    total = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {"op_time_ms_per_step": round(total / steps, 1),
            "by_category_ms_per_step": {k: round(v / steps, 1) for k, v in sorted(by_category.items())},
            "by_kind_ms_per_step": {k: round(v / steps, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
                                    if v / total > 0.01},
            "top_ops_ms_per_step": {n[:120]: round(ms / steps, 1) for n, ms in ranked}}


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

    from frozenlm_jax.train.step import TrainState, abstract_model_params, split_params

    abstract = nn.unbox(abstract_model_params(trainer.model, image_shape))
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
    from frozenlm_jax.checkpoints import gguf as gguf_files
    from frozenlm_jax.checkpoints.registry import NAMED_LMS, fetch_named
    from frozenlm_jax.models.frozen import Frozen, vision_prefix
    from frozenlm_jax.models.lm import LMConfig
    from frozenlm_jax.models.vision import vision_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.train.step import cpu_step_options, init_params, make_trainer

    lm_source, lm_dtype = case["lm"], case["lm_dtype"]
    overrides = dict(dtype=lm_dtype, param_dtype=lm_dtype, remat=case["lm_remat"],
                     attention_impl=case.get("attention_impl", "xla"))
    if lm_source.startswith("random:"):
        lm_config = LMConfig(**LM_PRESETS[lm_source.split(":", 1)[1]], **overrides)
    else:  # the config from the GGUF's metadata, as load_lm reads it, without the tensors
        path = fetch_named(lm_source) if lm_source in NAMED_LMS else Path(lm_source)
        lm_config = gguf_files.config_from_gguf(gguf_files.open_gguf(path), path, **overrides)
    vision_overrides = {"pool": case["vision_pool"]} if case.get("vision_pool") else {}
    model = Frozen(lm_config, vision_config(case["vision"], **vision_overrides), case["prefix"])
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
    state, frozen = init_params(trainer, jax.random.key(0), lm_params, image_shape)
    del lm_params  # init_params shares frozen leaves: one copy of the LM, as the reference holds
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
# The reference: PyTorch (transformers' LlamaForCausalLM + the NF-ResNet below)
# ----------------------------------------------------------------------------------------------------------------

def torch_modules():
    """The torch NF-ResNet and prefix model classes (defined lazily: the JAX child never imports torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    relu_gamma = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))

    class WSConv2d(nn.Module):
        """Scaled weight standardisation (zero mean, variance 1/fan_in per filter) x gain, plus bias; TF SAME."""

        def __init__(self, c_in, c_out, kernel, stride=1, eps=1e-4):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel))
            nn.init.kaiming_normal_(self.weight, nonlinearity="linear")
            self.gain = nn.Parameter(torch.ones(c_out))
            self.bias = nn.Parameter(torch.zeros(c_out))
            self.kernel, self.stride, self.eps = kernel, stride, eps
            self.fan_in = c_in * kernel * kernel

        def forward(self, x):
            w = self.weight
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (w - mean) * torch.rsqrt(var * self.fan_in + self.eps) * self.gain.view(-1, 1, 1, 1)
            pads = []
            for size in (x.shape[-1], x.shape[-2]):
                total = max((-(-size // self.stride) - 1) * self.stride + self.kernel - size, 0)
                pads += [total // 2, total - total // 2]
            if pads[0] == pads[1] and pads[2] == pads[3]:
                return F.conv2d(x, w, self.bias, self.stride, padding=(pads[2], pads[0]))
            return F.conv2d(F.pad(x, pads), w, self.bias, self.stride)

    class NFBlock(nn.Module):
        def __init__(self, vision, c_in, features, stride, beta):
            super().__init__()
            mid = max(1, int(features * vision["bottleneck_ratio"]))
            self.shortcut = WSConv2d(c_in, features, 1, stride) if stride != 1 or c_in != features else None
            self.conv1 = WSConv2d(c_in, mid, 1)
            self.conv2 = WSConv2d(mid, mid, 3, stride)
            self.conv3 = WSConv2d(mid, features, 1)
            self.skip_gain = nn.Parameter(torch.tensor(float(vision["skip_gain_init"])))
            self.alpha, self.beta = vision["alpha"], beta

        def forward(self, x):
            out = F.relu(x) * (relu_gamma * self.beta)
            shortcut = x if self.shortcut is None else self.shortcut(out)
            out = F.relu(self.conv1(out)) * relu_gamma
            out = F.relu(self.conv2(out)) * relu_gamma
            out = self.conv3(out)
            return out * (self.skip_gain * self.alpha) + shortcut

    class NFResNet(nn.Module):
        """Images [N, 3, H, W] -> mean-pooled features [N, C]; the shapes of frozenlm_jax.models.vision."""

        def __init__(self, vision):
            super().__init__()
            self.stem = WSConv2d(3, vision["stem_width"], vision["stem_kernel"], vision["stem_stride"])
            self.stem_pool = vision["stem_pool"]
            blocks, channels, expected_var = [], vision["stem_width"], 1.0
            for stage, (depth, width) in enumerate(zip(vision["depths"], vision["widths"])):
                for index in range(depth):
                    stride = 2 if index == 0 and stage > 0 else 1
                    blocks.append(NFBlock(vision, channels, width, stride, 1.0 / math.sqrt(expected_var)))
                    channels = width
                    alpha2 = vision["alpha"] ** 2
                    expected_var = 1.0 + alpha2 if index == 0 else expected_var + alpha2
            self.blocks = nn.Sequential(*blocks)

        def forward(self, images):
            x = self.stem(images)
            if self.stem_pool:
                # TF SAME 3x3/2 max pool: pad the bottom/right only (with -inf), as XLA does on even sizes.
                total = max((-(-x.shape[-1] // 2) - 1) * 2 + 3 - x.shape[-1], 0)
                x = F.max_pool2d(F.pad(x, [total // 2, total - total // 2] * 2, value=-math.inf), 3, 2)
            x = self.blocks(x)
            return (F.relu(x) * relu_gamma).mean(dim=(2, 3))

    class VisionPrefix(nn.Module):
        def __init__(self, vision, prefix, embed_dim):
            super().__init__()
            self.encoder = NFResNet(vision)
            self.prefix_proj = nn.Linear(vision["widths"][-1], prefix * embed_dim)
            self.prefix, self.embed_dim = prefix, embed_dim

        def forward(self, images):
            return self.prefix_proj(self.encoder(images)).view(images.shape[0], self.prefix, self.embed_dim)

    return WSConv2d, NFResNet, VisionPrefix


def load_torch_lm(lm_source: str, lm: dict, dtype):
    import torch
    import transformers

    if lm_source.startswith("random:"):
        config = transformers.LlamaConfig(
            vocab_size=lm["vocab_size"], hidden_size=lm["hidden_size"], intermediate_size=lm["intermediate_size"],
            num_hidden_layers=lm["num_layers"], num_attention_heads=lm["num_heads"],
            num_key_value_heads=lm["num_kv_heads"], head_dim=lm["head_dim"], rope_theta=lm.get("rope_theta", 1e4),
            tie_word_embeddings=lm.get("tie_word_embeddings", False))
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).to(dtype)
    path = Path(lm["gguf"])
    return transformers.LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)


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
    _, _, VisionPrefix = torch_modules()
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
    cmd = [sys.executable, __file__, f"--child={impl}", "--child_args=" + json.dumps([case, lm, vision])]
    env = dict(os.environ)
    if impl == "jax" and case["xla_flags"]:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + case["xla_flags"]).strip()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{impl} child failed for case {case}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
