"""The sampling math: logits -> the next token, on device, for every row of a batch at once.

    next_B = sample_tokens(key, logits_BxV, temperature=0.8, top_k=50, top_p=0.95)

Pure functions of the logits and the controls (repetition penalty, temperature,
top-k, top-p), in `transformers`' order and rules, so the engine's jitted step
and any test can call them alike. The controls are traced values except top-k's
k, a compile-time constant.

Shape legend: B rows, V vocabulary, K candidates (top-k's k, else V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _candidates(
    logits_BxV: jax.Array,
    *,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float = 1.0,
    repetition_penalty: jax.Array | float = 1.0,
    seen_BxV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The tokens that may be sampled, most likely first, and their processed logits (-inf if cut): two [B, K] arrays.

    Order and rules follow `transformers`: repetition penalty (CTRL, Keskar et al.
    2019: a seen token's logit is divided by the penalty if positive, multiplied if
    negative), then temperature, then top-k, then top-p, which keeps the smallest
    set of most likely tokens whose probability reaches `top_p` (tokens tied with
    the last one kept are kept too; top-k keeps exactly k). Temperature 0 leaves the
    logits for argmax. `top_k` is a Python int (a compile-time constant) so that
    top-k picks the K candidates without sorting the vocabulary; everything
    after it, top-p and the draw itself, works on K values instead of V.
    """
    x_BxV = logits_BxV.astype(jnp.float32)
    if seen_BxV is not None:
        penalised = jnp.where(x_BxV > 0, x_BxV / repetition_penalty, x_BxV * repetition_penalty)
        x_BxV = jnp.where(seen_BxV, penalised, x_BxV)
    divisor = jnp.where(temperature > 0, temperature, 1.0)  # greedy (0) keeps the logits
    if top_k:
        # Dividing by a positive temperature keeps the order, so it is applied to the K picked, not to all V.
        x_BxK, ids_BxK = top_k_by_blocks(x_BxV, min(top_k, x_BxV.shape[-1]))
        x_BxK = x_BxK / divisor
    else:  # every token is a candidate; sort them only if top-p needs the order

        def by_probability(x):
            ids = jnp.argsort(-x, axis=-1).astype(jnp.int32)
            return jnp.take_along_axis(x, ids, axis=-1), ids

        def as_is(x):
            return x, jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)

        x_BxK, ids_BxK = jax.lax.cond(top_p < 1.0, by_probability, as_is, x_BxV / divisor)
    probs_BxK = jax.nn.softmax(x_BxK, axis=-1)
    mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    n_keep_B = jnp.maximum(jnp.sum(mass_before_BxK < top_p, axis=-1), 1)
    threshold_Bx1 = jnp.take_along_axis(x_BxK, n_keep_B[:, None] - 1, axis=-1)
    return jnp.where((top_p < 1.0) & (x_BxK < threshold_Bx1), -jnp.inf, x_BxK), ids_BxK


def top_k_by_blocks(x_BxV: jax.Array, k: int, block: int = 32) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` over the last axis, exactly, in two small passes instead of one over V.

    Each block of `block` logits is summarised by its maximum; the k blocks with the
    largest maxima hold the k largest logits (a logit outside them is at most its own
    block's maximum, and each chosen block has a larger one, so k logits beat it), so
    a second top_k runs over those k * block candidates. XLA:CPU's top_k works through
    rows one after another, so two small passes beat one over the vocabulary; 32 is the
    fastest block size measured (bench/top_k.py). Ties at the k-th value
    may keep a different one of the tied tokens than `lax.top_k`.
    """
    B, V = x_BxV.shape
    n_blocks = -(-V // block)
    if n_blocks <= k:  # small vocabularies: nothing to skip
        return jax.lax.top_k(x_BxV, k)
    if n_blocks * block != V:
        x_BxV = jnp.pad(x_BxV, ((0, 0), (0, n_blocks * block - V)), constant_values=-jnp.inf)
    x_BxNxC = x_BxV.reshape(B, n_blocks, block)
    _, blocks_BxK = jax.lax.top_k(x_BxNxC.max(axis=-1), k)
    candidates_BxKxC = jnp.take_along_axis(x_BxNxC, blocks_BxK[:, :, None], axis=1)
    x_BxK, at_BxK = jax.lax.top_k(candidates_BxKxC.reshape(B, k * block), k)
    ids_BxK = jnp.take_along_axis(blocks_BxK, at_BxK // block, axis=1) * block + at_BxK % block
    return x_BxK, ids_BxK


def process_logits(logits_BxV: jax.Array, **controls) -> jax.Array:
    """The logits actually sampled from, over the whole vocabulary: -inf wherever a control cut a token."""
    x_BxK, ids_BxK = _candidates(logits_BxV, **controls)
    B = logits_BxV.shape[0]
    return jnp.full(logits_BxV.shape, -jnp.inf).at[jnp.arange(B)[:, None], ids_BxK].set(x_BxK)


def sample_tokens(key: jax.Array, logits_BxV: jax.Array, temperature: jax.Array | float = 1.0, **controls) -> jax.Array:
    """One token per row: argmax at temperature 0, else a draw from the candidates' processed logits."""
    x_BxK, ids_BxK = _candidates(logits_BxV, temperature=temperature, **controls)
    choice_B = jnp.where(temperature > 0, jax.random.categorical(key, x_BxK, axis=-1), jnp.argmax(x_BxK, axis=-1))
    return jnp.take_along_axis(ids_BxK, choice_B[:, None], axis=-1)[:, 0]

