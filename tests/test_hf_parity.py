"""Parity with transformers' PyTorch models: small random configs, every parameter perturbed, saved with
`save_pretrained`, loaded by `load_lm`, float32 logits within 1e-4."""

import jax
import numpy as np
import pytest

from frozenlm_jax import load_lm

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


def _gpt2(t):
    return t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)


CASES = {
    "llama_gqa_untied": (_llama_gqa_untied, "LlamaForCausalLM", {}),
    "llama_tied_rope_scaling": (_llama_tied_rope_scaling, "LlamaForCausalLM", {}),
    "mistral": (_mistral_sliding_window, "MistralForCausalLM", {}),
    "gpt2": (_gpt2, "GPT2LMHeadModel", {}),
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
