"""The pretraining step: a pure `(params, opt_state, batch, rng) -> (params, opt_state, metrics)`.

Batches carry a leading micro-batch axis, `inputs_AxBxT`, and the step scans over it
accumulating *summed* losses and gradients; it divides by the total token count
once at the end, so accumulation (and the mean over devices, which XLA inserts as
a sum) is exact in tokens however the targets are masked.

Shape legend: A micro-batches per step, B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm import model, sharding
from llm.config import ModelConfig

Batch = Mapping[str, jax.Array]


def lm_loss(cfg: ModelConfig, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
    """(summed next-token cross-entropy, number of target tokens, aux) of one micro-batch.

    `batch`: `inputs_BxT`, `targets_BxT`, and optionally `loss_mask_BxT` (SFT trains on
    assistant tokens only), `positions_BxT` and `segment_ids_BxT` (packed documents).
    """
    logits_BxTxV, _ = model.forward(
        cfg, params, batch["inputs"], positions_BxT=batch.get("positions"), segment_ids_BxT=batch.get("segment_ids")
    )
    nll_BxT = optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
    weights_BxT = batch.get("loss_mask", jnp.ones_like(nll_BxT)).astype(jnp.float32)
    return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT), {}


def train_step(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, params: Any, opt_state: Any, batch: Batch, rng: jax.Array
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer step over `A` accumulated micro-batches (`batch` leaves are `[A, B, T]`)."""
    del rng  # no dropout; kept so every step (SFT, GRPO, reward model) has one signature
    grad_fn = jax.grad(lambda p, mb: _with_aux(lm_loss(cfg, p, mb)), has_aux=True)

    def accumulate(carry, microbatch):
        grads_sum, loss_sum, count = carry
        grads, (loss, tokens) = grad_fn(params, microbatch)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, count + tokens), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads_sum, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), batch)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads_sum)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # Checked by the loop before it checkpoints: a finite loss alone does not prove this update was.
    params_finite = jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))
    metrics = {"loss": loss_sum / denominator, "tokens": count, "grad_norm": optax.tree.norm(grads),
               "params_finite": params_finite.astype(jnp.float32)}
    return params, opt_state, metrics


def _with_aux(loss_count_aux):
    """Summed loss as the differentiated value; (loss, count) ride along as aux."""
    loss, count, _ = loss_count_aux
    return loss, (loss, count)


# ----------------------------------------------------------------------------- sharded state and jit


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules) -> tuple[Any, Any]:
    """(param shardings, optimizer-state shardings): moments follow their parameter, counters replicate."""
    abstract_params = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    param_sh = sharding.param_shardings(model.param_axes(cfg), abstract_params, mesh, rules)
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    return param_sh, _follow_params(abstract_state, abstract_params, param_sh, NamedSharding(mesh, PartitionSpec()))


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


def init_train_state(cfg: ModelConfig, optimizer, mesh: Mesh, rules, rng: jax.Array) -> tuple[Any, Any]:
    """Params and optimizer state created sharded, under jit, never whole on one device."""
    param_sh, opt_sh = state_shardings(cfg, optimizer, mesh, rules)

    def init(key):
        params = model.init_params(cfg, key)
        return params, optimizer.init(params)

    return jax.jit(init, out_shardings=(param_sh, opt_sh))(rng)


def jit_train_step(cfg: ModelConfig, optimizer, mesh: Mesh, rules):
    """`train_step` compiled with explicit shardings; params and optimizer state are donated."""
    param_sh, opt_sh = state_shardings(cfg, optimizer, mesh, rules)
    # [A, B, T]: micro-batches stay whole on every device, each micro-batch is split by `batch`.
    batch_sh = NamedSharding(mesh, sharding.logical_to_spec((None, "batch", None), rules))
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(params, opt_state, batch, rng):
        with sharding.use_rules(mesh, rules):
            return train_step(cfg, optimizer, params, opt_state, batch, rng)

    return jax.jit(
        step,
        in_shardings=(param_sh, opt_sh, batch_sh, replicated),
        out_shardings=(param_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
    )
