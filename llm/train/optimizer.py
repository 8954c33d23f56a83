"""The optimizer: AdamW or Muon (optax), learning-rate schedules, clipping, decay on matrices only.

Masks come from a tree of logical axes (`model.param_axes(cfg)`, or any tree a
stage trains, such as a backbone with a reward head), never from the model.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from optax import contrib


def learning_rate_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine decay or warmup-stable-decay (WSD), down to min_learning_rate_ratio.

    Update c (counted from 0) warms up at `lr * (c + 1) / warmup_steps`, as nanoGPT and
    llm.c do: the first update already moves the weights (a warmup from 0 would waste
    it), and update `warmup_steps - 1` reaches the peak.
    """
    peak, floor = opt.learning_rate, opt.learning_rate * opt.min_learning_rate_ratio
    warmup = optax.linear_schedule(peak / max(opt.warmup_steps, 1), peak, max(opt.warmup_steps - 1, 0))
    remaining = max(opt.total_steps - opt.warmup_steps, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, remaining, alpha=opt.min_learning_rate_ratio)
        return optax.join_schedules([warmup, decay], [opt.warmup_steps])
    if opt.schedule == "wsd":
        decay_steps = max(int(remaining * opt.decay_fraction), 1)
        stable = optax.constant_schedule(peak)
        decay = optax.linear_schedule(peak, floor, decay_steps)
        return optax.join_schedules([warmup, stable, decay], [opt.warmup_steps, opt.total_steps - decay_steps])
    raise ValueError(f"optimizer.schedule must be 'cosine' or 'wsd', got {opt.schedule!r}")


def _is_matrix(axes: tuple) -> bool:
    """A weight that maps to or from the model width; per-head biases ([heads, head_dim]) are not."""
    return len([a for a in axes if a != "layers"]) >= 2 and "embed" in axes


def weight_decay_mask(axes: Any):
    """True for matrices (embeddings and head included); False for norms and biases."""
    return _map_axes(axes, _is_matrix)


def muon_dimensions(axes: Any):
    """Which axes Muon orthogonalises for each block matrix; None (AdamW) for embeddings, head and vectors.

    A block matrix is stored input-major after the `layers` axis: `q [L, D, N, H]` maps
    D to (N, H), `o [L, N, H, D]` maps (N, H) to D. Embeddings and the output head
    stay on AdamW, as in the Muon write-up (Jordan et al., 2024).
    """

    def dims(axes):
        if axes[0] != "layers" or not _is_matrix(axes):
            return None
        if axes[1] == "embed":  # input is the model width: q, k, v, fc, gate, up
            return contrib.MuonDimensionNumbers(reduction_axis=(1,), output_axis=tuple(range(2, len(axes))))
        return contrib.MuonDimensionNumbers(reduction_axis=tuple(range(1, len(axes) - 1)), output_axis=(len(axes) - 1,))

    return _map_axes(axes, dims)


def _map_axes(axes: Any, fn):
    return jax.tree.map(fn, axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(opt: ml_collections.ConfigDict, axes: Any) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW or Muon, with the configured schedule, for params with `axes`.

    `axes` is the trainable tree's logical axes: frozen subtrees are left out of it
    (`step.split_frozen`), so they get no optimizer state and no share of the clip norm.
    """
    schedule = learning_rate_schedule(opt)
    mask = weight_decay_mask(axes)
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)
    elif opt.name == "muon":
        core = contrib.muon(
            schedule, weight_decay=opt.weight_decay, weight_decay_mask=mask, adam_b1=opt.b1, adam_b2=opt.b2,
            adam_weight_decay=opt.weight_decay, muon_weight_dimension_numbers=muon_dimensions(axes),
        )
    else:
        raise ValueError(f"optimizer.name must be 'adamw' or 'muon', got {opt.name!r}")
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), core) if opt.grad_clip else core
