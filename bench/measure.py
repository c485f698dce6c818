"""Measuring a benchmark's process: the CPU's name, peak resident memory per phase, the median time of a call and
the achieved matmul TFLOP/s."""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import statistics
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
