"""Test setup: an 8-device simulated CPU mesh, and references that fail (not skip) under CI=true."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests' programs are tiny and compiling them is most of the suite's time: LLVM's optimisation level 0
# keeps XLA's own (HLO) optimisations and cuts the compile (tests/test_frozen.py: 267 -> 157 s on 2 cores).
# Subprocesses (the trainer's CLI, the benchmarks) inherit it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# A compilation cache for this session only: the subprocess tests (resume, the CLI, benchmarks) load what this
# process already compiled instead of compiling it again (the SIGTERM-resume test: 66 s -> 30 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="frozenlm_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import pytest  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CONFIGS = Path(__file__).resolve().parents[1] / "frozenlm_jax" / "configs"


def xla_flags_for_child(device_count: int | None) -> str:
    """This session's XLA_FLAGS for a subprocess with `device_count` simulated CPU devices (None: its own)."""
    flags = [f for f in os.environ["XLA_FLAGS"].split() if "xla_force_host_platform_device_count" not in f]
    if device_count is not None:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    return " ".join(flags)


def jit_apply(module, variables, *args, method=None, **kwargs):
    """`module.apply(variables, *args, ...)` under jit: one compiled program per call, where eager dispatch
    compiles one per op, most of a small test's time (tests/test_lm.py: 116 -> 87 s on 2 cores). Keyword
    arguments that are Python bools, ints, strings or lists are static."""
    static = {name: value for name, value in kwargs.items() if isinstance(value, (bool, int, str, list))}
    arrays = {name: value for name, value in kwargs.items() if name not in static}
    run = lambda v, a, kw: module.apply(v, *a, method=method, **static, **kw)  # noqa: E731
    return jax.jit(run)(variables, args, arrays)


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
    from frozenlm_jax.weights import CheckpointError
    from frozenlm_jax.weights.registry import fetch_named

    try:
        return fetch_named("smollm2-135m")
    except CheckpointError as e:
        missing_reference(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    from frozenlm_jax import load_lm

    return load_lm("smollm2-135m")


def bos_tokenizer():
    """The byte tokenizer plus a BOS token "<s>" that it adds, as Llama's and Gemma's tokenizers do."""
    import tokenizers

    from frozenlm_jax.tokenizer import Tokenizer, byte_tokenizer

    base = byte_tokenizer().backend
    base.add_special_tokens([tokenizers.AddedToken("<s>", special=True, normalized=False)])
    bos = base.token_to_id("<s>")
    base.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return Tokenizer(base, bos_id=bos, eos_id=256, pad_id=None)


def write_random_hf_llama(directory, seed=0, **config_overrides):
    """A tiny llama HF directory (config.json + model.safetensors) with random weights, built without torch."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    config = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5,
                  max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    config.update(config_overrides)
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
    tensors = {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def tiny_config(data_dir, **train):
    """frozenlm_jax/configs/tiny.py reading its data from `data_dir`, with `train` overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", CONFIGS / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.data_dir = str(data_dir)
    for key, value in train.items():
        config.train[key] = value
    return config


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """The tfds folder of the tiny config's data, shared by the tests that train it."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory):
    """(workdir, final metrics) of the tiny config's 12 steps on the 8-device mesh, trained once per session;
    a test that writes into a run copies it first."""
    from frozenlm_jax.train.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("tiny_run")
    return workdir, train_and_evaluate(tiny_config(tiny_data_dir), workdir)
