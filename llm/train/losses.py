"""Pure losses over one micro-batch: `loss_fn(params, microbatch, rng) -> (summed_loss, normalizer, aux)`.

The step (`llm/train/step.py`) adds the summed losses, normalizers and aux sums of
every micro-batch and divides once at the end, so gradient accumulation and the
mean over devices are exact in whatever the normalizer counts (target tokens here;
pairs or sequences in later stages). A loss therefore never averages itself, and
a micro-batch with nothing to learn from (an all-zero mask) contributes 0 to both
sums: loss 0, gradient 0, never NaN.

A stage binds the model config: `functools.partial(lm_loss, cfg)` is a `loss_fn`.

Shape legend: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from llm import model
from llm.config import ModelConfig

Batch = Mapping[str, jax.Array]
LossOutput = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


def token_logprobs(cfg: ModelConfig, params: Any, batch: Batch) -> jax.Array:
    """Float32 log-probability of each `targets_BxT` token given `inputs_BxT` and what precedes it.

    `batch` may carry `positions` and `segment_ids` (packed documents). SFT, GRPO,
    DPO and the evals all read the model through this one function.
    """
    logits_BxTxV, _ = model.forward(
        cfg, params, batch["inputs"], positions_BxT=batch.get("positions"), segment_ids_BxT=batch.get("segment_ids")
    )
    return -optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])


def lm_loss(cfg: ModelConfig, params: Any, batch: Batch, rng: jax.Array | None = None) -> LossOutput:
    """(summed next-token cross-entropy over the masked targets, their count, {}).

    `loss_mask_BxT` (optional, default all ones) weights each target: SFT trains
    on the assistant's tokens only, bits per byte skips tokens without bytes.
    """
    del rng  # deterministic: no dropout
    logprobs_BxT = token_logprobs(cfg, params, batch)
    weights_BxT = batch.get("loss_mask", jnp.ones_like(logprobs_BxT)).astype(jnp.float32)
    # `where`, not a product: a masked-out target can never bring an inf or NaN into the sum.
    nll_sum = -jnp.sum(jnp.where(weights_BxT > 0, logprobs_BxT * weights_BxT, 0.0))
    return nll_sum, jnp.sum(weights_BxT), {}
