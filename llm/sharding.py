"""Device mesh, logical-axis rules, sharded initialisation and batch placement.

Arrays name their axes logically (`("embed", "heads", "head_dim")`); a rule set
(`config.sharding`, a mapping logical axis -> mesh axes) turns those names into
`PartitionSpec`s on the mesh `("data", "fsdp", "tensor")`. The same code runs on
one CPU, 8 fake CPU devices, a GPU host or a pod slice: only the mesh changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm.config import LOGICAL_AXES, MESH_AXES

Rules = Mapping[str, Sequence[str]]
LogicalAxes = tuple[str | None, ...]


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over all devices; one axis given as -1 takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    shape = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(size == 0 or size < -1 for size in shape):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(size for size in shape if size != -1)
    if -1 in shape:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))} cannot fill {len(devices)} devices: "
                f"{len(devices)} is not divisible by {fixed}"
            )
        shape[shape.index(-1)] = len(devices) // fixed
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but {len(devices)} are "
            f"available; make the sizes multiply to {len(devices)} or set one axis to -1"
        )
    device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES)


def check_rules(rules: Rules) -> None:
    """Rejects rules that name unknown logical or mesh axes."""
    for logical, mesh_axes in rules.items():
        if logical not in LOGICAL_AXES:
            raise ValueError(f"sharding rule for unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
        bad = [axis for axis in mesh_axes if axis not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {logical!r} -> {tuple(mesh_axes)} names unknown mesh axes {bad}")


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> PartitionSpec:
    """The `PartitionSpec` for one array's logical axes; a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = tuple(axis for axis in (rules.get(name, ()) if name else ()) if axis not in used)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_axes(leaf: Any) -> bool:
    return isinstance(leaf, tuple) and all(a is None or isinstance(a, str) for a in leaf)


def param_specs(axes_tree: Any, rules: Rules) -> Any:
    """A pytree of `PartitionSpec`s matching a pytree of logical-axes tuples."""
    return jax.tree.map(lambda axes: logical_to_spec(axes, rules), axes_tree, is_leaf=_is_axes)


def param_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """`NamedSharding`s for parameters, checking each sharded dimension divides evenly."""
    check_rules(rules)
    specs = param_specs(axes_tree, rules)

    def to_sharding(path, spec, shape):
        for dim, (size, entry) in enumerate(zip(shape.shape, spec)):
            parts = _spec_entry_size(entry, mesh)
            if size % parts:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} of shape {shape.shape}: dimension {dim} "
                    f"(size {size}) cannot be split {parts} ways over mesh axes {entry}; change the "
                    f"sharding rules or the mesh, or pad the dimension (e.g. vocab_size=50304)"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        to_sharding, specs, shapes_tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def _spec_entry_size(entry: Any, mesh: Mesh) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[name] for name in names)


def init_sharded(init_fn: Callable[..., Any], axes_tree: Any, mesh: Mesh, rules: Rules, *args: Any) -> Any:
    """Runs `init_fn(*args)` under jit so each device creates only its own shards."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(axes_tree, shapes, mesh, rules)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


# Activation constraints. The model calls `constrain(x, axes)` at a few places
# (block inputs, attention heads, MLP hidden). Inside `use_rules` they become
# `with_sharding_constraint`s; outside it (single-device use) there is nothing to constrain.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("llm_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Makes `constrain` place activations on `mesh` by `rules` while tracing inside the block."""
    check_rules(rules)
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Constrains an activation's sharding; a dimension the mesh cannot split evenly stays whole."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules)
    # Activations, unlike parameters, may legitimately be too small to split (a decode
    # batch of 1 on 8 devices), so such dimensions are replicated rather than rejected.
    fitted = [entry if size % _spec_entry_size(entry, mesh) == 0 else None for size, entry in zip(x.shape, spec)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fitted)))


def gather_to_host(tree: Any) -> Any:
    """Every array whole, as numpy, on every process (a collective: all processes must call it).

    For what leaves the mesh (a release, the sampler's copy): parameters sharded
    across processes have no process that holds them whole.
    """
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def place_host(host_tree: Any, shardings: Any) -> Any:
    """Host (numpy) arrays as sharded global arrays: each process places only its own devices' shards."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                        host_tree, shardings)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, seq, ...]` input array: batch split, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(local_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Builds global arrays from this process's slice of the batch (multi-host safe)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(x)), x),
        local_batch,
    )
