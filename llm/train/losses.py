"""Pure losses over one micro-batch: `loss_fn(params, microbatch, rng) -> (summed_loss, normalizer, aux)`.

The step (`llm/train/step.py`) adds the summed losses, normalizers and aux sums of
every micro-batch and divides once at the end, so gradient accumulation and the
mean over devices are exact in whatever the normalizer counts (target tokens here;
pairs or sequences in later stages). A loss therefore never averages itself, and
a micro-batch with nothing to learn from (an all-zero mask) contributes 0 to both
sums: loss 0, gradient 0, never NaN.

A stage binds the model config: `functools.partial(lm_loss, cfg)` is a `loss_fn`.

Shape legend: B batch, T sequence, V vocabulary, D model width, W a pair's row width.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from llm import model, reward_model
from llm.config import ModelConfig
from llm.train.xent import chunked_logprobs, loss_chunk

Batch = Mapping[str, jax.Array]
LossOutput = tuple[jax.Array, jax.Array, dict[str, jax.Array]]


def token_logprobs(cfg: ModelConfig, params: Any, batch: Batch) -> jax.Array:
    """Float32 log-probability of each `targets_BxT` token given `inputs_BxT` and what precedes it.

    `batch` may carry `positions` and `segment_ids` (packed documents). SFT, GRPO,
    DPO and the evals all read the model through this one function. With
    `loss_chunk(cfg)` > 0 the head and log-softmax run in chunks (`chunked_logprobs`).
    """
    chunk = loss_chunk(cfg)
    if chunk:
        x_BxTxD, _ = model.hidden_states(cfg, params, batch["inputs"], positions_BxT=batch.get("positions"),
                                         segment_ids_BxT=batch.get("segment_ids"))
        head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
        return chunked_logprobs(cfg, head, x_BxTxD, batch["targets"], chunk)
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


# ----------------------------------------------------------------------------- GRPO

AGGREGATIONS = ("token", "sequence", "constant")


def grpo_loss(
    logprobs_BxT: jax.Array,
    old_logprobs_BxT: jax.Array,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    ref_logprobs_BxT: jax.Array | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    kl_beta: float = 0.0,
    aggregation: str = "token",
    segment_ids_BxT: jax.Array | None = None,
    constant_length: int | None = None,
) -> LossOutput:
    """The clipped policy-gradient loss of GRPO as (summed loss, normalizer, aux sums).

    Per token: ratio `r = exp(logp - old_logp)`, objective `min(r A, clip(r, 1 - eps_low,
    1 + eps_high) A)` (PPO's pessimistic bound, Schulman et al. 2017, with DAPO's
    asymmetric "clip-higher", Yu et al. 2025), loss = -objective + kl_beta * k3, where
    k3 = exp(ref - logp) - (ref - logp) - 1 is Schulman's unbiased, positive KL
    estimator used by GRPO (Shao et al. 2024, DeepSeekMath eq. 4). The step divides
    the summed loss by the summed normalizer, so the aggregation is a choice of both:

    - "token" (DAPO, the default): every completion token of the step weighs the
      same; normalizer = number of masked tokens.
    - "sequence" (GRPO's paper): each sequence's token mean, averaged over
      sequences; normalizer = number of sequences with a masked token.
    - "constant" (Dr. GRPO, Liu et al. 2025): token sums over a constant, the
      sequence count times `constant_length` (default T, the mask's width), so
      a long wrong answer is not penalised less per token than a short one.

    `advantages_B` may also be [B, T] (one value per token): packed rows hold
    several sequences, whose ids `segment_ids_BxT` tell "sequence" aggregation
    apart (without them a row is one sequence). Masked tokens (prompts, padding,
    tool outputs the engine forced) get exactly zero gradient: their log-ratios
    are replaced by 0 before anything else touches them, so even an inf or NaN
    there cannot leak. Aux sums: `tokens`, `clipped_tokens` (the clipped term won
    the min, so the token gave no gradient), `kl` (k3 summed; 0 without a
    reference), `neg_logprob` (summed -logp of the sampled tokens: over
    `tokens`, a Monte-Carlo estimate of the policy's entropy) and `sequences`.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_beta and ref_logprobs_BxT is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs_BxT (the frozen reference's log-probabilities)")
    mask_BxT = mask_BxT.astype(jnp.float32)
    on_BxT = mask_BxT > 0
    adv_BxT = jnp.broadcast_to(advantages_B[:, None] if advantages_B.ndim == 1 else advantages_B, mask_BxT.shape)
    adv_BxT = jnp.where(on_BxT, adv_BxT, 0.0)
    log_ratio_BxT = jnp.where(on_BxT, logprobs_BxT - old_logprobs_BxT, 0.0)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    unclipped_BxT = ratio_BxT * adv_BxT
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high) * adv_BxT
    loss_BxT = -jnp.minimum(unclipped_BxT, clipped_BxT)
    kl_BxT = jnp.zeros_like(loss_BxT)
    if ref_logprobs_BxT is not None:
        ref_minus_BxT = jnp.where(on_BxT, ref_logprobs_BxT - logprobs_BxT, 0.0)
        kl_BxT = jnp.exp(ref_minus_BxT) - ref_minus_BxT - 1.0
        if kl_beta:
            loss_BxT = loss_BxT + kl_beta * kl_BxT

    # Each token's weight in its sequence: 1 / (masked tokens of its sequence), so a
    # sequence's weights sum to 1 and the sum of all weights counts the sequences.
    if segment_ids_BxT is None:
        per_sequence_BxT = jnp.broadcast_to(mask_BxT.sum(axis=1, keepdims=True), mask_BxT.shape)
    else:
        same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        per_sequence_BxT = jnp.einsum("bts,bs->bt", same_BxTxT.astype(jnp.float32), mask_BxT)
    share_BxT = jnp.where(on_BxT, mask_BxT / jnp.where(on_BxT, per_sequence_BxT, 1.0), 0.0)
    sequences = share_BxT.sum()
    weighted = jnp.where(on_BxT, loss_BxT * mask_BxT, 0.0)
    if aggregation == "token":
        summed, normalizer = weighted.sum(), mask_BxT.sum()
    elif aggregation == "sequence":
        summed, normalizer = jnp.where(on_BxT, loss_BxT * share_BxT, 0.0).sum(), sequences
    else:
        summed = weighted.sum()
        normalizer = sequences * (constant_length or mask_BxT.shape[1])
    aux = {
        "tokens": mask_BxT.sum(),
        "sequences": sequences,
        "clipped_tokens": jnp.sum(jnp.where(on_BxT & (clipped_BxT < unclipped_BxT), mask_BxT, 0.0)),
        "kl": jnp.sum(jnp.where(on_BxT, kl_BxT * mask_BxT, 0.0)),
        "neg_logprob": -jnp.sum(jnp.where(on_BxT, logprobs_BxT * mask_BxT, 0.0)),
    }
    return summed, normalizer, aux


def grpo_loss_fn(cfg: ModelConfig, params: Any, batch: Batch, rng: jax.Array | None = None, **options) -> LossOutput:
    """`grpo_loss` of the policy's log-probabilities on a rollout micro-batch; bind cfg and options with partial.

    The micro-batch: `inputs`, `targets`, `loss_mask` (1 on sampled completion
    tokens), `old_logprobs` and `advantages` (per row, or per token), optionally
    `ref_logprobs`, `positions` and `segment_ids`.
    """
    del rng
    return grpo_loss(token_logprobs(cfg, params, batch), batch["old_logprobs"], batch["advantages"],
                     batch["loss_mask"], ref_logprobs_BxT=batch.get("ref_logprobs"),
                     segment_ids_BxT=batch.get("segment_ids"), **options)


# ----------------------------------------------------------------------------- preferences (reward model, DPO)


def bradley_terry_loss(
    chosen_B: jax.Array,
    rejected_B: jax.Array,
    weights_B: jax.Array,
    *,
    margin_B: jax.Array | None = None,
    center_coef: float = 0.0,
) -> LossOutput:
    """The reward model's pairwise loss as (summed loss, pairs, aux sums).

    Bradley-Terry (1952) as used for RLHF reward models (Ouyang et al. 2022, eq. 1):
    -log sigmoid(r_chosen - r_rejected - margin), the optional margin being how
    much better the chosen reply was rated (Llama 2, Touvron et al. 2023, eq. 2).
    `center_coef` adds c * (r_chosen + r_rejected)^2, which pins the rewards'
    mean near zero without changing their differences (Eisenstein et al. 2023,
    "Helping or herding?"). `weights_B` is 1 on real pairs and 0 on padding.
    Aux sums: `pairs`, `correct` (chosen scored higher; a tie half), `margin` (r_chosen -
    r_rejected), `reward` and `reward_sq` (of both sides, for the mean and spread).
    """
    weights_B = weights_B.astype(jnp.float32)
    on_B = weights_B > 0
    diff_B = chosen_B - rejected_B
    shifted_B = diff_B - (margin_B if margin_B is not None else 0.0)
    loss_B = -jax.nn.log_sigmoid(shifted_B) + center_coef * jnp.square(chosen_B + rejected_B)

    def total(x_B):
        return jnp.sum(jnp.where(on_B, x_B * weights_B, 0.0))

    # A tie counts half, as for any baseline scored on the same pairs (a zero head ties every pair).
    correct_B = (diff_B > 0).astype(jnp.float32) + 0.5 * (diff_B == 0).astype(jnp.float32)
    aux = {"pairs": total(jnp.ones_like(diff_B)), "correct": total(correct_B),
           "margin": total(diff_B), "reward": total(chosen_B + rejected_B),
           "reward_sq": total(jnp.square(chosen_B) + jnp.square(rejected_B))}
    return total(loss_B), aux["pairs"], aux


def dpo_loss(
    chosen_logp_B: jax.Array,
    rejected_logp_B: jax.Array,
    ref_chosen_logp_B: jax.Array,
    ref_rejected_logp_B: jax.Array,
    weights_B: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Direct Preference Optimization's sigmoid loss as (summed loss, pairs, aux sums).

    Rafailov et al. 2023, eq. 7: with implicit rewards beta * (log pi(y|x) -
    log pi_ref(y|x)), the loss is -log sigmoid(reward_chosen - reward_rejected).
    `label_smoothing` eps assumes each label is flipped with probability eps
    (conservative DPO, Mitchell 2023): -(1 - eps) log sigmoid(z) - eps log
    sigmoid(-z). The log-probabilities are sums over each reply's tokens (or
    their means, when the caller normalises by length). Aux sums: `pairs`,
    `correct` (the chosen reply's implicit reward is higher; a tie half), `margin` (the
    implicit reward margin), `chosen_reward`, `rejected_reward`, `chosen_logp`
    and `rejected_logp` (the policy's, to watch the chosen reply's likelihood).
    """
    weights_B = weights_B.astype(jnp.float32)
    on_B = weights_B > 0
    chosen_reward_B = beta * (chosen_logp_B - ref_chosen_logp_B)
    rejected_reward_B = beta * (rejected_logp_B - ref_rejected_logp_B)
    z_B = chosen_reward_B - rejected_reward_B
    loss_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_B) - label_smoothing * jax.nn.log_sigmoid(-z_B)

    def total(x_B):
        return jnp.sum(jnp.where(on_B, x_B * weights_B, 0.0))

    correct_B = (z_B > 0).astype(jnp.float32) + 0.5 * (z_B == 0).astype(jnp.float32)  # a tie half, as for rewards
    aux = {"pairs": total(jnp.ones_like(z_B)), "correct": total(correct_B), "margin": total(z_B),
           "chosen_reward": total(chosen_reward_B), "rejected_reward": total(rejected_reward_B),
           "chosen_logp": total(chosen_logp_B), "rejected_logp": total(rejected_logp_B)}
    return total(loss_B), aux["pairs"], aux


def sequence_logprobs(cfg: ModelConfig, params: Any, tokens_BxW: jax.Array, mask_BxW: jax.Array, *,
                      length_normalize: bool = False) -> jax.Array:
    """Log-probability of each row's masked tokens given what precedes them, summed (or averaged) per row: [B].

    Rows are `pair_rows.render_pairs`' (tokens and a reply mask of width W); the
    model reads W - 1 inputs and predicts tokens 1..W-1 (a reply never starts a row).
    """
    batch = {"inputs": tokens_BxW[:, :-1], "targets": tokens_BxW[:, 1:]}
    mask_BxT = mask_BxW[:, 1:].astype(jnp.float32)
    logprobs_BxT = token_logprobs(cfg, params, batch)
    summed_B = jnp.sum(jnp.where(mask_BxT > 0, logprobs_BxT * mask_BxT, 0.0), axis=1)
    return summed_B / jnp.maximum(mask_BxT.sum(axis=1), 1.0) if length_normalize else summed_B


def dpo_loss_fn(cfg: ModelConfig, params: Any, batch: Batch, rng: jax.Array | None = None, *, beta: float = 0.1,
                label_smoothing: float = 0.0, length_normalize: bool = False) -> LossOutput:
    """`dpo_loss` of the policy on a pair micro-batch with precomputed reference log-probabilities.

    The micro-batch: `chosen_tokens`, `chosen_mask`, `rejected_tokens`,
    `rejected_mask` (`pair_rows.render_pairs`), `ref_chosen_logp`,
    `ref_rejected_logp` and `weights` (0 on padding pairs). Both sides go through
    one forward (stacked along the batch).
    """
    del rng
    B = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    masks = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logp_2B = sequence_logprobs(cfg, params, tokens, masks, length_normalize=length_normalize)
    return dpo_loss(logp_2B[:B], logp_2B[B:], batch["ref_chosen_logp"], batch["ref_rejected_logp"], batch["weights"],
                    beta=beta, label_smoothing=label_smoothing)


def reward_loss_fn(cfg: ModelConfig, params: Any, batch: Batch, rng: jax.Array | None = None, *,
                   center_coef: float = 0.0) -> LossOutput:
    """`bradley_terry_loss` of a reward model (`{"backbone", "head"}` params) on a pair micro-batch.

    The micro-batch: `chosen_tokens`, `chosen_length`, `rejected_tokens`,
    `rejected_length` (`pair_rows.render_pairs`), `weights` (0 on padding pairs)
    and optionally `margin`. Both sides go through one forward.
    """
    del rng
    B = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]])
    rewards_2B = reward_model.scores(cfg, params, tokens, lengths)
    return bradley_terry_loss(rewards_2B[:B], rewards_2B[B:], batch["weights"], margin_B=batch.get("margin"),
                              center_coef=center_coef)
