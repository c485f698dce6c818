"""Orbax checkpoints of a run: the trainable state (params, optimizer state, step), the RNG and the input
pipeline's state; the N latest plus the best by validation loss. Frozen params are not copied into every
checkpoint: their source and fingerprint are recorded and verified on restore.

Each saved step also records the size and SHA-256 of its files (`checksums.process_<i>.json`: each process over
the files it wrote), and a restore verifies them first: a damaged step is a `CheckpointDamaged` error naming the
step and the file, never a silently wrong state.
"""

from __future__ import annotations

import hashlib
import json
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from frozenlm_jax import paths


CHECKSUMS = "checksums.process_{}.json"


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit this run (another LM, other shapes)."""


class CheckpointDamaged(OSError):
    """A checkpoint's files differ from the checksums recorded when it was saved."""


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _written_by(relative: str, process: int) -> bool:
    """Whether `process` wrote the file at `relative` (within a step): OCDBT data under `ocdbt.process_<i>/` is its
    writer's; the shared files (metadata, manifests, JSON items) are process 0's."""
    owners = [part for part in relative.split("/") if part.startswith("ocdbt.process_")]
    return owners == [f"ocdbt.process_{process}"] if owners else process == 0


def fingerprint(frozen_params, source: str) -> str:
    """A short hash of the frozen params' source, shapes and a few of their values."""
    digest = hashlib.sha256(source.encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen_params)[0]:
        digest.update(jax.tree_util.keystr(path).encode() + str(leaf.shape).encode())
        sample = np.asarray(jax.device_get(leaf.reshape(-1)[:16]), np.float32)
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


class Checkpointer:
    """Saves and restores a run's checkpoints under `directory`."""

    def __init__(self, directory, keep: int, frozen_source: str, frozen_fingerprint: str | None,
                 create: bool = True):
        """directory: local or gs:// (`paths.path`). create=False: only read what is there (e.g. to load a trained
        model)."""
        directory = paths.path(directory)
        paths.preflight(directory)
        self.frozen = {"source": frozen_source, "fingerprint": frozen_fingerprint}
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        self.manager = ocp.CheckpointManager(
            directory if paths.is_remote(directory) else directory.absolute(),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            # best_fn makes orbax write each step's metrics to disk, so a resumed run (and `best_step`)
            # still knows which kept checkpoint is best; retention follows `policy` alone.
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=create,
                                                 best_fn=lambda m: m["val_loss"], best_mode="min"))

        self._unrecorded: int | None = None  # a saved step whose checksums are not written yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return paths.path(self.manager.directory) / str(step)

    def _record_checksums(self) -> None:
        """Once the last save is on disk, write the checksums of this process's files of that step."""
        if self._unrecorded is None:
            return
        self.manager.wait_until_finished()
        directory, process = self.step_dir(self._unrecorded), jax.process_index()
        self._unrecorded = None
        paths.refresh(directory)  # tensorstore wrote the step's arrays, not gcsfs
        if not directory.is_dir():  # removed by the retention policy
            return
        files = {}
        for path in paths.files_under(directory):
            relative = path.relative_to(directory).as_posix()
            if not path.name.startswith("checksums.") and _written_by(relative, process):
                files[relative] = {"bytes": path.stat().length, "sha256": _sha256(path)}
        write_json(directory / CHECKSUMS.format(process), files)

    def verify(self, step: int) -> bool:
        """Check `step`'s files against their recorded checksums: True if they match, False if the step has none
        (saved by an older version); raises CheckpointDamaged naming the step and the first bad file."""
        directory = self.step_dir(step)
        paths.refresh(directory)
        records = sorted(directory.glob(CHECKSUMS.format("*")))
        for record in records:
            for relative, expected in json.loads(record.read_text()).items():
                path = directory / relative
                problem = None
                if not path.is_file():
                    problem = "is missing"
                elif path.stat().length != expected["bytes"]:
                    problem = f"has {path.stat().length} bytes, {expected['bytes']} were saved"
                elif _sha256(path) != expected["sha256"]:
                    problem = "has other contents than were saved (its SHA-256 differs)"
                if problem:
                    raise CheckpointDamaged(f"checkpoint step {step} is damaged: {path} {problem}")
        return bool(records)

    def newest_intact_step(self, before: int | None = None, verified_only: bool = False) -> int | None:
        """The newest kept step (older than `before`, if given) whose files verify, or that has no checksums
        (unless `verified_only`)."""
        for step in sorted(self.all_steps(), reverse=True):
            if before is not None and step >= before:
                continue
            try:
                if self.verify(step) or not verified_only:
                    return step
            except CheckpointDamaged:
                continue
        return None

    def best_step(self) -> int | None:
        """The kept step with the lowest validation loss (None if no kept checkpoint has one)."""
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, rng, data_states: list[dict], val_loss: float | None = None) -> None:
        """Save (asynchronously); `data_states` holds every process's input-pipeline state, by process index."""
        self._record_checksums()
        meta = {"step": int(step), "data_states": data_states, "frozen": self.frozen,
                "rng": np.asarray(jax.random.key_data(rng)).tolist()}
        tree = {"state": state}
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
            metrics=None if val_loss is None else {"val_loss": float(val_loss)})
        self._unrecorded = int(step)

    def restore(self, state_like, rng_like, shardings, step: int | None = None):
        """(state, rng, data_states) of `step` (default: latest), placed on `shardings`.

        Raises CheckpointMismatch naming the parameter whose shape differs, or the LM that differs.
        """
        step = self.manager.latest_step() if step is None else step
        self.verify(step)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta["frozen"] != self.frozen:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.manager.directory} was trained with the frozen LM "
                f"{meta['frozen']}, but this run has {self.frozen}; use the same LM or a new workdir")
        saved = self.manager.item_metadata(step)["state"]
        target = {"state": state_like}
        _check_shapes(saved, target, step)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target,
                                {"state": shardings})
        tree = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32), impl=jax.random.key_impl(rng_like))
        return tree["state"], rng, meta["data_states"]

    def restore_params(self, step: int):
        """(trainable params, the frozen LM's {source, fingerprint}) of `step`, on the default device: the state's
        params alone, read against the checkpoint's own metadata (no optimizer or model needed)."""
        self.verify(step)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved)
        tree = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return tree["state"]["state"]["params"], meta["frozen"]

    def wait(self) -> None:
        """Block until the last save is on disk, with its checksums."""
        self.manager.wait_until_finished()
        self._record_checksums()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _path_names(path) -> str:
    """'state/params/vision/...': a tree path independent of container types (dict, dataclass, tuple)."""
    names = []
    for key in path:
        names.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return "/".join(names)


def _check_shapes(saved, target, step):
    saved_flat = {_path_names(p): tuple(getattr(x, "shape", ()))
                  for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = _path_names(path)
        if name not in saved_flat:
            raise CheckpointMismatch(f"checkpoint step {step} has no {name}; it was saved by another model")
        if saved_flat[name] != tuple(leaf.shape):
            raise CheckpointMismatch(
                f"parameter {name} has shape {saved_flat[name]} in checkpoint step {step} but {tuple(leaf.shape)} "
                "in this run: the model changed; use a new workdir")


def write_json(path, payload) -> None:
    """Write JSON atomically (process 0's logs and configs): locally through a renamed temporary file; a GCS
    object is replaced whole by one write."""
    path = paths.path(path)
    if paths.is_remote(path):
        path.write_text(json.dumps(payload, indent=1, default=str))
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
