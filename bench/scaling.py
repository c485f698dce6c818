"""Scaling on paper: the paper's 7B setup on a TPU v3-64 and on an 8xH100 node, from the code's own compiled step.

    python -m bench.scaling                        # 7B Llama shape, NF-ResNet-50 at 224 px, batch 128, both targets
    python -m bench.scaling --targets=h100x8 --layers=1,2 --lm=random:llama-tiny --vision=nf_resnet_tiny \\
        --image_size=32 --batch=16 --caption_len=8      # smoke test

For each target the training step is built exactly as training builds it (`make_trainer` on a mesh from
`make_mesh`, shardings from the logical-axis rules) on a simulated mesh of as many CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set in a child process before JAX starts), lowered
on `ShapeDtypeStruct`s (nothing is allocated), compiled, and asked for its per-device memory
(`memory_analysis()`: arguments, outputs, temporaries) and FLOPs (`cost_analysis()`). Parameter and optimizer
bytes per device come from `jax.eval_shape` and the shardings, for the full model. The step is compiled
with `--layers` (16 and 32: 32 is the 7B's depth, so the fit reproduces it; fewer layers compile faster but
the fit then misses the depth where the LM's activations overtake the vision encoder's peak) LM layers at the
global batch and half of it, and every compiled quantity is fitted as c0 + c1 * layers + batch * (a0 + a1 *
layers), then evaluated at the full depth (stated in the output).
The batch-proportional part of the temporaries is the activations; a batch-independent part that grows
per layer would be copies of the weights (XLA:CPU made float32 copies of bfloat16 weights while it upcast
bfloat16 matmuls, before `accumulating_dot_general`; GPU and TPU compilers do not), reported apart and not
counted. The temporaries are a peak over the whole step: where the vision encoder's backward peaks above the
LM's activations, they do not grow with LM depth at all. Temporaries are XLA:CPU's buffer assignment of the
same partitioned program, compiled with its memory-optimised scheduler (the default one overlaps ops and undoes remat): an
estimate of what the TPU/GPU compilers would assign, not their number. Step time at 50% MFU =
model FLOPs (the analytic count of `bench.workload.analytic_step_flops`, no remat recompute) /
(devices x spec peak x 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.children import run_json_child
from bench.workload import LM_PRESETS, analytic_step_flops, vision_shapes

GIB = 2 ** 30
TARGETS = {
    # 64 TensorCores (32 chips, 2 cores each: 123 TFLOP/s bf16 and 32 GiB HBM per chip), the paper's
    # 16 data x 4 model-parallel mesh (configs/cc3m_paper.py).
    "tpu_v3_64": dict(name="TPU v3-64", devices=64, mesh={"data": 16, "tensor": 4}, peak_tflops=123.0 / 2,
                      hbm_gib=16.0, unit="core"),
    # 8 H100 SXM (989 TFLOP/s dense bf16, 80 GB each): data parallel, the bf16 7B LM replicated.
    "h100x8": dict(name="8x H100 SXM", devices=8, mesh={"data": 8}, peak_tflops=989.0, hbm_gib=80.0 * 1e9 / GIB,
                   unit="GPU"),
}


def lm_config_dict(lm: str, layers: int | None = None) -> dict:
    if not lm.startswith("random:") or lm.split(":", 1)[1] not in LM_PRESETS:
        raise SystemExit(f"--lm must be random:<preset>, presets: {', '.join(LM_PRESETS)}")
    config = dict(LM_PRESETS[lm.split(":", 1)[1]])
    if layers is not None:
        config["num_layers"] = layers
    return config


def build(args, target: dict, layers: int, remat: str):
    """The trainer and abstract (sharded ShapeDtypeStruct) state, frozen params and batch of the step."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from frozenlm_jax.models.frozen import Frozen
    from frozenlm_jax.models.lm import LMConfig
    from frozenlm_jax.models.vision import encoder_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.models.frozen import abstract_frozen_params
    from frozenlm_jax.train.state import TrainState
    from frozenlm_jax.train.step import make_trainer
    from frozenlm_jax.trees import split_params

    lm_config = LMConfig(**lm_config_dict(args.lm, layers), dtype="bfloat16", param_dtype="bfloat16", remat=remat)
    model = Frozen(lm_config, encoder_config(args.vision), args.prefix)
    mesh = make_mesh(target["mesh"])
    image_shape = (args.image_size, args.image_size, 3)
    trainer = make_trainer(model, mesh, label_rules=VARIANT_LABEL_RULES["frozen"], image_shape=image_shape,
                           optimizer_kwargs=dict(learning_rate=3e-4), max_targets=args.caption_len)
    abstract = nn.unbox(abstract_frozen_params(model, image_shape))
    trainable, frozen = split_params(abstract, trainer.labels)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                       opt_state=jax.eval_shape(trainer.optimizer.init, abstract))

    def place(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    b, t = args.batch, args.prefix + args.caption_len
    batch = dict(tokens=jax.ShapeDtypeStruct((b, t), jnp.int32),
                 images=jax.ShapeDtypeStruct((b, 1) + image_shape, jnp.float32),
                 image_mask=jax.ShapeDtypeStruct((b, 1), jnp.bool_),
                 image_positions=jax.ShapeDtypeStruct((b, 1), jnp.int32),
                 loss_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_))
    batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=trainer.batch_sharding), batch)
    return trainer, place(state, trainer.state_shardings), place(frozen, trainer.frozen_shardings), batch


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return total


