"""GGUF import against transformers' GGUF loader: a tiny llama written the way llama.cpp writes it (Q/K rows
permuted, quantised tensors of every supported type), its tokenizer, and the error paths."""

import gguf
import jax
import numpy as np
import pytest
import tokenizers

from frozenlm_jax import CheckpointError, load_lm

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
SPECIAL = ["<|endoftext|>", "<|im_end|>"]
TOKENS = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "Ġa"] + SPECIAL
Q = gguf.GGMLQuantizationType
# One tensor type per projection, so every supported type is decoded in the test.
TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
         "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "output": Q.F32}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def llama_cpp_permute(w, heads):
    """What llama.cpp's converter does to Q/K rows (the inverse of what the loader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add(writer, name, w, qtype):
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, w.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def write_tiny_gguf(torch, path, arch="llama"):
    """A perturbed tiny LlamaForCausalLM written as a GGUF; returns nothing, transformers re-reads it."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   rope_theta=1000.0, rms_norm_eps=1e-5, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    state = {k: (v + 0.05 * torch.randn_like(v)).numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(1000.0)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(TOKENS) - 2)
    writer.add_eos_token_id(len(TOKENS) - 1)
    writer.add_add_bos_token(False)
    add(writer, "token_embd.weight", state["model.embed_tokens.weight"], TYPES["token_embd"])
    add(writer, "output.weight", state["lm_head.weight"], TYPES["output"])
    add(writer, "output_norm.weight", state["model.norm.weight"], Q.F32)
    for i in range(2):
        for short, hf in HF_NAMES.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                w = llama_cpp_permute(w, 4)
            elif short == "attn_k":
                w = llama_cpp_permute(w, 2)
            add(writer, f"blk.{i}.{short}.weight", w, TYPES.get(short, Q.F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(torch, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(torch, path)
    return path


def test_quantised_gguf_matches_transformers(torch, tiny_gguf):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, len(TOKENS), (2, 12))
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    lm = load_lm(str(tiny_gguf))
    assert not lm.config.tie_word_embeddings and lm.config.num_kv_heads == 2
    got = np.asarray(jax.jit(lambda p, x: lm.model.apply({"params": p}, x))(lm.params, ids))
    np.testing.assert_allclose(got[..., :len(TOKENS)], expected, atol=1e-4, rtol=0)


def test_gguf_tokenizer_matches_transformers(tiny_gguf):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tok = load_lm(str(tiny_gguf)).tokenizer
    for text in ["the theater", " the  a\nthe", "a<|im_end|>the<|endoftext|>", "ünïcödé 123 🦙"]:
        assert tok.encode(text) == reference(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the") == [TOKENS.index("Ġthe")]
    assert (tok.eos_id, tok.bos_id) == (len(TOKENS) - 1, len(TOKENS) - 2)


def test_unsupported_gguf_architecture(torch, tmp_path):
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(torch, path, arch="falcon")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'falcon'; supported: llama"):
        load_lm(str(path))


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (100, len(data) // 2):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_lm(str(path))
