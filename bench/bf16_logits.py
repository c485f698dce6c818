"""What bfloat16 costs in accuracy: logits of the LM in bfloat16 against float32, ours beside transformers'.

    python -m bench.bf16_logits                       # SmolLM2-135M on the decode benchmark's prompts
    python -m bench.bf16_logits --lm=random:llama-tiny

Every logit is compared with our float32 logits on the same tokens (one row per prompt, no padding): the
maximum and mean absolute difference over the real vocabulary, and how often the top token agrees. Ours in
bfloat16 accumulates its matmuls in float32 (`frozenlm_jax.models.lm.accumulating_dot_general`); torch's
bfloat16 CPU matmuls do too. Needs the `test` extra (torch).
"""

from __future__ import annotations

import argparse
import json

from bench.decode import prompt_ids
from bench.workload import LM_PRESETS, resolve_lm_config


def jax_logits(lm: str, dtype: str, prompts: list[list[int]]):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from frozenlm_jax import load_lm
    from frozenlm_jax.models.lm import DecoderLM, LMConfig

    if lm.startswith("random:"):  # float32 weights from one seed, cast: both dtypes hold the same model
        model = DecoderLM(LMConfig(**LM_PRESETS[lm.split(":", 1)[1]]))
        params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
        model = DecoderLM(model.config.replace(dtype=dtype, param_dtype=dtype))
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    else:
        loaded = load_lm(lm, dtype=dtype)
        model, params = loaded.model, loaded.params
    vocab = model.config.vocab_size
    return [np.asarray(model.apply({"params": params}, jnp.asarray([p])))[0, :, :vocab] for p in prompts]


def torch_logits(lm: str, lm_config: dict, dtype: str, prompts: list[list[int]]):
    import torch

    from bench.torch_reference import load_torch_lm

    model = load_torch_lm(lm, lm_config, getattr(torch, dtype)).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, :, :lm_config["vocab_size"]].float().numpy() for p in prompts]


def compare(got, reference) -> dict:
    import numpy as np

    diff = np.concatenate([np.abs(g - r).ravel() for g, r in zip(got, reference)])
    agree = np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, reference)])
    return {"max_abs": float(f"{diff.max():.3g}"), "mean_abs": float(f"{diff.mean():.3g}"),
            "top1_agree": round(float(agree.mean()), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="smollm2-135m", help="a named LM / .gguf, or random:<preset>")
    parser.add_argument("--prompts", type=int, default=8, help="how many of the decode benchmark's prompts")
    args = parser.parse_args()

    lm_config = resolve_lm_config(args.lm)
    prompts = prompt_ids(args.lm, lm_config, args.prompts)
    reference = jax_logits(args.lm, "float32", prompts)
    if args.lm.startswith("random:"):  # the torch model of a preset has its own random weights
        rows = {"ours bfloat16": jax_logits(args.lm, "bfloat16", prompts)}
    else:
        rows = {"ours bfloat16": jax_logits(args.lm, "bfloat16", prompts),
                "transformers float32": torch_logits(args.lm, lm_config, "float32", prompts),
                "transformers bfloat16": torch_logits(args.lm, lm_config, "bfloat16", prompts)}
    tokens = sum(len(p) for p in prompts)
    print(f"# LM {args.lm}, {len(prompts)} prompts, {tokens} positions; against our float32 logits")
    results = {name: compare(logits, reference) for name, logits in rows.items()}
    for name, result in results.items():
        print(json.dumps({"name": name, "positions": tokens, **result}))
    print("| | max abs diff | mean abs diff | top-1 token agrees |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['max_abs']} | {result['mean_abs']} | {result['top1_agree']} |")

if __name__ == "__main__":
    main()
