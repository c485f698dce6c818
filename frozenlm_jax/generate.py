"""Continue a text prompt with a pretrained LM (KV cache; greedy, beam search or sampling).

    python -m frozenlm_jax.generate --prompt="The capital of France is" [--lm=smollm2-135m] [--method=beam]
"""

from __future__ import annotations

import time

import jax
from absl import app, flags

from frozenlm_jax.console import configure_output
from frozenlm_jax.weights import load_lm
from frozenlm_jax.decode import METHODS, generate

_LM = flags.DEFINE_string("lm", "smollm2-135m", "Named LM, .gguf path, HF directory or HF Hub id.")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
_METHOD = flags.DEFINE_enum("method", "greedy", list(METHODS), "Decoding method.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 4, "Beam width (method=beam).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (method=sample).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the likeliest tokens holding this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' start-up lines, warnings and INFO logs.")


def generate_text(lm_source: str, prompt: str, max_new_tokens: int, dtype: str = "float32", **options) -> str:
    """Load `lm_source` and return the continuation of `prompt` (options: see `decode.generate_from_embeddings`)."""
    start = time.perf_counter()
    lm = load_lm(lm_source, dtype=dtype)
    if lm.tokenizer is None:
        raise ValueError(f"{lm_source} has no tokenizer (no tokenizer.json); cannot encode a text prompt")
    print(f"loaded {lm_source} ({lm.config.num_layers} layers, d={lm.config.hidden_size}) "
          f"in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    result = generate(lm.model, lm.params, [lm.tokenizer.encode(prompt)], max_new_tokens,
                      eos_id=lm.tokenizer.eos_id, pad_id=lm.tokenizer.pad_id or 0, **options)
    print(f"generated {len(result.tokens[0])} tokens (log-prob {result.logprobs[0]:.2f}) in "
          f"{time.perf_counter() - start:.1f} s (including compilation)")
    return lm.tokenizer.decode(result.tokens[0])


def main(argv):
    del argv
    configure_output(_VERBOSE.value or flags.FLAGS["verbosity"].present)
    options = dict(method=_METHOD.value, num_beams=_NUM_BEAMS.value, temperature=_TEMPERATURE.value,
                   top_k=_TOP_K.value, top_p=_TOP_P.value, rng=jax.random.key(_SEED.value))
    continuation = generate_text(_LM.value, _PROMPT.value, _MAX_NEW_TOKENS.value, _DTYPE.value, **options)
    print(_PROMPT.value + continuation)


if __name__ == "__main__":
    app.run(main)
