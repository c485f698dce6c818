"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m frozenlm_jax.train`.

Resumes automatically from the workdir's latest checkpoint (then `train.init_checkpoint`, then scratch);
logs to a progress bar, `metrics.jsonl` and TensorBoard; evaluates validation loss, greedy sample
captions and the evaluators of `train.eval_tasks` (the same as `python -m frozenlm_jax.evaluate`'s); saves on SIGTERM; stops with a clear message on a NaN loss, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from frozenlm_jax import paths
from frozenlm_jax.build import build_lm, build_model
from frozenlm_jax.checkpointing import CheckpointDamaged, Checkpointer, fingerprint, write_json
from frozenlm_jax.config import applicable, validate_config
from frozenlm_jax.data.batch import make_global_batch
from frozenlm_jax.data.images import IMAGE_MEAN, IMAGE_STD
from frozenlm_jax.eval.report import write_caption_grid
from frozenlm_jax.eval.suite import Suite
from frozenlm_jax.export import save_exported
from frozenlm_jax.frozen_lm import FrozenLM
from frozenlm_jax.models.frozen import Frozen, check_batch
from frozenlm_jax.parallel import make_mesh
from frozenlm_jax.train.optimizer import VARIANT_LABEL_RULES, with_prefix_rule
from frozenlm_jax.train.state import init_train_state
from frozenlm_jax.train.step import make_trainer
from frozenlm_jax.trees import merge_params

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when FROZENLM_DISTRIBUTED=1 (set by launch_tpu.sh), once.

    On TPU pods and SLURM the cluster is detected; elsewhere set JAX_COORDINATOR_ADDRESS (host:port),
    FROZENLM_NUM_PROCESSES and FROZENLM_PROCESS_ID. CPU processes exchange data through gloo.
    """
    if os.environ.get("FROZENLM_DISTRIBUTED") != "1" or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = {}
    if "FROZENLM_NUM_PROCESSES" in os.environ:
        explicit = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                        num_processes=int(os.environ["FROZENLM_NUM_PROCESSES"]),
                        process_id=int(os.environ["FROZENLM_PROCESS_ID"]))
    jax.distributed.initialize(**explicit)


@dataclasses.dataclass
class Logger:
    """Metrics to metrics.jsonl and TensorBoard, from process 0 only.

    A local workdir: each write appends to metrics.jsonl. A gs:// workdir (objects cannot be appended to): the
    lines are kept, the existing file read first, and the whole file rewritten at most every `flush_s` seconds
    and on `close`; TensorBoard writes to a local temporary folder that is uploaded to WORKDIR/tensorboard then.
    """

    workdir: Any
    flush_s: float = 30.0

    def __post_init__(self):
        self.enabled = jax.process_index() == 0
        self.workdir = paths.path(self.workdir)
        self.remote = paths.is_remote(self.workdir)
        if self.enabled:
            from flax.metrics import tensorboard

            self.metrics_file = self.workdir / "metrics.jsonl"
            self.lines = []
            if self.remote and self.metrics_file.exists():
                self.lines = self.metrics_file.read_text().splitlines(keepends=True)
            self.local_events = tempfile.mkdtemp(prefix="frozenlm_tensorboard_") if self.remote else None
            self.tensorboard = tensorboard.SummaryWriter(self.local_events or str(self.workdir / "tensorboard"))
            self.flushed = time.monotonic()

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            with self.metrics_file.open("a") as f:
                f.write(line)
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tensorboard.scalar(key, value, step)
        self.tensorboard.flush()
        if self.remote and time.monotonic() - self.flushed >= self.flush_s:
            self.upload()

    def upload(self) -> None:
        """A gs:// workdir: metrics.jsonl rewritten whole, the TensorBoard events copied up."""
        if not (self.enabled and self.remote):
            return
        self.metrics_file.write_text("".join(self.lines))
        paths.upload_tree(self.local_events, self.workdir / "tensorboard")
        self.flushed = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.tensorboard.close()
        self.upload()
        if self.local_events:
            shutil.rmtree(self.local_events, ignore_errors=True)
            self.local_events = None


def _pipelines(config, tokenizer, data_state):
    import frozenlm_jax.data.shapes  # noqa: F401 - registers frozen_shapes
    from frozenlm_jax.data.pipeline import CaptionPipeline, CaptionSource, PipelineConfig

    name = config.data.dataset + (f"/{config.data.builder_config}" if config.data.builder_config else "")
    source = lambda split: CaptionSource(  # noqa: E731
        name, split, config.data.data_dir or None, config.data.image_key, config.data.caption_key)
    common = dict(image_size=config.vision.image_size, max_len=config.data.max_len,
                  num_prefix=config.model.num_prefix_tokens, batch_size=config.train.batch_size,
                  seed=config.seed, augment=config.data.augment, caption_choice=config.data.caption_choice)
    train = CaptionPipeline(source(config.data.train_split), PipelineConfig(**common, host_order=config.data.host_order),
                            tokenizer, state=data_state)
    eval_config = PipelineConfig(**{**common, "augment": False, "shuffle": False})
    evaluation = CaptionPipeline(source(config.data.eval_split), eval_config, tokenizer)
    return train, evaluation


@dataclasses.dataclass
class Run:
    """A run's model, compiled step and state: restored from the workdir's latest checkpoint if any."""

    model: Frozen
    trainer: Any
    state: Any
    frozen: Any
    rng: jax.Array
    tokenizer: Any
    lm_source: str
    checkpointer: Checkpointer
    data_state: dict | None
    restore_s: float | None  # seconds spent restoring a checkpoint, if one was restored


def restore_run(config: ml_collections.ConfigDict, workdir, step: int | str | None = None) -> Run:
    """Build the model and step of `config`; resume from `workdir`'s latest checkpoint, else
    `train.init_checkpoint`, else a fresh initialisation.

    step: restore this step of the workdir instead of the latest, or "best": the kept step with the lowest
    validation loss (the latest if none has one).
    """
    validate_config(config)
    workdir = paths.path(workdir)
    paths.preflight(workdir)  # a gs:// workdir whose endpoint is unreachable fails here, in seconds
    maybe_initialize_distributed()
    workdir.mkdir(parents=True, exist_ok=True)
    rules = tuple(tuple(rule) for rule in config.axis_rules)
    mesh = make_mesh(config.mesh.to_dict())
    lm_config, lm_params, tokenizer, lm_source = build_lm(config, mesh, rules)
    n = config.model.num_prefix_tokens
    model = build_model(config, lm_config)
    image_shape = (config.vision.image_size, config.vision.image_size, 3)
    label_rules = tuple(tuple(r) for r in config.model.label_rules) or VARIANT_LABEL_RULES[config.model.variant]
    if config.optimizer.prefix_learning_rate:
        label_rules = with_prefix_rule(label_rules)
    trainer = make_trainer(model, mesh, label_rules=label_rules, image_shape=image_shape, rules=rules,
                           optimizer_kwargs=dict(config.optimizer.to_dict(), total_steps=config.train.num_steps),
                           max_targets=config.data.max_len - n, grad_accum_steps=config.train.grad_accum_steps)
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    state, frozen = init_train_state(trainer, init_rng, lm_params, image_shape, vision_init=config.vision.init or None)
    del lm_params
    checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints, lm_source,
                                fingerprint(frozen, lm_source))
    data_state, restore_s = None, None
    if checkpointer.latest_step() is not None:
        if step == "best":
            step = checkpointer.best_step()
        if step is not None and step not in checkpointer.all_steps():
            raise FileNotFoundError(f"{workdir} has no checkpoint of step {step!r}; it keeps steps "
                                    f"{checkpointer.all_steps()} (or pass step='best' or None: the latest)")
        if step is None:
            step = _intact_resume_step(checkpointer)
        start = time.perf_counter()
        state, rng, data_states = checkpointer.restore(state, rng, trainer.state_shardings, step=step)
        jax.block_until_ready(state)
        data_state, restore_s = data_states[jax.process_index()], time.perf_counter() - start
    elif config.train.init_checkpoint:
        initial = Checkpointer(config.train.init_checkpoint, 1, lm_source, checkpointer.frozen["fingerprint"])
        state, _, _ = initial.restore(state, rng, trainer.state_shardings)
        state = state.replace(step=jnp.zeros_like(state.step))
    return Run(model, trainer, state, frozen, rng, tokenizer, lm_source, checkpointer, data_state, restore_s)