def child_params(args, target: dict) -> dict:
    """Per-device bytes of the full model's params and optimizer state (eval_shape only, nothing compiled)."""
    _, state, frozen, _ = build(args, target, None, "none")
    return {"lm_params": per_device_bytes(frozen), "vision_params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state)}


def child_compile(args, target: dict, layers: int, remat: str, batch: int) -> dict:
    args = argparse.Namespace(**dict(vars(args), batch=batch))
    trainer, state, frozen, batch_shapes = build(args, target, layers, remat)
    start = time.perf_counter()
    # XLA:CPU's default scheduler runs independent ops concurrently and hoists remat's recomputation back into
    # the forward pass; its memory-optimised scheduler orders the program for memory, as TPU and GPU do.
    compiled = trainer.step.lower(state, frozen, batch_shapes).compile(
        compiler_options={"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"})
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"layers": layers, "batch": batch, "remat": remat, "compile_s": round(time.perf_counter() - start, 1),
            "argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
            "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes, "flops": cost["flops"]}


def run_child(target_key: str, job: str, argv) -> dict:
    # ynn dot fusions: XLA:CPU runs (some) bf16 matmuls natively instead of on float32 copies of the weights.
    flags = (f" --xla_force_host_platform_device_count={TARGETS[target_key]['devices']}"
             " --xla_cpu_experimental_ynn_fusion_type=dot")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + flags).strip(), JAX_PLATFORMS="cpu")
    return run_json_child("bench.scaling", [*argv, f"--child={target_key}:{job}"], f"child {target_key}:{job} failed",
                          env)


def fit(points: list[dict], key: str) -> dict:
    """`key` = c0 + c1 * layers + batch * (a0 + a1 * layers), fitted to the compiled (layers, batch) points:
    a* is what grows with the batch (activations), c* what does not (gradients, optimizer and compiler
    temporaries, per layer: XLA:CPU's float32 copies of the bfloat16 weights)."""
    import numpy as np

    x = np.array([[1.0, p["layers"], p["batch"], p["layers"] * p["batch"]] for p in points])
    y = np.array([float(p[key]) for p in points])
    c0, c1, a0, a1 = np.linalg.lstsq(x, y, rcond=None)[0]
    return dict(c0=c0, c1=c1, a0=a0, a1=a1)


