"""The training loop on the tiny config: end to end on the 8-device mesh, exact resume after SIGTERM in a
subprocess, and the clear errors of mismatched checkpoints and configs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config, xla_flags_for_child

from frozenlm_jax import evaluate
from frozenlm_jax.checkpointing import CheckpointMismatch
from frozenlm_jax.config import validate_config
from frozenlm_jax.train.trainer import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "frozenlm_jax" / "configs"


def read_metrics(workdir):
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}, [m for m in lines if "val_loss" in m]


def test_end_to_end_writes_metrics_and_checkpoints_and_learns(tiny_run, tmp_path):
    workdir, final = tiny_run
    losses, evals = read_metrics(workdir)
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)])
    assert [e["step"] for e in evals] == [6, 12] and len(evals[-1]["samples"]) == 2
    # The in-loop evaluators are evaluate's: the same captions and scores of the step-12 model.
    report = evaluate.main([f"--workdir={workdir}", "--tasks=shapes_captions", "--num_examples=8", "--step=12",
                            f"--out={tmp_path / 'report'}"])
    scores, details = report["rows"][0]["scores"], report["rows"][0]["details"]
    assert evals[-1]["shapes_captions/examples"] == details["shapes_captions colour"]["examples"]
    assert len(set(evals[-1]["shapes_captions/examples"])) > 1  # captions that can tell two models apart
    assert [evals[-1]["shapes_captions/colour"], evals[-1]["shapes_captions/shape"]] == [
        scores["shapes_captions colour"], scores["shapes_captions shape"]]
    assert final["val_loss"] == evals[-1]["val_loss"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["num_steps"] == 12 and "random" in saved["lm"]  # a random LM records its shape
    assert (workdir / "samples" / "step_12.png").read_bytes().startswith(b"\x89PNG")
    assert {p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()} >= {"8", "12"}
    assert list((workdir / "tensorboard").iterdir())


def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(tiny_run, tiny_data_dir, tmp_path):
    expected, expected_evals = read_metrics(tiny_run[0])
    command = [sys.executable, "-m", "frozenlm_jax.train", f"--config={CONFIGS / 'tiny.py'}",
               f"--workdir={tmp_path}", f"--config.data.data_dir={tiny_data_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        metrics = tmp_path / "metrics.jsonl"
        if metrics.exists() and len(read_metrics(tmp_path)[0]) >= 3:
            first.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    stopped_at = max(read_metrics(tmp_path)[0])
    assert 3 <= stopped_at < 12
    quiet_env = {k: v for k, v in env.items() if not k.startswith("TF_")}  # the user's defaults (conftest sets one)
    second = subprocess.run(command, env=quiet_env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    for noise in ("oneDNN", "InitializeLog", "deprecated", "Unable to initialize backend"):
        assert noise not in second.stderr + second.stdout, (noise, second.stderr[-3000:])
    assert not re.search(r"^[IWE]\d{4} \d\d:\d\d", second.stderr, re.MULTILINE), second.stderr[-3000:]  # absl lines
    # The run ends with what it learned against chance and blank images, its files and the next commands.
    said = second.stdout + second.stderr
    assert "Trained 12 steps" in said and f"python -m frozenlm_jax.evaluate --workdir={tmp_path}" in said, said[-3000:]
    assert re.search(r"shapes_captions shape +[\d.]+  \(chance 0\.\d+; blank images [\d.]+\)", said), said[-3000:]
    resumed, _ = read_metrics(tmp_path)
    lines = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert lines == list(range(1, 13)), "the resumed run must run only the remaining steps"
    np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)], rtol=1e-5)


def test_restoring_with_another_lm_or_other_shapes_is_a_clear_error(tiny_run, tiny_data_dir, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(tiny_run[0], workdir)
    other_lm = tiny_config(tiny_data_dir)
    other_lm.seed = 1  # another random LM
    with pytest.raises(CheckpointMismatch, match=r"trained with the frozen LM .*random\(seed=0\).* but this run has"):
        train_and_evaluate(other_lm, workdir)
    other_shapes = tiny_config(tiny_data_dir)
    other_shapes.model.num_prefix_tokens = 3
    with pytest.raises(CheckpointMismatch, match=r"parameter state/params/vision/prefix_proj/\w+ has shape"):
        train_and_evaluate(other_shapes, workdir)


def test_unknown_config_keys_fail_fast(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    unlocked = ml_collections.ConfigDict(config.to_dict())
    unlocked.train.num_stepz = 3
    unlocked.extra = 1
    with pytest.raises(ValueError, match="unknown config key\\(s\\): extra, train.num_stepz"):
        validate_config(unlocked)
    with pytest.raises(AttributeError, match="num_stepz"):
        config.train.num_stepz = 3


def test_default_config_takes_the_variant_as_its_argument():
    from frozenlm_jax.configs import shapes_smollm2

    assert shapes_smollm2.get_config().model.variant == "frozen"
    blind = shapes_smollm2.get_config("train_blind")
    assert blind.model.variant == "train_blind"
    validate_config(blind)
    with pytest.raises(ValueError, match="model.variant 'trainblind' is not one of frozen, finetuned"):
        validate_config(shapes_smollm2.get_config("trainblind"))


def test_nan_loss_stops_with_a_clear_message_and_nothing_bad_is_saved(tiny_data_dir, tmp_path):
    """Checkpoint steps (every 2) are not log steps (every 5): the loss is still checked before each save."""
    from frozenlm_jax.checkpointing import Checkpointer

    config = tiny_config(tiny_data_dir, num_steps=6, log_every=5, checkpoint_every=2)
    config.optimizer.learning_rate = 1e12
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule_kind = "constant"
    with pytest.raises(FloatingPointError, match=r"the training loss became nan .* at step [0-9]+; nothing of it was "
                                                 r"saved and (the newest verified checkpoint is step|no verified)"):
        train_and_evaluate(config, tmp_path)
    checkpointer = Checkpointer(tmp_path / "checkpoints", 2, "", None, create=False)
    assert checkpointer.all_steps(), "the loss stayed finite past the first checkpoint step"
    for step in checkpointer.all_steps():
        assert checkpointer.verify(step)
        params, _ = checkpointer.restore_params(step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
    checkpointer.close()


def test_a_damaged_checkpoint_is_named_and_resume_falls_back(tiny_run, tiny_data_dir, tmp_path, capsys):
    """A data file of the latest step zeroed and cut, as a failing disk would leave it: restoring that step names
    it and the file; resuming takes the newest intact step instead, saying so; a missing file is caught too."""
    from frozenlm_jax import load_frozen
    from frozenlm_jax.checkpointing import CheckpointDamaged, Checkpointer
    from frozenlm_jax.train.trainer import restore_run

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", 2, "", None, create=False)
    latest, older = sorted(checkpointer.all_steps(), reverse=True)[:2]
    assert checkpointer.verify(latest) and checkpointer.verify(older)
    data = max((p for p in (workdir / "checkpoints" / str(latest) / "state").rglob("*") if p.is_file()
                and "/d/" in p.as_posix()), key=lambda p: p.stat().st_size)
    damaged = bytearray(data.read_bytes())
    damaged[100:164] = bytes(64)
    data.write_bytes(bytes(damaged[:-min(1000, len(damaged) // 2)]))
    with pytest.raises(CheckpointDamaged, match=f"checkpoint step {latest} is damaged: .*{data.name} has"):
        checkpointer.verify(latest)
    checkpointer.close()
    with pytest.raises(CheckpointDamaged, match=f"checkpoint step {latest}"):
        load_frozen(workdir, step=latest)
    run = restore_run(tiny_config(tiny_data_dir), workdir)
    run.checkpointer.close()
    assert int(run.state.step) == older and run.checkpointer.all_steps()[-1] == older
    assert f"resuming from step {older}, the newest intact checkpoint" in capsys.readouterr().out
    missing = next(p for p in (workdir / "checkpoints" / str(older)).rglob("*") if p.is_file() and "/d/" in p.as_posix())
    missing.unlink()
    with pytest.raises(CheckpointDamaged, match=f"step {older} is damaged: .* is missing"):
        Checkpointer(workdir / "checkpoints", 2, "", None, create=False).verify(older)


def test_exported_model_reloads_with_the_same_logits(tiny_run, tiny_data_dir, tmp_path):
    import jax

    from frozenlm_jax import load_frozen
    from frozenlm_jax.models.frozen import Frozen
    from frozenlm_jax.train.trainer import export, restore_run

    config = tiny_config(tiny_data_dir)
    out = export(config, tiny_run[0], tmp_path / "exported")
    assert (out / "lm.safetensors").exists()  # a random LM cannot be re-loaded from a source: weights go along
    loaded = load_frozen(out)
    run = restore_run(config, tiny_run[0])
    run.checkpointer.close()
    batch = {"tokens": np.full((2, 6), 5, np.int32), "images": np.random.default_rng(0).normal(size=(2, 1, 16, 16, 3)).astype(np.float32),
             "image_mask": np.ones((2, 1), bool), "image_positions": np.zeros((2, 1), np.int32)}
    params = {"vision": run.state.params["vision"], "lm": run.frozen["lm"]}
    expected = jax.jit(lambda p, b: run.model.apply({"params": p}, b))(params, batch)
    got = jax.jit(lambda p, b: loaded.model.apply({"params": p}, b))(loaded.params, batch)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)  # the run's params live on 8 devices
    assert loaded.tokenizer.encode("a red circle") == run.tokenizer.encode("a red circle")
    assert loaded.image_size == 16 and isinstance(loaded.model, Frozen)


def test_load_frozen_opens_the_best_checkpoint_of_a_workdir(tiny_run):
    import jax
    import orbax.checkpoint as ocp
    from flax import traverse_util

    from frozenlm_jax import load_frozen

    workdir = tiny_run[0]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5; it keeps steps \[8, 12\]"):
        load_frozen(workdir, step=5)
    best = load_frozen(workdir)  # step 12: the only kept checkpoint with a validation loss
    earlier = load_frozen(workdir, step=8)
    vision = lambda params: traverse_util.flatten_dict(jax.device_get(params), sep="/")  # noqa: E731
    for step, loaded in [(12, best), (8, earlier)]:
        saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
        for name, value in vision(saved["state"]["params"]["vision"]).items():
            np.testing.assert_array_equal(vision(loaded.params["vision"])[name], value)
    earlier_vision = vision(earlier.params["vision"])
    assert any(not np.array_equal(v, earlier_vision[k]) for k, v in vision(best.params["vision"]).items())
    prompt = [np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8), "A picture of"]
    assert best.image_size == 16 and len(best.generate(prompt, max_new_tokens=4)) == 1


def test_every_config_file_builds_with_known_keys():
    import importlib.util

    for path in sorted(CONFIGS.glob("[!_]*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config("/some/lm_dir") if path.stem in ("cc3m_paper", "coco_gpt2") else module.get_config()
        validate_config(config)
        assert config.train.batch_size % (config.mesh.data if config.mesh.data > 0 else 1) == 0, path.name


def test_two_processes_survive_a_sigterm_on_one_and_reach_the_losses_of_one(tiny_run, tiny_data_dir, tmp_path):
    """jax.distributed on localhost, 4 CPU devices per process, the same global batch. SIGTERM to process 1 alone:
    both save the same step and exit cleanly (JAX's preemption service, no per-step collective); rerun, they
    finish with the losses and in-loop evaluation of one process with 8 devices (the tiny config orders data
    globally)."""
    import socket

    expected, expected_evals = read_metrics(tiny_run[0])

    def launch():
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "frozenlm_jax.train", f"--config={CONFIGS / 'tiny.py'}",
                   f"--workdir={tmp_path}", f"--config.data.data_dir={tiny_data_dir}"]
        processes = []
        for process_id in range(2):
            env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags_for_child(4),
                       FROZENLM_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                       FROZENLM_NUM_PROCESSES="2", FROZENLM_PROCESS_ID=str(process_id))
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True))
        return processes

    processes = launch()
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() or max(read_metrics(tmp_path)[0], default=0) < 2:
        assert time.time() < deadline and processes[0].poll() is None, processes[0].communicate()[1][-3000:]
        time.sleep(0.1)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[1][1][-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 12 and "preempted (SIGTERM): saved step" in outputs[0][1] + outputs[0][0]
    for process in launch():
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    got, evals = read_metrics(tmp_path)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-5)
    # The in-loop evaluation of step 12 (inputs placed by each process on its devices): one process's captions.
    keys = ("shapes_captions/examples", "shapes_captions/colour", "shapes_captions/shape")
    assert [evals[-1][k] for k in keys] == [expected_evals[-1][k] for k in keys]


def test_profile_trace_and_export_by_lm_reference(tiny_data_dir, tmp_path):
    """A loadable frozen LM is exported as a reference (source + fingerprint): load_frozen re-loads it, and a
    changed LM at that source is refused. `train.profile_steps` writes a jax.profiler trace."""
    import jax
    from conftest import write_random_hf_llama
    from safetensors.numpy import load_file, save_file

    from frozenlm_jax import load_frozen
    from frozenlm_jax.tokenizer import byte_tokenizer
    from frozenlm_jax.train.trainer import export, restore_run

    tokenizer = byte_tokenizer()
    lm_dir = tmp_path / "lm"
    write_random_hf_llama(lm_dir, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                          bos_token_id=None)
    (lm_dir / "tokenizer.json").write_text(tokenizer.backend.to_str())
    config = tiny_config(tiny_data_dir, num_steps=3, eval_every=3, checkpoint_every=3, profile_steps=(1, 2))
    config.lm.source = str(lm_dir)
    train_and_evaluate(config, tmp_path / "run")
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))

    out = export(config, tmp_path / "run", tmp_path / "exported")
    assert not (out / "lm.safetensors").exists()
    loaded = load_frozen(out)
    run = restore_run(config, tmp_path / "run")
    run.checkpointer.close()
    batch = {"tokens": np.full((2, 6), 5, np.int32), "images": np.zeros((2, 1, 16, 16, 3), np.float32),
             "image_mask": np.ones((2, 1), bool), "image_positions": np.zeros((2, 1), np.int32)}
    params = {"vision": run.state.params["vision"], "lm": run.frozen["lm"]}
    expected = jax.jit(lambda p, b: run.model.apply({"params": p}, b))(params, batch)
    got = jax.jit(lambda p, b: loaded.model.apply({"params": p}, b))(loaded.params, batch)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)

    tensors = load_file(str(lm_dir / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
    save_file(tensors, str(lm_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="is not the one this model was trained with"):
        load_frozen(out)


def test_config_json_holds_only_what_applies():
    from frozenlm_jax.config import applicable, default_config

    loaded = applicable(default_config())
    assert "random" not in loaded["lm"] and "tokenizer" not in loaded["lm"] and loaded["lm"]["source"]
    random = default_config()
    random.lm.source = "random"
    assert applicable(random)["lm"]["random"]["hidden_size"] == random.lm.random.hidden_size


def test_configs_are_found_by_name_or_path():
    from frozenlm_jax.config import config_file

    assert config_file("tiny") == f"{CONFIGS / 'tiny.py'}"
    assert config_file("cc3m_paper:/lm") == f"{CONFIGS / 'cc3m_paper.py'}:/lm"
    path = str(CONFIGS / "tiny.py")
    assert config_file(path + ":x") == path + ":x"
    with pytest.raises(ValueError, match="no packaged config of that name; packaged: cc3m_paper, coco_gpt2, "
                                         "shapes_smollm2, tiny"):
        config_file("shapes")
