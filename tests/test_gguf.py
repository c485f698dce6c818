"""GGUF import against transformers' GGUF loader: a tiny llama written the way llama.cpp writes it (Q/K rows
permuted, quantised tensors of every supported type), its tokenizer, and the error paths; tiny Qwen2 and Qwen3
written as llama.cpp writes them (rows as HF has them, q/k/v biases, q/k norms) against the PyTorch models."""

import gguf
import jax
import numpy as np
import pytest
import tokenizers

from frozenlm_jax import CheckpointError, load_lm

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "1 2"]
SPECIAL = ["<|endoftext|>", "<|im_end|>"]
ADDED = ["<think>"]  # llama.cpp's USER_DEFINED: matched whole, not special
TOKENS = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "Ġa", "12"] + ADDED + SPECIAL
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


def write_metadata(writer, head_dim=None, pre="default"):
    """The metadata llama.cpp writes for a model of `tiny_model`'s sizes, and the tokenizer."""
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(1000.0)
    if head_dim:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    else:
        writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIAL else 4 if t in ADDED else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(TOKENS) - 2)
    writer.add_eos_token_id(len(TOKENS) - 1)
    writer.add_add_bos_token(False)


def tiny_model(torch, cls, **config):
    """A transformers model (`cls`, e.g. "Llama") of the tiny sizes with every tensor perturbed."""
    import transformers

    cfg = getattr(transformers, cls + "Config")(
        vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1000.0, rms_norm_eps=1e-5, max_position_embeddings=256, **config)
    model = getattr(transformers, cls + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def write_tiny_gguf(torch, path, arch="llama"):
    """A perturbed tiny LlamaForCausalLM written as a GGUF; returns nothing, transformers re-reads it."""
    state = {k: v.numpy() for k, v in tiny_model(torch, "Llama").state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    write_metadata(writer)
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
    close(writer)


def close(writer):
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
    for text in ["the theater", " the  a\nthe", "a<|im_end|>the<|endoftext|>", "ünïcödé 123 🦙", "<think>12"]:
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


# llama.cpp's tensor names (besides the llama ones in HF_NAMES) for Qwen2's biases and Qwen3's q/k norms.
QWEN_NAMES = {"attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
              "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
              "attn_k_norm.weight": "self_attn.k_norm.weight"}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_the_pytorch_model(torch, tmp_path, arch):
    """Qwen2 tied (no output.weight), Qwen3 untied with head_dim 24 != 64 / 4; float32 tensors, unpermuted."""
    model = (tiny_model(torch, "Qwen2", tie_word_embeddings=True) if arch == "qwen2"
             else tiny_model(torch, "Qwen3", head_dim=24, tie_word_embeddings=False))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    write_metadata(writer, head_dim=24 if arch == "qwen3" else None, pre="qwen2")
    add(writer, "token_embd.weight", state["model.embed_tokens.weight"], Q.F32)
    add(writer, "output_norm.weight", state["model.norm.weight"], Q.F32)
    if arch == "qwen3":
        add(writer, "output.weight", state["lm_head.weight"], Q.F32)
    names = {f"{short}.weight": f"{hf}.weight" for short, hf in HF_NAMES.items()} | QWEN_NAMES
    for i in range(2):
        for short, hf in names.items():
            if f"model.layers.{i}.{hf}" in state:
                add(writer, f"blk.{i}.{short}", state[f"model.layers.{i}.{hf}"], Q.F32)
    close(writer)
    ids = np.random.default_rng(0).integers(0, len(TOKENS), (2, 12))
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits.numpy()
    lm = load_lm(str(path))
    assert (lm.config.qkv_bias, lm.config.qk_norm, lm.config.head_dim) == (
        (True, False, 16) if arch == "qwen2" else (False, True, 24))
    got = np.asarray(jax.jit(lambda p, x: lm.model.apply({"params": p}, x))(lm.params, ids))
    np.testing.assert_allclose(got[..., :len(TOKENS)], expected, atol=1e-4, rtol=0)
    # The tokenizer splits as Qwen2Tokenizer does: NFC first, digits one by one, special and added tokens whole.
    import transformers

    vocab = {t: i for i, t in enumerate(TOKENS)}
    reference = transformers.Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split()) for m in MERGES])
    reference.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL],
                         special_tokens=True)
    reference.add_tokens(ADDED)
    for text in ["the 123 theater", "a<|im_end|>the<think>12", "cafe\u0301 \n\n the"]:
        assert lm.tokenizer.encode(text) == reference(text)["input_ids"], text
    assert lm.tokenizer.encode("12") == [TOKENS.index("1"), TOKENS.index("2")]