def _intact_resume_step(checkpointer: Checkpointer) -> int:
    """The latest step if its files verify; else, after saying so, the newest intact older one (the damaged
    newer steps are deleted, so the run saves those steps afresh)."""
    latest = checkpointer.latest_step()
    try:
        checkpointer.verify(latest)
        return latest
    except CheckpointDamaged as damage:
        fallback = checkpointer.newest_intact_step(before=latest)
        if fallback is None:
            raise CheckpointDamaged(f"{damage}; no older kept step is intact: start a new workdir, or set "
                                    "train.init_checkpoint to an intact run") from None
        for step in checkpointer.all_steps():
            if step > fallback:
                checkpointer.manager.delete(step)
        tqdm.write(f"{damage}\nresuming from step {fallback}, the newest intact checkpoint (deleted the damaged "
                   "newer ones)")
        return fallback


def _check_finite(metrics, step: int, checkpointer: Checkpointer, workdir) -> None:
    """Raise, naming the newest verified checkpoint, if the loss or the gradient norm is not finite (then the
    state that step produced must never be saved)."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    checkpointer.wait()
    good = checkpointer.newest_intact_step(verified_only=True)
    where = (f"the newest verified checkpoint is step {good} in {workdir / 'checkpoints'}" if good is not None
             else "no verified checkpoint exists yet")
    raise FloatingPointError(
        f"the training loss became {loss} (gradient norm {grad_norm}) at step {step}; nothing of it was saved and "
        f"{where}. Lower optimizer.learning_rate or raise optimizer.warmup_steps, then rerun: the run resumes from "
        "that checkpoint")


def export(config: ml_collections.ConfigDict, workdir, out, lm_weights: bool = False):
    """Write the latest checkpoint of `workdir` as a self-contained model that `load_frozen` opens."""
    paths.preflight(out)
    run = restore_run(config, workdir)
    trained = run.checkpointer.latest_step() is not None
    run.checkpointer.close()
    if not trained:
        raise FileNotFoundError(f"{workdir} has no checkpoint to export; train first")
    # A trained (finetuned, scratch) or random LM is part of the model; a loadable frozen one is a
    # reference (source + fingerprint) unless its weights are asked for.
    include_lm = lm_weights or "lm" in run.state.params or config.lm.source == "random"
    return save_exported(out, run.model, merge_params(run.state.params, run.frozen), run.tokenizer,
                         run.lm_source, run.checkpointer.frozen["fingerprint"], config.vision.image_size,
                         include_lm_weights=include_lm)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train `config` in `workdir` (local or gs://; resuming if it holds checkpoints); return the last logged
    metrics."""
    run = restore_run(config, workdir)
    workdir = paths.path(workdir)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", applicable(config))
    model, trainer, state, frozen, rng = run.model, run.trainer, run.state, run.frozen, run.rng
    tokenizer, checkpointer, data_state = run.tokenizer, run.checkpointer, run.data_state
    mesh, n = trainer.mesh, model.num_prefix_tokens
    train_data, eval_data = _pipelines(config, tokenizer, data_state)

    step = int(state.step)
    logger = Logger(workdir)
    if run.restore_s is not None:
        logger.write(step, {"checkpoint_restore_s": run.restore_s})
    # One process: SIGTERM sets `stop`. Several: JAX's preemption service takes SIGTERM (a handler here would
    # replace its own) and agrees in the background on a step at which every process saves and stops.
    stop = {"signal": None}
    several = jax.process_count() > 1
    previous = None if several else signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    eval_loss = _make_eval(model, trainer)
    suite = in_loop_suite(config)
    last_metrics: dict = {}
    start_step, tic = step, time.perf_counter()
    profile_start, profile_stop = config.train.profile_steps
    progress = tqdm(total=config.train.num_steps, initial=step, desc="train", unit="step", disable=jax.process_index() != 0)
    profile_dir = None
    try:
        while step < config.train.num_steps:
            if step == profile_start and profile_stop > profile_start:
                profile_dir = tempfile.mkdtemp(prefix="frozenlm_profile_") if paths.is_remote(workdir) else None
                jax.profiler.start_trace(profile_dir or str(workdir / "profile"))
            host_batch = next(train_data)
            if step == start_step:
                check_batch(host_batch, n)
            batch = _global_batch(host_batch, mesh)
            state, metrics = trainer.step(state, frozen, batch)
            step += 1
            if step == profile_stop and profile_stop > profile_start:
                jax.profiler.stop_trace()
                if profile_dir:  # the profiler writes locally; a gs:// workdir gets a copy
                    paths.upload_tree(profile_dir, workdir / "profile")
                    shutil.rmtree(profile_dir, ignore_errors=True)
            log_now = step % config.train.log_every == 0 or step == config.train.num_steps
            if log_now:
                metrics = jax.device_get(metrics)
                _check_finite(metrics, step, checkpointer, workdir)
                loss = float(metrics["loss"])
                elapsed = time.perf_counter() - tic
                last_metrics = {"loss": loss, "grad_norm": float(metrics["grad_norm"]),
                                "targets": float(metrics["num_targets"]),
                                "examples_per_s": (step - start_step) * config.train.batch_size / elapsed,
                                **train_data.metrics()}
                logger.write(step, last_metrics)
                progress.set_postfix(loss=f"{loss:.3f}", ex_s=f"{last_metrics['examples_per_s']:.1f}")
            progress.update(1)
            if several and multihost_utils.reached_preemption_sync_point(step):  # no collective on other steps
                stop["signal"] = signal.SIGTERM
            val_loss = None
            if step % config.train.eval_every == 0 or step == config.train.num_steps:
                val_loss = eval_loss(state.params, frozen, eval_data, config.train.eval_batches)
                frozen_lm = FrozenLM(model, merge_params(state.params, frozen), tokenizer, config.vision.image_size)
                images, captions = _samples(config, frozen_lm, eval_data)
                evaluation = {"val_loss": val_loss, **_in_loop_metrics(suite, frozen_lm), "samples": captions}
                last_metrics = dict(last_metrics, **evaluation)
                logger.write(step, evaluation)
                grid = workdir / "samples" / f"step_{step}.png"
                if jax.process_index() == 0 and captions:
                    write_caption_grid(grid, images, captions, IMAGE_MEAN, IMAGE_STD)
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation.items()
                                                            if isinstance(v, float))
                               + (f"; sample captions in {grid}" if captions else ""))
            if step % config.train.checkpoint_every == 0 or step == config.train.num_steps or stop["signal"]:
                _check_finite(jax.device_get(metrics), step, checkpointer, workdir)
                start = time.perf_counter()
                checkpointer.save(step, state, rng, _all_data_states(train_data), val_loss)
                logger.write(step, {"checkpoint_save_s": time.perf_counter() - start})  # blocking part
                logger.upload()  # a gs:// workdir's metrics as new as its latest checkpoint
            if stop["signal"] is not None:
                progress.write(f"preempted (SIGTERM): saved step {step} and stopping")
                break
        if step == config.train.num_steps and step > start_step:
            frozen_lm = FrozenLM(model, merge_params(state.params, frozen), tokenizer, config.vision.image_size)
            blank = _in_loop_metrics(suite, frozen_lm.blind())  # every process: params may span them
            if jax.process_index() == 0:
                progress.write(summary(config, workdir, last_metrics, blank, suite, time.perf_counter() - tic))
    finally:
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        logger.close()
        train_data.close()
        eval_data.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return last_metrics


