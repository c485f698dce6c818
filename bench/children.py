"""Child processes of the benchmarks (each part its own process, so its peak memory is its own): a bench module
run with this interpreter, its result the JSON object on the last line of its stdout."""

from __future__ import annotations

import json
import subprocess
import sys


def module_command(module: str, *args: str) -> list[str]:
    """`python -m <module> <args>`: a child finds the `bench` package as its parent did (the working directory,
    the repository root, or PYTHONPATH: both are inherited)."""
    return [sys.executable, "-m", module, *args]


def run_json_child(module: str, args: list[str], failure: str, env: dict | None = None) -> dict:
    """The JSON object a child running `module` prints last; on failure, exit with `failure` and its stderr's end."""
    out = subprocess.run(module_command(module, *args), capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{failure}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
