"""Continue a text prompt with a pretrained LM (greedy, KV cache).

    python -m frozenlm_jax.generate --prompt="The capital of France is" [--lm=smollm2-135m]
"""

from __future__ import annotations

import time

from absl import app, flags

from frozenlm_jax.checkpoints import load_lm
from frozenlm_jax.decode import greedy_generate

_LM = flags.DEFINE_string("lm", "smollm2-135m", "Named LM, .gguf path, HF directory or HF Hub id.")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")


def generate_text(lm_source: str, prompt: str, max_new_tokens: int, dtype: str = "float32") -> str:
    """Load `lm_source` and return the greedy continuation of `prompt`."""
    start = time.perf_counter()
    lm = load_lm(lm_source, dtype=dtype)
    if lm.tokenizer is None:
        raise ValueError(f"{lm_source} has no tokenizer (no tokenizer.json); cannot encode a text prompt")
    print(f"loaded {lm_source} ({lm.config.num_layers} layers, d={lm.config.hidden_size}) "
          f"in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    [tokens] = greedy_generate(lm.model, lm.params, [lm.tokenizer.encode(prompt)], max_new_tokens,
                               lm.tokenizer.eos_id, lm.tokenizer.pad_id or 0)
    print(f"generated {len(tokens)} tokens in {time.perf_counter() - start:.1f} s (including compilation)")
    return lm.tokenizer.decode(tokens)


def main(argv):
    del argv
    continuation = generate_text(_LM.value, _PROMPT.value, _MAX_NEW_TOKENS.value, _DTYPE.value)
    print(_PROMPT.value + continuation)


if __name__ == "__main__":
    app.run(main)
