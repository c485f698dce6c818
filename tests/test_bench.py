"""The benchmarks run end to end on tiny configs (as subprocesses, as a user runs them), so they cannot rot;
and the torch reference's NF-ResNet computes what ours does. No test here depends on a timing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import xla_flags_for_child

from bench.hlo import dot_floor, hlo_dots, hlo_op_categories
from bench.workload import LM_PRESETS, analytic_step_flops, make_batch, vision_shapes

REPO = Path(__file__).resolve().parents[1]
TINY_LM = "--lm=random:llama-tiny"


def run_bench(script: str, *args: str, timeout: int = 300) -> str:
    """`python -m bench.<script> <args>` from the repository root; its stdout."""
    env = dict(os.environ, XLA_FLAGS=xla_flags_for_child(None))  # the children pick their own device count
    out = subprocess.run([sys.executable, "-m", f"bench.{script}", *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_train_step_bench_runs_both_implementations(torch):
    out = run_bench("train_step", TINY_LM, "--vision=nf_resnet_tiny", "--image_size=16", "--batches=2",
                    "--caption_len=4", "--steps=1", "--warmup=1", "--rounds=1", "--profile")
    [row] = json_lines(out)
    assert row["jax"]["step_s"] > 0 and row["torch"]["step_s"] > 0 and row["speedup"] > 0
    assert row["jax"]["peak_rss_mib"] > 0 and row["torch"]["peak_rss_mib"] > 0
    assert row["jax"]["xla_flops"] > 0 and row["analytic_flops"]["total"] > 0
    assert row["jax"]["profile"]["op_time_ms_per_step"] > 0 and row["torch"]["profile"]
    assert row["jax"]["profile"]["vision_fwd_bwd_s"] > 0 and row["torch"]["profile"]["vision_fwd_bwd_s"] > 0
    assert row["jax"]["dot_floor"]["dots"] > 0 and 0 <= row["jax"]["dot_floor"]["seconds"] < row["jax"]["step_s"]
    assert "| batch 2 |" in out  # the markdown table


def test_decode_bench_runs_both_implementations(torch):
    out = run_bench("decode", TINY_LM, "--batches=2", "--max_new_tokens=3", "--rounds=1", "--repeats=1")
    [row] = json_lines(out)
    assert row["jax"]["tokens_per_s"] > 0 and row["torch"]["tokens_per_s"] > 0 and row["speedup"] > 0


def test_compile_time_bench_runs():
    out = run_bench("compile_time", "--depths=1", "--scans=1", "--image_size=16", "--caption_len=4",
                    "--max_new_tokens=2")
    rows = json_lines(out)
    assert {(r["depth"], r["scan_layers"]) for r in rows} == {(1, True)}  # unrolled: as in the train_step test
    assert all(r["step_compile_s"] > 0 for r in rows)


def test_scaling_bench_runs_on_a_simulated_mesh():
    out = run_bench("scaling", "--targets=h100x8", "--layers=1,2", "--remats=none", TINY_LM,
                    "--vision=nf_resnet_tiny", "--image_size=16", "--batch=16", "--caption_len=4")
    assert "| 8x H100 SXM | data 8 | none |" in out


def test_analytic_flops_match_xla_cost_analysis():
    """The benchmark's analytic FLOP count agrees with XLA's count of the compiled step (matmul-dominated config)."""
    from frozenlm_jax.models.frozen import Frozen
    from frozenlm_jax.models.lm import LMConfig
    from frozenlm_jax.models.vision import encoder_config
    from frozenlm_jax.parallel import make_mesh
    from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES
    from frozenlm_jax.train.state import init_train_state
    from frozenlm_jax.train.step import make_trainer

    lm = dict(LM_PRESETS["llama-tiny"], hidden_size=256, intermediate_size=1024, head_dim=64, vocab_size=4096)
    batch, image, prefix, caption = 8, 16, 2, 14
    model = Frozen(LMConfig(**lm), encoder_config("nf_resnet_tiny"), prefix)
    trainer = make_trainer(model, make_mesh({"data": -1}), label_rules=VARIANT_LABEL_RULES["frozen"],
                           image_shape=(image, image, 3), optimizer_kwargs=dict(learning_rate=1e-3),
                           max_targets=caption)
    state, frozen = init_train_state(trainer, jax.random.key(0), None, (image, image, 3))
    sharded = trainer.shard_batch(make_batch(batch, image, prefix, caption, lm["vocab_size"]))
    cost = trainer.step.lower(state, frozen, sharded).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"] * jax.device_count()  # per device x devices
    flops = analytic_step_flops(lm, vision_shapes("nf_resnet_tiny"), batch, image, prefix, caption)
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    assert 0.9 < flops["total"] / xla_flops < 1.02, (flops, xla_flops)


def test_hlo_dots_counts_each_dot_as_often_as_a_step_runs_it():
    """The dot floor's inventory: a loop's dots count their trip count, a batched dot keeps its dimension
    numbers, and timing them gives a positive floor."""
    def f(x, w, q):
        h = jax.lax.fori_loop(0, 5, lambda i, h: jax.numpy.tanh(h @ w), x)
        return h.sum() + jax.numpy.einsum("bij,bkj->bik", q, q).sum()

    args = (np.ones((64, 32), np.float32), np.ones((32, 32), np.float32), np.ones((3, 8, 16), np.float32))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    dots = hlo_dots(hlo)
    assert dots[(("float32", (64, 32)), ("float32", (32, 32)), (((1,), (0,)), ((), ())), "float32")] == 5
    [batched] = [key for key in dots if key[2][1] != ((), ())]
    assert batched[2] == (((2,), (2,)), ((0,), (0,))) and dots[batched] == 1
    floor = dot_floor(hlo, {}, min_seconds=0.01)
    assert floor["dots"] == 6 and floor["seconds"] >= 0 and floor["by_shape"][0]["count"] in (1, 5)


def test_torch_reference_nf_resnet_matches_ours(torch):
    """The benchmark's torch NF-ResNet + prefix projection computes our VisionPrefix (same weights copied)."""
    from bench.torch_reference import VisionPrefix as TorchVisionPrefix

    from frozenlm_jax.models.frozen import VisionPrefix
    from frozenlm_jax.models.vision import encoder_config

    for name, overrides, size in [("nf_resnet_tiny", {}, 16),
                                  ("nf_resnet_tiny", dict(stem_pool=True, stem_kernel=7, depths=(2, 1)), 30)]:
        config = encoder_config(name, skip_gain_init=0.5, **overrides)
        ours = VisionPrefix(config, 2, 12)
        images = np.random.default_rng(0).uniform(0, 1, (2, size, size, 3)).astype(np.float32)
        params = jax.tree.map(np.asarray, ours.init(jax.random.key(0), images)["params"])
        params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                              is_leaf=lambda x: hasattr(x, "unbox"))
        expected = np.asarray(ours.apply({"params": params}, images))

        shapes = vision_shapes(name) | overrides | {"skip_gain_init": 0.5}
        theirs = TorchVisionPrefix(shapes, 2, 12)
        copy_conv = lambda conv, p: conv.load_state_dict({  # noqa: E731
            "weight": torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()),
            "gain": torch.tensor(np.asarray(p["gain"])), "bias": torch.tensor(np.asarray(p["bias"]))})
        encoder = params["encoder"]
        copy_conv(theirs.encoder.stem, encoder["stem"])
        blocks = iter(theirs.encoder.blocks)
        for stage, depth in enumerate(shapes["depths"]):
            for index in range(depth):
                block, p = next(blocks), encoder[f"stage{stage}_block{index}"]
                for conv in ("conv1", "conv2", "conv3", "shortcut"):
                    assert (conv in p) == (getattr(block, conv) is not None)
                    if conv in p:
                        copy_conv(getattr(block, conv), p[conv])
                block.skip_gain.data = torch.tensor(float(p["skip_gain"]))
        theirs.prefix_proj.weight.data = torch.from_numpy(np.asarray(params["prefix_proj"]["kernel"]).T.copy())
        theirs.prefix_proj.bias.data = torch.tensor(np.asarray(params["prefix_proj"]["bias"]))
        with torch.no_grad():
            got = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_logits_bench_runs():
    [row] = json_lines(run_bench("bf16_logits", TINY_LM, "--prompts=2"))
    assert row["name"] == "ours bfloat16" and row["positions"] > 0
    # bfloat16 rounding moves the logits, a little
    assert 0 < row["mean_abs"] < 0.1 and row["top1_agree"] > 0.5