def _all_data_states(pipeline) -> list[dict]:
    """Every process's input-pipeline state (small dicts of ints), gathered so process 0 can save them all."""
    state = pipeline.get_state()
    if jax.process_count() == 1:
        return [state]
    keys = sorted(state)
    gathered = multihost_utils.process_allgather(np.asarray([state[k] for k in keys], np.int64))
    return [dict(zip(keys, map(int, row))) for row in np.asarray(gathered)]


def _global_batch(host_batch, mesh):
    return make_global_batch(host_batch, mesh, data_axis=BATCH_AXES)


def _make_eval(model, trainer):
    @jax.jit
    def nll(params, frozen, batch):
        _, metrics = model.apply({"params": merge_params(params, frozen)}, batch, method=Frozen.loss)
        return metrics["nll_sum"], metrics["num_targets"]

    def evaluate(params, frozen, pipeline, num_batches):
        pipeline.set_state(dict(pipeline.get_state(), position=0, batches=0))  # the same batches every eval
        total, count = 0.0, 0.0
        for _ in range(num_batches):
            batch_nll, batch_count = nll(params, frozen, _global_batch(next(pipeline), trainer.mesh))
            total, count = total + float(batch_nll), count + float(batch_count)
        return total / max(count, 1.0)

    return evaluate


