"""Reading a compiled XLA program: its HLO text's computations, what kind of work each op does, the dots one step
runs (and their time alone: the dot floor), and a profile of its ops' time."""

from __future__ import annotations

import math
import re
import statistics
import tempfile
import time
from pathlib import Path

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
