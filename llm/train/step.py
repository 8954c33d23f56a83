"""One training step for every stage: `train_step(loss_fn, optimizer, params, opt_state, batch, rng)`.

Batches carry a leading micro-batch axis (`inputs_AxBxT`, `chosen_AxBxT`, ...:
whatever the stage's loss reads) and the step scans over it, adding each
micro-batch's *summed* loss, normalizer, aux sums and gradients; it divides by
the total normalizer once at the end, so accumulation (and the mean over devices,
which XLA inserts as a sum) is exact in what the normalizer counts. Micro-batch i
gets the key `fold_in(rng, i)`.

The state may be any tree of parameters with a matching tree of logical axes
(`{"backbone": model params, "head": ...}` for a reward model). Subtrees named in
`frozen` ("backbone", or a path like "backbone/embed") are not differentiated, keep
no optimizer state and come out of the step bit-identical; the optimizer sees the
trainable rest only (`split_frozen`).

Shape legend: A micro-batches per step, B batch, T sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm import sharding

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, jax.Array, dict]]


# ----------------------------------------------------------------------------- frozen subtrees


def split_frozen(tree: Any, frozen: Sequence[str]) -> tuple[Any, Any]:
    """(trainable, frozen) halves of a nested-dict tree; `frozen` names subtrees by "/"-separated paths."""
    trainable, fixed = tree, {}
    for path in frozen:
        trainable, part = _pop(trainable, path.split("/"), path)
        fixed = merge_frozen(fixed, part)
    return trainable, fixed


def _pop(tree: Any, keys: list[str], path: str) -> tuple[dict, dict]:
    """(tree without the subtree at `keys`, that subtree under its keys)."""
    if not isinstance(tree, Mapping) or keys[0] not in tree:
        where = f"keys there: {sorted(tree)}" if isinstance(tree, Mapping) else "not a dict there"
        raise ValueError(f"frozen path {path!r}: no {keys[0]!r} in the tree ({where})")
    rest = dict(tree)
    if len(keys) == 1:
        return rest, {keys[0]: rest.pop(keys[0])}
    rest[keys[0]], part = _pop(tree[keys[0]], keys[1:], path)
    return rest, {keys[0]: part}


def merge_frozen(trainable: Any, fixed: Any) -> Any:
    """The whole tree again from `split_frozen`'s halves."""
    out = dict(trainable)
    for key, value in fixed.items():
        out[key] = merge_frozen(out[key], value) if key in out else value
    return out


# ----------------------------------------------------------------------------- the step