@pytest.mark.parametrize("script", ["train_step", "decode", "compile_time", "scaling", "bf16_logits"])
def test_bench_scripts_have_help(script):
    assert "usage" in run_bench(script, "--help")


def test_gpu_bench_runs_its_checks_on_the_cpu(torch, tmp_path):
    """bench/gpu.py on a machine without an accelerator: every check runs, the CPU compared to itself."""
    run_bench("gpu", "--quick", "--parts=correctness,main_job", f"--out={tmp_path}")
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["correctness"]["pass"] and results["device"] == "cpu"
    assert results["correctness"]["frozen_steps"]["lm_bit_identical"] == {"cpu": True, "accelerator": True}
    assert results["correctness"]["cudnn_attention"]["cudnn_called"] is False  # no GPU: the XLA path serves
    [row] = results["main_job"]["rows"]
    assert row["step_s"] > 0 and row["quick_start_600_steps_s"] == round(600 * row["step_s"], 1)
    table = (tmp_path / "gpu.md").read_text()
    assert "| 3 Frozen steps |" in table and "| main job | xla |" in table


def test_gpu_library_calls_are_categorised():
    hlo = """ENTRY %main (p: bf16[8,8]) -> bf16[8,8] {
  %gemm.1 = (bf16[8,8], s8[0]) custom-call(bf16[8,8] %p, bf16[8,8] %p), custom_call_target="__cublas$gemm"
  %fmha.2 = (bf16[1,8,8]) custom-call(bf16[1,8,8] %q), custom_call_target="__cudnn$fmhaSoftmax"
  %conv.3 = (f32[1,8,8,4]) custom-call(f32[1,8,8,3] %x), custom_call_target="__cudnn$convForward"
  ROOT %add.4 = bf16[8,8] add(bf16[8,8] %p, bf16[8,8] %p)
}"""
    assert hlo_op_categories(hlo) == {"gemm.1": "matmul", "fmha.2": "attention", "conv.3": "convolution",
                                      "add.4": "other"}
