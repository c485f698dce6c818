"""Parity with transformers' PyTorch models: small random configs, every parameter perturbed, saved with
`save_pretrained`, loaded by `load_lm`, float32 logits within 1e-4 (and for Qwen the greedy tokens)."""

import jax
import numpy as np
import pytest

from frozenlm_jax import load_lm
from frozenlm_jax.decode import greedy_generate

VOCAB = 300


def _llama_gqa_untied(t):
    return t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         attention_bias=True, mlp_bias=True, rope_theta=1000.0, max_position_embeddings=128)


def _llama_tied_rope_scaling(t):
    return t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                         max_position_embeddings=128,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16})


def _mistral_sliding_window(t):
    return t.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=24, sliding_window=5,
                           max_position_embeddings=128)


def _qwen2(tie, **sliding):
    return lambda t: t.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                   rope_theta=1000.0, max_position_embeddings=128, **sliding)


def _qwen3(t):
    """head_dim 24, not hidden_size / heads = 16."""
    return t.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                         rope_theta=1000.0, max_position_embeddings=128)


def _gpt2(t):
    return t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)


CASES = {
    "llama_gqa_untied": (_llama_gqa_untied, "LlamaForCausalLM", {}),
    "llama_tied_rope_scaling": (_llama_tied_rope_scaling, "LlamaForCausalLM", {}),
    "mistral": (_mistral_sliding_window, "MistralForCausalLM", {}),
    "gpt2": (_gpt2, "GPT2LMHeadModel", {}),
    "qwen2_tied": (_qwen2(tie=True), "Qwen2ForCausalLM", {}),
    "qwen2_untied_sliding": (_qwen2(tie=False, use_sliding_window=True, sliding_window=4, max_window_layers=0),
                             "Qwen2ForCausalLM", {}),
    "qwen3": (_qwen3, "Qwen3ForCausalLM", {}),
    "llama_sharded_index": (_llama_gqa_untied, "LlamaForCausalLM", {"max_shard_size": "40KB"}),
}


def save_reference(torch, tmp_path, case):
    import transformers

    make_config, cls, save_kwargs = CASES[case]
    config = make_config(transformers)
    config._attn_implementation = "eager"
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases too, so a dropped one shows
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **save_kwargs)
    return model


def reference_logits(torch, model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(torch, tmp_path, case):
    model = save_reference(torch, tmp_path, case)
    if case == "llama_sharded_index":
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 13))
    expected = reference_logits(torch, model, ids)
    lm = load_lm(str(tmp_path))
    got = np.asarray(jax.jit(lambda p, x: lm.model.apply({"params": p}, x))(lm.params, ids))
    assert got.shape[-1] == lm.config.padded_vocab_size
    np.testing.assert_allclose(got[..., :VOCAB], expected, atol=1e-4, rtol=0)


def test_scan_layers_load_matches_transformers(torch, tmp_path):
    model = save_reference(torch, tmp_path, "llama_gqa_untied")
    ids = np.random.default_rng(1).integers(0, VOCAB, (1, 9))
    lm = load_lm(str(tmp_path), scan_layers=True)
    assert lm.params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)
    got = np.asarray(lm.model.apply({"params": lm.params}, ids))
    np.testing.assert_allclose(got[..., :VOCAB], reference_logits(torch, model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("qwen")])
def test_greedy_tokens_with_the_cache_match_transformers(torch, tmp_path, case):
    model = save_reference(torch, tmp_path, case)
    prompts = np.random.default_rng(2).integers(0, VOCAB, (2, 6))
    with torch.no_grad():
        expected = model.generate(torch.as_tensor(prompts), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[:, 6:].tolist()
    lm = load_lm(str(tmp_path))
    assert (lm.config.qkv_bias, lm.config.qk_norm) == (case.startswith("qwen2"), case == "qwen3")
    assert lm.config.sliding_window == (4 if "sliding" in case else None)
    assert greedy_generate(lm.model, lm.params, prompts.tolist(), max_new_tokens=8, eos_id=None) == expected