def in_loop_suite(config: ml_collections.ConfigDict) -> Suite | None:
    """The evaluators of `train.eval_tasks` under the `eval` settings, on `train.eval_examples` examples."""
    if not config.train.eval_tasks:
        return None
    settings = ml_collections.ConfigDict(config.eval.to_dict())
    settings.num_examples = config.train.eval_examples
    return Suite(config.train.eval_tasks, settings, config.vision.image_size)


def metric_name(column: str) -> str:
    """A report column as a metric name: "shapes_vqa 1-shot" -> "shapes_vqa/1-shot"."""
    task, _, rest = column.partition(" ")
    return f"{task}/{rest.replace(' ', '_')}" if rest else task


def _in_loop_metrics(suite: Suite | None, frozen_lm: FrozenLM) -> dict:
    """{metric name: accuracy} of every column, and "<task>/examples": the first generated captions of a task."""
    if suite is None:
        return {}
    found = suite.evaluate(frozen_lm)
    metrics = {metric_name(column): score for column, score in found["scores"].items() if score is not None}
    for column, details in found["details"].items():
        if "captions" in details:
            metrics[f"{column.partition(' ')[0]}/examples"] = details["examples"]
    return metrics


def _samples(config, frozen_lm: FrozenLM, eval_data) -> tuple[np.ndarray, list[str]]:
    """The first `train.num_samples` validation images (those of the first processes) and their greedy captions."""
    if not config.train.num_samples:
        return np.zeros((0,)), []
    eval_data.set_state(dict(eval_data.get_state(), position=0, batches=0))
    images = next(eval_data)["images"][:config.train.num_samples, 0]
    if jax.process_count() > 1:  # each process holds its own share of the validation data
        images = np.concatenate(list(multihost_utils.process_allgather(images)))[:config.train.num_samples]
    max_new_tokens = config.data.max_len - frozen_lm.model.num_prefix_tokens
    return images, frozen_lm.generate([[image] for image in images], max_new_tokens=max_new_tokens)


