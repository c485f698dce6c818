"""The real default LM: SmolLM2-135M-Instruct from its GGUF, against transformers' GGUF-loaded model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frozenlm_jax.decode import greedy_generate

SENTENCES = [
    "The capital of France is Paris.",
    "In 2024 there were 1,234,567 visitors; pi is 3.14159.",
    "spaces:  two,   three,    four and a tab\there",
    "line one\nline two\n\n\nafter three newlines\r\n",
    "emoji 🦙🚀 and ünïcödé, 日本語 text 😀👍🏽",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing ones   ",
]

TEXT = (
    "Frozen language models can become multimodal few-shot learners. A vision encoder is trained to "
    "produce a short prefix of embeddings that the language model reads as if they were words. The "
    "language model itself never changes: its weights are frozen, and the gradient flows through it "
    "into the vision encoder. After training on image captions alone, the system can answer questions "
    "about images and learn new words from a handful of examples placed in its prompt. The capital of "
    "France is Paris, the capital of Italy is Rome, and the capital of Spain is Madrid. Counting from "
    "one to ten goes one, two, three, four, five, six, seven, eight, nine, ten. Water boils at one "
    "hundred degrees Celsius at sea level, and freezes at zero degrees. The quick brown fox jumps over "
    "the lazy dog. In the morning, the market opens at eight o'clock, and people arrive with baskets of "
    "bread, apples and fresh vegetables. Children play in the square while their parents talk about the "
    "weather, the harvest and the news from the city. When the sun sets, the streets grow quiet again."
)


@pytest.fixture(scope="module")
def reference(torch, smollm2_gguf):
    import transformers

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tok, model.eval()


def test_tokenizer_ids_match_transformers(smollm2, reference):
    hf_tok, _ = reference
    tok = smollm2.tokenizer
    for text in SENTENCES:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [hf_tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.bos_id is not None and tok.encode("Hi")[0] != tok.bos_id  # SmolLM2 adds no BOS


def test_next_token_nll_and_argmax_match_transformers(torch, smollm2, reference):
    _, model = reference
    ids = smollm2.tokenizer.encode(TEXT)
    assert len(ids) > 200
    with torch.no_grad():
        expected = model(torch.as_tensor([ids])).logits[0].numpy()
    got = np.asarray(jax.jit(lambda p, x: smollm2.model.apply({"params": p}, x))(smollm2.params,
                                                                                 jnp.asarray([ids])))[0]
    got = got[:, :smollm2.config.vocab_size]
    targets = np.asarray(ids[1:])

    def nll(logits):
        logits = logits[:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        return logz - logits[np.arange(len(targets)), targets]

    ours, theirs = nll(got), nll(expected)
    assert abs(ours.mean() - theirs.mean()) < 2e-3, (ours.mean(), theirs.mean())
    agreement = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= 0.99, agreement


def test_greedy_continuation_names_paris(smollm2):
    tok = smollm2.tokenizer
    [tokens] = greedy_generate(smollm2.model, smollm2.params, [tok.encode("The capital of France is")], 4,
                               tok.eos_id, tok.pad_id)
    assert tok.decode(tokens).startswith(" Paris")