def train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Batch,
    rng: jax.Array,
    *,
    frozen: Sequence[str] = (),
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer step over the `A` micro-batches of `batch` (every leaf leads with A).

    Metrics: `loss` (summed loss / normalizer), `normalizer` (its total), `grad_norm`,
    each aux entry summed over micro-batches, and `params_finite`, which the driver
    checks before it checkpoints: a finite loss alone does not prove the update was.
    """
    trainable, fixed = split_frozen(params, frozen)

    def summed_loss(trainable, microbatch, key):
        loss, normalizer, aux = loss_fn(merge_frozen(trainable, fixed), microbatch, key)
        return loss, (loss, normalizer, aux)

    grad_fn = jax.grad(summed_loss, has_aux=True)
    n_micro = jax.tree.leaves(batch)[0].shape[0]

    def accumulate(carry, indexed):
        index, microbatch = indexed
        grads, sums = grad_fn(trainable, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype),
        jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], batch), rng),
    )
    (grads_sum, (loss_sum, normalizer, aux_sums)), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(n_micro), batch)
    )
    # Nothing to learn from anywhere in the batch: loss 0 and gradient 0, not 0 / 0.
    denominator = jnp.where(normalizer > 0, normalizer, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads_sum)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params_finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(trainable)]))
    metrics = {"loss": loss_sum / denominator, "normalizer": normalizer, "grad_norm": optax.tree.norm(grads),
               "params_finite": params_finite.astype(jnp.float32), **aux_sums}
    return merge_frozen(trainable, fixed), opt_state, metrics


# ----------------------------------------------------------------------------- sharded state and jit


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a stage's training state lives: shapes and shardings of its params, optimizer state and batches.

    Built from the tree of logical axes and abstract params, never from the model,
    so any tree (a backbone and a head, a frozen part) shards the same way.
    """

    mesh: Mesh
    rules: Mapping[str, Sequence[str]]
    frozen: tuple[str, ...]
    abstract_params: Any
    abstract_opt_state: Any
    param_shardings: Any
    opt_shardings: Any

    @classmethod
    def create(cls, axes: Any, abstract_params: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
               rules: Mapping[str, Sequence[str]], frozen: Sequence[str] = ()) -> "StateLayout":
        param_sh = sharding.param_shardings(axes, abstract_params, mesh, rules)
        trainable, _ = split_frozen(abstract_params, frozen)
        trainable_sh, _ = split_frozen(param_sh, frozen)
        abstract_state = jax.eval_shape(optimizer.init, trainable)
        opt_sh = _follow_params(abstract_state, trainable, trainable_sh, NamedSharding(mesh, PartitionSpec()))
        return cls(mesh, dict(rules), tuple(frozen), abstract_params, abstract_state, param_sh, opt_sh)

    @property
    def batch_sharding(self) -> NamedSharding:
        """[A, B, ...] batch leaves: micro-batches whole on every device, each split along `batch`."""
        return NamedSharding(self.mesh, sharding.logical_to_spec((None, "batch"), self.rules))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def abstract(self) -> tuple[Any, Any]:
        """(params, optimizer state) as sharded `ShapeDtypeStruct`s: what a checkpoint restores into."""
        def with_sharding(x, s):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        return (jax.tree.map(with_sharding, self.abstract_params, self.param_shardings),
                jax.tree.map(with_sharding, self.abstract_opt_state, self.opt_shardings))


def _follow_params(abstract_state, abstract_params, param_sh, replicated):
    """Shards each optimizer-state leaf like the parameter whose path ends its own and whose shape it has.

    Matching by path suffix works for any optax chain (AdamW's `mu`/`nu`, Muon's
    partitioned states) without knowing its state classes.
    """
    def dict_keys(path):
        return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))

    by_keys = {
        dict_keys(path): (leaf.shape, sh)
        for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_sh))
    }

    def pick(path, leaf):
        keys = dict_keys(path)
        for start in range(len(keys)):
            shape, sh = by_keys.get(keys[start:], (None, None))
            if shape == getattr(leaf, "shape", ()):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def init_train_state(init_fn: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                     layout: StateLayout, rng: jax.Array) -> tuple[Any, Any]:
    """Params (`init_fn(rng)`) and optimizer state created sharded, under jit, never whole on one device."""
    def init(key):
        params = init_fn(key)
        return params, optimizer.init(split_frozen(params, layout.frozen)[0])

    return jax.jit(init, out_shardings=(layout.param_shardings, layout.opt_shardings))(rng)


def place_params(host_params: Any, layout: StateLayout) -> Any:
    """Host (numpy) params as sharded global arrays: each process places only its own devices' shards."""
    return sharding.place_host(host_params, layout.param_shardings)


def init_opt_state(optimizer: optax.GradientTransformation, params: Any, layout: StateLayout) -> Any:
    """A fresh optimizer state for (already placed) params, e.g. a stage started from released weights."""
    return jax.jit(lambda p: optimizer.init(split_frozen(p, layout.frozen)[0]),
                   out_shardings=layout.opt_shardings)(params)


def jit_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, layout: StateLayout):
    """`train_step` compiled with explicit shardings; params and optimizer state are donated."""
    def step(params, opt_state, batch, rng):
        with sharding.use_rules(layout.mesh, layout.rules):
            return train_step(loss_fn, optimizer, params, opt_state, batch, rng, frozen=layout.frozen)

    return jax.jit(
        step,
        in_shardings=(layout.param_shardings, layout.opt_shardings, layout.batch_sharding, layout.replicated),
        out_shardings=(layout.param_shardings, layout.opt_shardings, layout.replicated),
        donate_argnums=(0, 1),
    )