def summary(config, workdir, metrics: dict, blank: dict, suite: Suite | None, seconds: float) -> str:
    """What a finished run learned (its in-loop scores against chance and against its own blank-image
    captions), where its files are, and what to run next."""
    lines = ["", f"Trained {config.train.num_steps} steps ({seconds / 60:.1f} min in this process) in {workdir}."]
    if suite is not None:
        chance = suite.chance()
        lines.append(f"On {config.train.eval_examples} held-out examples per column (chance; with blank images):")
        for column in suite.columns():
            name = metric_name(column.name)
            if name in metrics:
                lines.append(f"  {column.name:<32} {metrics[name]:.3f}  (chance {chance[column.name]:.3f}; "
                             f"blank images {blank[name]:.3f})")
    lines += [f"Files: checkpoints/, metrics.jsonl, tensorboard/, samples/step_{config.train.num_steps}.png "
              "(held-out images and their captions), config.json.",
              "Next:",
              f"  python -m frozenlm_jax.evaluate --workdir={workdir}   # few-shot tables, blind and LM-only rows, plot",
              f"  python -c \"import frozenlm_jax, pathlib; m = frozenlm_jax.load_frozen('{workdir}'); "
              "print(m.generate([[pathlib.Path('image.png'), 'This is']]))\""]
    return "\n".join(lines)
