"""Device meshes, logical-axis rules and the shardings derived from them; XLA:CPU compile options.

Parameters carry logical axis names (`nn.with_logical_partitioning`); rules map those names to the mesh
axes `data`, `fsdp` and `tensor`. A dimension a mesh axis does not divide is replicated instead, so any
model fits any mesh without the user noticing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters shard over `fsdp` (their embed dim) and `tensor` (heads, mlp,
# vocab); activations shard their batch over `data` and `fsdp`.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("positions", None),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size may be -1 (all remaining devices).

    `shape` is a dict such as {"data": 2, "fsdp": 4} (missing axes are 1) or a 3-sequence.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {sizes} must have one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one size may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {len(devices)} are "
            "available; use -1 for one axis to take the rest")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicate every dimension that its mesh axes do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of boxed (logically partitioned) values or ShapeDtypeStructs.

    Typically `abstract_tree = jax.eval_shape(model.init, ...)`; leaves without logical names are
    replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, tuple(leaf.shape), mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """The sharding of batch arrays: leading (batch) dimension over the axes of `activation_batch`."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("activation_batch",), rules))


@functools.cache
def known_cpu_options(options: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """`dict(options)`, XLA:CPU compile options, or none where this jaxlib does not know one of them."""
    try:
        x = jax.device_put(jax.numpy.zeros(1), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda x: x + 1).lower(x).compile(dict(options))
    except jax.errors.JaxRuntimeError:
        return {}
    return dict(options)


def to_host(x) -> np.ndarray:
    """A jax.Array as NumPy on this process, gathered from the other processes when it spans several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
