"""The sharded training step: gradients only w.r.t. trainable params, frozen params a separate argument.

Frozen leaves are passed as their own, non-donated argument and are never differentiated, so no FLOP
goes to LM weight gradients and no activation is `stop_gradient`-ed: the gradient flows through the LM's
activations into the vision encoder. The optimizer (`optax.multi_transform` over every leaf's label)
keeps no state for frozen leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from frozenlm_jax.models.frozen import Frozen, abstract_frozen_params
from frozenlm_jax.parallel import DEFAULT_RULES, batch_sharding, known_cpu_options, logical_shardings
from frozenlm_jax.train.optimizer import make_optimizer, param_labels
from frozenlm_jax.train.state import TrainState
from frozenlm_jax.trees import merge_params, split_params


# XLA:CPU sends dots, convolutions and reductions to YNNPACK by default; its convolutions are slower than
# Eigen's (NF-ResNet-50 at 224 px: 3.23 -> 2.34 s/step,
# `python -m bench.train_step --only="NF-ResNet-50 224px"`), so the step keeps YNNPACK for dots and reductions.
_CPU_STEP_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type",
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"),)


def cpu_step_options() -> dict[str, str]:
    """The XLA options of the step on CPU, or none where this jaxlib does not know them."""
    return known_cpu_options(_CPU_STEP_OPTIONS)


@dataclasses.dataclass
class TrainStep:
    """A compiled, sharded training step and the shardings it was built for."""

    model: Frozen
    mesh: Mesh
    labels: Any
    optimizer: optax.GradientTransformation
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: NamedSharding
    step: Callable  # (state, frozen, batch) -> (state, metrics)

    def shard_batch(self, batch):
        """Place a host batch (global arrays, one process) on the mesh's batch axes."""
        return jax.device_put(batch, self.batch_sharding)


def make_trainer(model: Frozen, mesh: Mesh, *, label_rules, optimizer_kwargs: dict, image_shape,
                 rules=DEFAULT_RULES, max_targets: int | None = None, grad_accum_steps: int = 1,
                 return_frozen_grads: bool = False) -> TrainStep:
    """Build the jitted step for `model` on `mesh`.

    grad_accum_steps: split each batch into this many microbatches, run them one after another and
        apply one update: the same update as the whole batch (the loss is normalised by the batch's total
        number of target tokens), for a global batch that does not fit at once.
    return_frozen_grads: also differentiate w.r.t. the frozen leaves and return those gradients in the
        metrics (only to measure what freezing by argument saves).
    """
    abstract = abstract_frozen_params(model, image_shape)
    labels = param_labels(nn.unbox(abstract), label_rules)
    optimizer = make_optimizer(labels, **optimizer_kwargs)
    param_shardings = logical_shardings(abstract, mesh, rules)
    trainable_shardings, frozen_shardings = split_params(param_shardings, labels)
    opt_shardings = logical_shardings(jax.eval_shape(optimizer.init, abstract), mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = TrainState(step=replicated, params=trainable_shardings, opt_state=opt_shardings)
    argnums = (0, 1) if return_frozen_grads else 0

    def nll_sum(trainable, frozen, batch):
        # A training pass: batch-normalised encoders normalise by the batch and return their updated running
        # statistics in the `batch_stats` collection (models/convnet.py); other encoders return nothing there.
        (_, metrics), updated = model.apply({"params": merge_params(trainable, frozen)}, batch,
                                            max_targets=max_targets, method=Frozen.loss, mutable=["batch_stats"])
        return metrics["nll_sum"], (metrics, updated.get("batch_stats", {}))

    def summed_grads(params, frozen, batch):
        """Gradients of the summed NLL, the summed metrics and the summed running statistics, over
        `grad_accum_steps` microbatches."""
        grad_fn = jax.grad(nll_sum, argnums=argnums, has_aux=True)
        if grad_accum_steps == 1:
            return grad_fn(params, frozen, batch)
        # (B, ...) -> (A, B/A, ...) with rows i*A + a in microbatch a: a local reshape, no communication.
        micro = jax.tree.map(lambda x: jnp.moveaxis(x.reshape((-1, grad_accum_steps) + x.shape[1:]), 1, 0), batch)

        def accumulate(carry, microbatch):
            grads, metrics = grad_fn(params, frozen, microbatch)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, frozen,
                                                             jax.tree.map(lambda x: x[0], micro)))
        return jax.lax.scan(accumulate, zeros, micro)[0]

    def train_step(state: TrainState, frozen, batch):
        grads, (metrics, running_stats) = summed_grads(state.params, frozen, batch)
        # Each microbatch moved the same running statistics towards its own batch's: average the moves.
        running_stats = jax.tree.map(lambda s: s / grad_accum_steps, running_stats)
        count = jnp.maximum(metrics["num_targets"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        metrics = dict(metrics, loss=metrics["nll_sum"] / count)
        if return_frozen_grads:
            grads, frozen_grads = grads
            metrics = dict(metrics, frozen_grads=frozen_grads)
        # The optimizer sees every leaf; frozen ones get zeros that set_to_zero discards (compiled away).
        full_grads = merge_params(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = optimizer.update(full_grads, state.opt_state, merge_params(state.params, frozen))
        updates, _ = split_params(updates, labels)
        # Running statistics get no gradient (a zero update): they become what the training pass computed.
        params = merge_params(optax.apply_updates(state.params, updates), running_stats)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    on_cpu = mesh.devices.flat[0].platform == "cpu"
    step = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=cpu_step_options() if on_cpu else None)
    return TrainStep(model, mesh, labels, optimizer, state_shardings, frozen_shardings,
                   batch_sharding(mesh, rules), step)
