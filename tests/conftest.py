"""Test setup: an 8-device simulated CPU mesh, and references that fail (not skip) under CI=true."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_reference(reason: str):
    """Skip locally, but fail in CI, where every reference must be present."""
    if IN_CI:
        pytest.fail(f"CI=true and a reference is missing: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def torch():
    try:
        import torch
    except ImportError:
        missing_reference("torch is not installed (pip install -e '.[test]')")
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The path of SmolLM2-135M-Instruct's GGUF, fetched into the cache on first use."""
    from frozenlm_jax.checkpoints import CheckpointError
    from frozenlm_jax.checkpoints.registry import fetch_named

    try:
        return fetch_named("smollm2-135m")
    except CheckpointError as e:
        missing_reference(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from frozenlm_jax import load_lm

    return load_lm("smollm2-135m")