def evaluate(f: dict, layers: int, batch: int) -> dict:
    return {"batch_independent_base": f["c0"], "batch_independent_per_layer": f["c1"] * layers,
            "batch_proportional": batch * (f["a0"] + f["a1"] * layers)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="random:llama-7b", help="random:<preset> (shapes only)")
    parser.add_argument("--vision", default="nf_resnet50")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--caption_len", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=2)
    parser.add_argument("--targets", default="tpu_v3_64,h100x8", help=f"any of {', '.join(TARGETS)}")
    parser.add_argument("--layers", default="16,32",
                        help="layer counts compiled (>= 2 of them; deep enough that the LM's activations, not the "
                             "vision encoder's backward, set the peak), then fitted and evaluated at the LM's depth")
    parser.add_argument("--remats", default="none,full")
    parser.add_argument("--json", default=None, help="also write the full results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        target_key, job = args.child.split(":", 1)
        if job == "params":
            result = child_params(args, TARGETS[target_key])
        else:
            layers, remat, batch = job.split(":")
            result = child_compile(args, TARGETS[target_key], int(layers), remat, int(batch))
        print(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    lm = lm_config_dict(args.lm)
    full_layers = lm["num_layers"]
    compiled_layers = sorted(int(n) for n in args.layers.split(","))
    if len(compiled_layers) < 2:
        sys.exit("--layers needs at least two layer counts to extrapolate from")
    vision = vision_shapes(args.vision)
    flops = analytic_step_flops(lm, vision, args.batch, args.image_size, args.prefix, args.caption_len)
    print(f"# {args.lm} ({full_layers} layers, hidden {lm['hidden_size']}) in bfloat16, frozen; {args.vision} at "
          f"{args.image_size} px in float32 with Adam; n = {args.prefix}; global batch {args.batch}; captions of "
          f"{args.caption_len} tokens. Step compiled with {compiled_layers} LM layers x global batch "
          f"{sorted({args.batch // 2, args.batch})} on a simulated CPU mesh; temporaries, arguments and XLA FLOPs "
          f"fitted as c0 + c1 * layers + batch * (a0 + a1 * layers) and extrapolated to {full_layers} layers.",
          flush=True)
    fit_batches = sorted({args.batch // 2, args.batch})
    rows, raw = [], {}
    for key in args.targets.split(","):
        target = TARGETS[key]
        params = run_child(key, "params", argv)
        raw[key] = {"params": params, "compiled": {}}
        for remat in args.remats.split(","):
            points = [run_child(key, f"{n}:{remat}:{b}", argv) for n in compiled_layers for b in fit_batches]
            raw[key]["compiled"][remat] = points
            print(f"# {target['name']} remat={remat}: " + json.dumps(points), flush=True)
            temp = evaluate(fit(points, "temp"), full_layers, args.batch)
            arguments = sum(evaluate(fit(points, "argument"), full_layers, args.batch).values())
            fresh_outputs = sum(evaluate(fit(points, "output"), full_layers, args.batch).values()) - sum(
                evaluate(fit(points, "alias"), full_layers, args.batch).values())
            xla_flops = sum(evaluate(fit(points, "flops"), full_layers, args.batch).values()) * target["devices"]
            # Per device: the step's arguments (frozen LM shard, vision params, Adam state, batch shard), the
            # activations, the batch-independent temporaries (vision gradients, optimizer) and any outputs not
            # aliased to donated arguments. XLA:CPU's per-layer weight copies are reported apart, not counted.
            total = arguments + temp["batch_proportional"] + temp["batch_independent_base"] + fresh_outputs
            peak = target["devices"] * target["peak_tflops"] * 1e12
            rows.append({
                "target": target["name"], "mesh": " x ".join(f"{k} {v}" for k, v in target["mesh"].items()),
                "remat": remat, "lm_params_gib": params["lm_params"] / GIB,
                "vision_and_adam_gib": (params["vision_params"] + params["opt_state"]) / GIB,
                "activations_gib": temp["batch_proportional"] / GIB,
                "other_temp_gib": temp["batch_independent_base"] / GIB,
                "cpu_weight_copies_gib": temp["batch_independent_per_layer"] / GIB,
                "arguments_gib": arguments / GIB, "total_gib": total / GIB, "hbm_gib": target["hbm_gib"],
                "model_tflop": flops["total"] / 1e12, "xla_tflop": xla_flops / 1e12,
                "step_s_at_50": flops["total"] / (0.5 * peak), "unit": target["unit"],
                "compile_s": [p["compile_s"] for p in points]})
    print()
    print("| target | mesh | LM remat | frozen LM bf16 GiB/device | vision + Adam GiB/device | activations GiB/device | "
          "other temporaries GiB/device | total GiB/device (HBM) | model FLOPs/step | XLA FLOPs/step | "
          "step at 50% MFU | examples/s at 50% MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['mesh']} | {r['remat']} | {r['lm_params_gib']:.2f} | {r['vision_and_adam_gib']:.2f} | "
              f"{r['activations_gib']:.2f} | {r['other_temp_gib']:.2f} | {r['total_gib']:.2f} ({r['hbm_gib']:.0f}) | "
              f"{r['model_tflop']:.1f} T | {r['xla_tflop']:.1f} T | {1e3 * r['step_s_at_50']:.0f} ms | "
              f"{args.batch / r['step_s_at_50']:.0f} |")
    print("\nNot counted above: batch-independent temporaries that grow per LM layer, "
          + ", ".join(f"{r['target']} remat={r['remat']}: {max(r['cpu_weight_copies_gib'], 0.0):.2f} GiB" for r in rows)
          + " per device (weight copies; XLA:CPU made float32 copies of bfloat16 weights while it upcast "
          "bfloat16 matmuls).")
    print(f"\nAnalytic FLOPs per step: vision fwd {flops['vision_fwd'] / 1e12:.2f} T, vision bwd "
          f"{flops['vision_bwd'] / 1e12:.2f} T, prefix projection {flops['prefix_proj'] / 1e12:.3f} T, LM fwd "
          f"{flops['lm_fwd'] / 1e12:.2f} T, LM activation-only bwd {flops['lm_bwd_activations'] / 1e12:.2f} T.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": raw, "analytic_flops": flops}, indent=1))


if __name__ == "__main__":
    main()
