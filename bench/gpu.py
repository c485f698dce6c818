"""On a GPU: the model, the training step and decoding checked against the CPU and measured, in one run.

    python -m bench.gpu --out=/tmp/gpu                  # every part; writes gpu.json and gpu.md there
    python -m bench.gpu --parts=correctness --quick     # a small run (what tests/test_bench.py runs on the CPU)

Parts, each in its own child process (its own peak device memory, and a crash or timeout loses only it):
- `correctness`: with `jax_default_matmul_precision="highest"` (GPUs run float32 dots as TF32 by default), tiny
  random HF checkpoints made here by transformers (Llama with grouped KV heads, Mistral with a sliding window,
  GPT-2; every tensor perturbed) loaded by `load_lm`: logits on the accelerator against the same params on
  `jax.devices("cpu")` and against transformers; greedy decoding with the KV cache, the tokens of both; 3 Frozen
  training steps on a one-device mesh of each: losses, the vision parameters' updates, the LM bit-identical; on
  the accelerator, a bfloat16 LM with `attention_impl="cudnn"` against "xla" (logits, input gradients).
- `train_1b`: `bench.train_step`'s step on the 1B-class random Llama in bfloat16 (batch 64 x 256 tokens),
  once per attention implementation (`LMConfig.attention_impl`): s/step, tokens/s, peak device memory, MFU
  against `--peak_tflops` and against a bfloat16 matmul measured in the same process, the profile's top ops.
- `decode`: greedy decoding tokens/s of the same LM at batch 1 and 64.
- `main_job`: the default config's step (SmolLM2-sized random LM in float32, `convnet_small` max-pooled, 64 px,
  batch 16, 14 tokens): s/step, examples/s and the 600 steps of the quick start.
On a machine without an accelerator every part runs on the CPU (the accelerator is the CPU, compared to itself).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.children import module_command
from bench.train_step import run_jax
from bench.workload import LM_PRESETS, analytic_step_flops, make_batch, vision_shapes

PARTS = ("correctness", "train_1b", "decode", "main_job")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "transformers", "torch", "numpy",
            "ml_collections", "gguf")
# Tiny HF checkpoints (transformers class, config fields).
TINY_LMS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=96, tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                                            head_dim=24, intermediate_size=96, sliding_window=5)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
}
TINY_VOCAB = 300


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def relative_error(got, expected) -> float:
    import numpy as np

    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))


def save_tiny_hf(family: str, directory: Path):
    """A random transformers model of `family`, every tensor perturbed, saved as an HF directory."""
    import torch
    import transformers

    model_cls, config_cls, fields = TINY_LMS[family]
    if family != "gpt2":
        fields = dict(fields, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128)
    config = getattr(transformers, config_cls)(vocab_size=TINY_VOCAB, **fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def check_lm(family: str, cpu, accelerator, directory: Path, quick: bool) -> dict:
    """Logits and greedy tokens of a tiny HF checkpoint on both devices (and transformers' logits)."""
    import jax
    import numpy as np
    import torch

    from frozenlm_jax import load_lm
    from frozenlm_jax.decode import greedy_generate

    reference = save_tiny_hf(family, directory)
    lm = load_lm(str(directory))
    ids = np.random.default_rng(1).integers(0, TINY_VOCAB, (2, 24))
    forward = jax.jit(lambda p, x: lm.model.apply({"params": p}, x))
    cpu_logits, acc_logits = (np.asarray(forward(*jax.device_put((lm.params, ids), d)))[..., :TINY_VOCAB]
                              for d in (cpu, accelerator))
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.float().numpy()
    prompts = [np.random.default_rng(i).integers(0, TINY_VOCAB, 3 + 2 * i).tolist() for i in range(4)]
    new_tokens = 8 if quick else 32
    tokens = []
    for device in (cpu, accelerator):
        with jax.default_device(device):
            tokens.append(greedy_generate(lm.model, jax.device_put(lm.params, device), prompts, new_tokens,
                                          eos_id=None))
    same = sum(a == b for a, b in zip(*tokens))
    return {"logits_max_abs_diff": float(np.abs(acc_logits - cpu_logits).max()),
            "logits_rel_err": relative_error(acc_logits, cpu_logits),
            "logits_rel_err_vs_transformers": {"accelerator": relative_error(acc_logits, expected),
                                               "cpu": relative_error(cpu_logits, expected)},
            "greedy_rows_identical": f"{same}/{len(prompts)}", "greedy_new_tokens": new_tokens,
            "pass": bool(np.abs(acc_logits - cpu_logits).max() < 1e-4 and same == len(prompts))}


def check_steps(cpu, accelerator, steps: int = 3) -> dict:
    """`steps` Frozen training steps on a one-device mesh of each device from the same params and batches."""
    import jax
    import numpy as np

    from frozenlm_jax.models.frozen import Frozen
    from frozenlm_jax.models.lm import LMConfig
    from frozenlm_jax.models.vision import encoder_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.train.state import init_train_state
    from frozenlm_jax.train.step import make_trainer

    lm = LMConfig(**LM_PRESETS["llama-tiny"], init_std=0.1)
    model = Frozen(lm, encoder_config("convnet_small", pool="max"), 2)
    image_shape = (32, 32, 3)
    trainers = {name: make_trainer(model, make_mesh({"data": 1}, devices=[d]),
                                   label_rules=VARIANT_LABEL_RULES["frozen"], image_shape=image_shape,
                                   optimizer_kwargs=dict(learning_rate=1e-3))
                for name, d in (("cpu", cpu), ("accelerator", accelerator))}
    state, frozen = init_train_state(trainers["cpu"], jax.random.key(0), image_shape=image_shape)
    start_vision = jax.tree.map(np.asarray, state.params["vision"])
    start_lm = jax.tree.map(np.asarray, frozen["lm"])
    batches = [make_batch(8, 32, 2, 12, lm.vocab_size, seed=s) for s in range(steps)]
    losses, updates, lm_identical = {}, {}, {}
    for name, trainer in trainers.items():
        s = jax.device_put(jax.tree.map(np.asarray, state), trainer.state_shardings)
        f = jax.device_put(jax.tree.map(np.asarray, frozen), trainer.frozen_shardings)
        losses[name] = []
        for batch in batches:
            s, metrics = trainer.step(s, f, trainer.shard_batch(batch))
            losses[name].append(float(metrics["loss"]))
        updates[name] = jax.tree.map(lambda end, begin: np.asarray(end, np.float64) - begin,
                                         s.params["vision"], start_vision)
        lm_identical[name] = all(jax.tree.leaves(jax.tree.map(
            lambda a, b: np.array_equal(np.asarray(a), b), f["lm"], start_lm)))
    flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    update_err = relative_error(flat(updates["accelerator"]), flat(updates["cpu"]))
    loss_diff = max(abs(a - b) for a, b in zip(losses["accelerator"], losses["cpu"]))
    return {"losses": losses, "loss_max_abs_diff": loss_diff, "vision_update_rel_err": update_err,
            "lm_bit_identical": lm_identical,
            "pass": bool(loss_diff < 1e-4 and update_err < 1e-3 and all(lm_identical.values()))}


def check_cudnn_attention(accelerator) -> dict:
    """On the accelerator, a bfloat16 LM's logits and input gradients with `attention_impl="cudnn"` against
    "xla", and whether the compiled program calls cuDNN's fused attention (on a CPU it falls back to "xla")."""
    import jax
    import numpy as np
    from flax import linen as nn

    from frozenlm_jax.models.lm import DecoderLM, LMConfig

    config = LMConfig(**dict(LM_PRESETS["llama-tiny"], head_dim=32, sliding_window=24), dtype="bfloat16",
                      param_dtype="bfloat16")
    with jax.default_device(accelerator):
        params = nn.unbox(DecoderLM(config).init(jax.random.key(0), np.zeros((1, 1), np.int32))["params"])
        embeds = jax.random.normal(jax.random.key(1), (4, 63, config.hidden_size), "bfloat16")
        out, hlo = {}, ""
        for impl in ("xla", "cudnn"):
            model = DecoderLM(config.replace(attention_impl=impl))

            def loss(x, model=model):
                logits = model.apply({"params": params}, inputs_embeds=x)
                return (logits.astype("float32") ** 2).mean(), logits

            step = jax.jit(jax.value_and_grad(loss, has_aux=True))
            (_, logits), grad = step(embeds)
            out[impl] = (np.asarray(logits, np.float32)[..., :config.vocab_size], np.asarray(grad, np.float32))
            hlo = step.lower(embeds).compile().as_text()
    logits_err = relative_error(out["cudnn"][0], out["xla"][0])
    grad_err = relative_error(out["cudnn"][1], out["xla"][1])
    return {"cudnn_called": "fmha" in hlo, "logits_rel_err_vs_xla": logits_err, "input_grad_rel_err_vs_xla": grad_err,
            "pass": bool(logits_err < 2e-2 and grad_err < 5e-2)}


def part_correctness(quick: bool) -> dict:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    cpu, accelerator = jax.devices("cpu")[0], jax.devices()[0]
    result = {"device": accelerator.device_kind, "matmul_precision": "highest"}
    with tempfile.TemporaryDirectory() as tmp:
        for family in TINY_LMS:
            result[family] = check_lm(family, cpu, accelerator, Path(tmp) / family, quick)
    result["frozen_steps"] = check_steps(cpu, accelerator)
    result["cudnn_attention"] = check_cudnn_attention(accelerator)
    result["pass"] = all(v["pass"] for v in result.values() if isinstance(v, dict))
    return result


def step_case(**changes) -> dict:
    """A case of `train_step.run_jax` (its defaults: the 1B-class LM in bfloat16, 16,384 tokens a step)."""
    case = dict(name="1B bf16", lm="random:llama-1b", lm_dtype="bfloat16", lm_remat="none", attention_impl="xla",
                vision="nf_resnet_small", vision_pool="", image_size=64, prefix=2, caption_len=254, batch=64,
                steps=10, warmup=2, cpu_scheduler="memory", profile=True, dot_floor=False,
                lm_weight_grad_flops=False)
    return case | changes


def summarise_step(case: dict, result: dict, peak_tflops: float) -> dict:
    step_s = statistics.median(result["step_times_s"])
    tokens = case["batch"] * (case["prefix"] + case["caption_len"])
    row = {"case": case["name"], "attention_impl": case["attention_impl"], "step_s": round(step_s, 4),
           "examples_per_s": round(case["batch"] / step_s, 1), "tokens_per_s": round(tokens / step_s),
           **{k: result.get(k) for k in ("peak_device_mib", "compile_s", "matmul_tflops", "loss", "device")}}
    if case["vision"].startswith("nf_resnet"):
        lm = dict(LM_PRESETS[case["lm"].split(":", 1)[1]])
        flops = analytic_step_flops(lm, vision_shapes(case["vision"]), case["batch"], case["image_size"],
                                    case["prefix"], case["caption_len"])["total"]
        row["analytic_tflops_per_s"] = round(flops / step_s / 1e12, 1)
        row["mfu_vs_matmul"] = round(flops / step_s / 1e12 / result["matmul_tflops"], 3)
        if peak_tflops:
            row["mfu_vs_spec"] = round(flops / step_s / 1e12 / peak_tflops, 3)
    if "profile" in result:
        row["profile"] = {k: v for k, v in result["profile"].items() if k != "vision_fwd_bwd_s"}
    return row


def part_train_1b(quick: bool, peak_tflops: float) -> dict:
    changes = dict(lm="random:llama-tiny", batch=4, caption_len=14, steps=2, warmup=1, profile=False) if quick else {}
    rows = []
    for impl in ("xla", "cudnn"):
        case = step_case(attention_impl=impl, **changes)
        try:
            rows.append(summarise_step(case, run_jax(case), peak_tflops))
        except Exception as e:  # one implementation failing leaves the other's row
            rows.append({"case": case["name"], "attention_impl": impl, "error": f"{type(e).__name__}: {e}"[:2000]})
    return {"rows": rows, "device": next((r["device"] for r in rows if "device" in r), None)}


def part_decode(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from frozenlm_jax.decode import greedy_generate
    from frozenlm_jax.models.lm import DecoderLM, LMConfig

    preset, batches, new_tokens, repeats = ("llama-tiny", (1, 4), 8, 1) if quick else ("llama-1b", (1, 64), 128, 3)
    model = DecoderLM(LMConfig(**LM_PRESETS[preset], dtype="bfloat16", param_dtype="bfloat16"))
    params = nn.unbox(jax.jit(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"])(jax.random.key(0)))
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        prompts = [rng.integers(0, model.config.vocab_size, 4 + i % 8).tolist() for i in range(batch)]
        call = lambda: greedy_generate(model, params, prompts, new_tokens, eos_id=None)  # noqa: E731
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append({"lm": f"random:{preset} bfloat16", "batch": batch, "new_tokens": new_tokens,
                     "first_call_s": round(first, 2), "seconds": round(seconds, 4),
                     "tokens_per_s": round(batch * new_tokens / seconds, 1)})
    return {"rows": rows, "device": jax.devices()[0].device_kind}


def part_main_job(quick: bool) -> dict:
    case = step_case(name="main job", lm="random:smollm2-135m", lm_dtype="float32", vision="convnet_small",
                     vision_pool="max", image_size=64, caption_len=12, batch=16, steps=20, warmup=3, profile=False)
    if quick:
        case |= dict(steps=2, warmup=1, lm="random:llama-tiny")
    row = summarise_step(case, run_jax(case), 0.0)
    row["quick_start_600_steps_s"] = round(600 * row["step_s"], 1)
    return {"rows": [row], "device": row["device"]}


def run_part(part: str, quick: bool, peak_tflops: float) -> dict:
    if part == "correctness":
        return part_correctness(quick)
    if part == "train_1b":
        return part_train_1b(quick, peak_tflops)
    if part == "decode":
        return part_decode(quick)
    return part_main_job(quick)


def markdown(results: dict) -> str:
    lines = [f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}; "
             f"device {results.get('device', '?')}", ""]
    c = results.get("correctness")
    if c and "error" not in c:
        lines += ["| check (matmul precision highest) | accelerator vs CPU | result |", "|---|---|---|"]
        for family in TINY_LMS:
            r = c[family]
            lines.append(f"| {family}: logits, greedy ({r['greedy_new_tokens']} tokens) | max abs diff "
                         f"{r['logits_max_abs_diff']:.2e}, rel {r['logits_rel_err']:.2e} (vs transformers "
                         f"{r['logits_rel_err_vs_transformers']['accelerator']:.2e}); rows identical "
                         f"{r['greedy_rows_identical']} | {'pass' if r['pass'] else 'FAIL'} |")
        s = c["frozen_steps"]
        lines.append(f"| 3 Frozen steps | loss max abs diff {s['loss_max_abs_diff']:.2e}, vision update rel "
                     f"{s['vision_update_rel_err']:.2e}, LM bit-identical {s['lm_bit_identical']} | "
                     f"{'pass' if s['pass'] else 'FAIL'} |")
        a = c["cudnn_attention"]
        lines.append(f"| bfloat16 attention_impl cudnn vs xla (cuDNN called: {a['cudnn_called']}) | logits rel "
                     f"{a['logits_rel_err_vs_xla']:.2e}, input grads rel {a['input_grad_rel_err_vs_xla']:.2e} | "
                     f"{'pass' if a['pass'] else 'FAIL'} |")
        lines.append("")
    rows = [r for p in ("train_1b", "main_job") for r in results.get(p, {}).get("rows", [])]
    steps = [r for r in rows if "error" not in r]
    if steps:
        lines += ["| step | attention | s/step | examples/s | tokens/s | peak device MiB | MFU vs spec | "
                  "MFU vs matmul (TFLOP/s) | 600 steps s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            mfu = lambda k: f"{r[k]:.1%}" if k in r else "-"  # noqa: E731
            lines.append(f"| {r['case']} | {r['attention_impl']} | {r['step_s']} | {r['examples_per_s']} | "
                         f"{r['tokens_per_s']} | {r['peak_device_mib']} | {mfu('mfu_vs_spec')} | "
                         f"{mfu('mfu_vs_matmul')} ({r['matmul_tflops']}) | "
                         f"{r.get('quick_start_600_steps_s', '-')} |")
        lines.append("")
    for r in results.get("decode", {}).get("rows", []):
        lines.append(f"- decoding {r['lm']}, batch {r['batch']}, {r['new_tokens']} new tokens: "
                     f"{r['tokens_per_s']} tokens/s ({r['seconds']} s; first call {r['first_call_s']} s)")
    for r in rows:
        if "error" in r:
            lines.append(f"- step {r['case']} with {r['attention_impl']} attention FAILED: {r['error'][-500:]}")
    for part in PARTS:
        if "error" in results.get(part, {}):
            lines.append(f"- {part} FAILED: {results[part]['error'][-500:]}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for gpu.json and gpu.md")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every part")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the chip's dense bfloat16 spec peak")
    parser.add_argument("--budget_s", type=float, default=280.0,
                        help="seconds for all parts: each part is stopped at this deadline, later ones skipped")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args.quick, args.peak_tflops)))
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; parts: {', '.join(PARTS)}")
    # The parent leaves JAX unimported: a JAX process on a GPU holds most of its memory.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]),
               "versions": versions()}
    print(json.dumps(results), flush=True)
    deadline = time.perf_counter() + args.budget_s
    for part in parts:
        start = time.perf_counter()
        if deadline - start < 20:
            results[part] = {"error": f"skipped: under 20 s of --budget_s={args.budget_s} left"}
            continue
        cmd = module_command("bench.gpu", f"--part={part}", f"--peak_tflops={args.peak_tflops}")
        try:
            child = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True,
                                   timeout=deadline - start)
            if child.returncode:
                results[part] = {"error": child.stderr[-3000:]}
            else:
                results[part] = json.loads(child.stdout.strip().splitlines()[-1])
                results.setdefault("device", results[part]["device"])
        except subprocess.TimeoutExpired as e:
            results[part] = {"error": f"stopped at --budget_s={args.budget_s}; stderr: {str(e.stderr)[-2000:]}"}
        results[part]["part_s"] = round(time.perf_counter() - start, 1)
        print(f"# {part} ({results[part]['part_s']} s): {json.dumps(results[part])}", flush=True)
        (out / "gpu.json").write_text(json.dumps(results, indent=1))
        (out / "gpu.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
