"""The losses against hand computations: GRPO's clipped objective, Bradley-Terry, DPO.

Every expected number below is worked out by hand in the comments beside it, so
a wrong aggregation, clip side, KL estimator or normaliser gives a different number.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import model
from llm.config import ModelConfig
from llm.train import losses
from llm.train.losses import grpo_loss, grpo_loss_fn, token_logprobs

CFG = ModelConfig(family="llama", vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_dim=64,
                  max_seq_len=32, tie_embeddings=True)


def _value(*args, **kwargs):
    summed, normalizer, aux = grpo_loss(*(jnp.asarray(a, jnp.float32) for a in args), **kwargs)
    return float(summed), float(normalizer), {k: float(v) for k, v in aux.items()}


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


# ----------------------------------------------------------------------------- GRPO


def test_token_sequence_and_constant_aggregation_give_their_own_values():
    # ratio 1 everywhere (logp == old), so each token's loss is -A.
    # Row 0: A = 1 on 3 tokens -> losses -1, -1, -1. Row 1: A = 2 on 1 token -> loss -2.
    logp = np.log([[0.5, 0.25, 0.5], [0.5, 0.1, 0.1]])
    adv, mask = [1.0, 2.0], [[1, 1, 1], [1, 0, 0]]
    # token (DAPO): (-1 - 1 - 1 - 2) / 4 tokens = -5 / 4 = -1.25
    s, n, aux = _value(logp, logp, adv, mask, aggregation="token")
    assert (s, n) == pytest.approx((-5.0, 4.0)) and s / n == pytest.approx(-1.25)
    # sequence (GRPO): mean of row means ((-3 / 3) + (-2 / 1)) / 2 sequences = -3 / 2 = -1.5
    s, n, _ = _value(logp, logp, adv, mask, aggregation="sequence")
    assert (s, n) == pytest.approx((-3.0, 2.0)) and s / n == pytest.approx(-1.5)
    # constant (Dr. GRPO): -5 / (2 sequences * T = 3) = -5 / 6; with constant_length 10: -5 / 20
    s, n, _ = _value(logp, logp, adv, mask, aggregation="constant")
    assert (s, n) == pytest.approx((-5.0, 6.0))
    assert _value(logp, logp, adv, mask, aggregation="constant", constant_length=10)[1] == pytest.approx(20.0)
    # aux: 4 tokens, 2 sequences, nothing clipped; -logp summed = ln 2 + ln 4 + ln 2 + ln 2 = 5 ln 2
    assert aux["tokens"] == 4 and aux["sequences"] == pytest.approx(2.0) and aux["clipped_tokens"] == 0
    assert aux["neg_logprob"] == pytest.approx(5 * math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros(1), jnp.ones((1, 1)), aggregation="mean")


def test_clipping_active_and_inactive_for_positive_and_negative_advantages():
    # Four one-token rows, eps_low 0.2, eps_high 0.28 (clip range [0.8, 1.28]):
    #   r = 1.5, A = +1: min(1.5, 1.28) = 1.28   -> loss -1.28, clipped (no gradient)
    #   r = 1.5, A = -1: min(-1.5, -1.28) = -1.5 -> loss +1.5,  not clipped, d loss / d logp = -A r = +1.5
    #   r = 0.5, A = +1: min(0.5, 0.8) = 0.5     -> loss -0.5,  not clipped, d loss / d logp = -A r = -0.5
    #   r = 0.5, A = -1: min(-0.5, -0.8) = -0.8  -> loss +0.8,  clipped (no gradient)
    old = np.log([[0.2], [0.2], [0.2], [0.2]])
    logp = old + np.log([[1.5], [1.5], [0.5], [0.5]])
    adv, mask = jnp.asarray([1.0, -1.0, 1.0, -1.0]), jnp.ones((4, 1))
    s, n, aux = _value(logp, old, adv, mask)
    # summed: -1.28 + 1.5 - 0.5 + 0.8 = 0.52 over 4 tokens
    assert (s, n) == pytest.approx((0.52, 4.0), rel=1e-5)
    assert aux["clipped_tokens"] == 2
    grad = jax.grad(lambda lp: grpo_loss(lp, jnp.asarray(old, jnp.float32), adv, mask)[0])(
        jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad)[:, 0], [0.0, 1.5, -0.5, 0.0], rtol=1e-5)
    # The asymmetry: with A = +1 a ratio of 1.25 is inside [0.8, 1.28] (loss -1.25), 0.75 is not (loss -0.8).
    assert _value(np.log([[1.25]]), [[0.0]], [1.0], [[1]])[0] == pytest.approx(-1.25, rel=1e-5)
    assert _value(np.log([[0.75]]), [[0.0]], [-1.0], [[1]])[0] == pytest.approx(0.8, rel=1e-5)


def test_k3_kl_to_the_reference_by_hand():
    # k3 = exp(ref - logp) - (ref - logp) - 1:
    #   ref - logp = ln 2  -> 2 - ln 2 - 1   = 0.306853
    #   ref - logp = 0     -> 1 - 0 - 1      = 0
    #   ref - logp = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147
    logp = np.log([[0.25, 0.5, 0.5]])
    ref = np.log([[0.5, 0.5, 0.25]])
    k3 = [1 - math.log(2), 0.0, math.log(2) - 0.5]
    s, n, aux = _value(logp, logp, [0.0], [[1, 1, 1]], ref_logprobs_BxT=ref, kl_beta=0.5)
    # A = 0, so the loss is kl_beta * sum(k3) = 0.5 * (0.306853 + 0 + 0.193147) = 0.25
    assert aux["kl"] == pytest.approx(sum(k3), rel=1e-6) and s == pytest.approx(0.25, rel=1e-5) and n == 3
    # kl_beta 0: the KL is reported but not in the loss.
    s, _, aux = _value(logp, logp, [0.0], [[1, 1, 1]], ref_logprobs_BxT=ref)
    assert s == 0.0 and aux["kl"] == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros(1), jnp.ones((1, 1)), kl_beta=0.1)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_masked_tokens_have_exactly_zero_gradient_even_when_not_finite(aggregation):
    logp = jnp.asarray([[-1.0, jnp.nan, -2.0, -jnp.inf], [-0.5, -0.7, 40.0, -3.0]])
    old = jnp.asarray([[-1.2, jnp.inf, -1.9, 0.0], [-0.4, -0.7, -50.0, -3.0]])
    ref = jnp.asarray([[-1.1, -jnp.inf, -2.0, 5.0], [-0.5, -0.6, 90.0, -3.0]])
    mask = jnp.asarray([[1, 0, 1, 0], [1, 1, 0, 0]])
    loss = lambda lp: grpo_loss(lp, old, jnp.asarray([1.0, -0.5]), mask, ref_logprobs_BxT=ref, kl_beta=0.1,
                                aggregation=aggregation)[0]
    value, grad = jax.value_and_grad(loss)(logp)
    assert np.isfinite(float(value))
    grad = np.asarray(grad)
    assert np.all(grad[np.asarray(mask) == 0] == 0.0)
    assert np.all(np.isfinite(grad)) and np.all(grad[np.asarray(mask) == 1] != 0.0)


def _model_batch(rows, width):
    """Rows of (tokens, loss mask, advantage) padded to `width` + 1 tokens, one sequence per row."""
    tokens = np.zeros((len(rows), width + 1), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (ids, m, _) in enumerate(rows):
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids) - 1] = m[1:]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "advantages": np.asarray([a for *_, a in rows], np.float32)}


@pytest.mark.slow
def test_a_packed_batch_gives_the_loss_of_the_same_sequences_unpacked():
    params = model.init_params(CFG, jax.random.key(0))
    rng = np.random.RandomState(0)
    # Two sequences (prompt tokens mask 0, completion 1) with advantages +1 and -0.5.
    a = (rng.randint(1, 64, 9), np.array([0, 0, 0, 1, 1, 1, 1, 1, 1]), 1.0)
    b = (rng.randint(1, 64, 6), np.array([0, 0, 1, 1, 1, 1]), -0.5)
    unpacked = _model_batch([a, b], 12)
    # Packed: a then b in one row of width 16, with segment ids and positions restarting at b.
    ids = np.concatenate([a[0], b[0], np.zeros(2, np.int32)])
    seg = np.array([1] * 9 + [2] * 6 + [0] * 2)
    pos = np.concatenate([np.arange(9), np.arange(6), [0, 0]])
    mask = np.concatenate([a[1][1:], [0], b[1][1:], [0, 0]]).astype(np.float32)  # targets never cross a border
    adv = np.where(seg[:-1] == 1, 1.0, -0.5).astype(np.float32)
    packed = {"inputs": ids[None, :-1], "targets": ids[None, 1:], "loss_mask": mask[None],
              "segment_ids": seg[None, :-1], "positions": pos[None, :-1], "advantages": adv[None]}
    # Old log-probs: the policy's own, each completion token shifted alike in both layouts so some clip.
    unpacked["old_logprobs"] = np.array(token_logprobs(CFG, params, unpacked))
    packed["old_logprobs"] = np.array(token_logprobs(CFG, params, packed))
    shift = 0.3 * np.sin(np.arange(13))  # 8 completion-side targets of a, then 5 of b
    unpacked["old_logprobs"][0, :8] += shift[:8]
    unpacked["old_logprobs"][1, :5] += shift[8:]
    packed["old_logprobs"][0, :8] += shift[:8]
    packed["old_logprobs"][0, 9:14] += shift[8:]
    for aggregation in ("token", "sequence"):
        loss = functools.partial(grpo_loss_fn, CFG, aggregation=aggregation)
        (s1, n1, aux1), g1 = loss(params, unpacked), jax.grad(lambda p: loss(p, unpacked)[0])(params)
        (s2, n2, aux2), g2 = loss(params, packed), jax.grad(lambda p: loss(p, packed)[0])(params)
        np.testing.assert_allclose(float(s2), float(s1), rtol=1e-5)
        assert float(n1) == float(n2) == {"token": 6.0 + 4.0, "sequence": 2.0}[aggregation]
        assert float(aux1["clipped_tokens"]) == float(aux2["clipped_tokens"]) > 0
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), g2, g1)


@pytest.mark.slow
def test_one_step_on_fresh_rollouts_is_the_plain_policy_gradient():
    # With old == current log-probs (mu = 1: the first step on a rollout) every ratio is 1,
    # inside the clip range, so the gradient is REINFORCE's: -sum_t A_b grad logp_bt / tokens.
    params = model.init_params(CFG, jax.random.key(1))
    rng = np.random.RandomState(1)
    rows = [(rng.randint(1, 64, 10), np.array([0] * 4 + [1] * 6), 0.7),
            (rng.randint(1, 64, 8), np.array([0] * 3 + [1] * 5), -1.3)]
    batch = _model_batch(rows, 12)
    batch["old_logprobs"] = np.asarray(token_logprobs(CFG, params, batch))
    grad = jax.grad(lambda p: (lambda s, n, _: s / n)(*grpo_loss_fn(CFG, p, batch)))(params)

    def reinforce(p):
        logp = token_logprobs(CFG, p, batch)
        return -jnp.sum(batch["advantages"][:, None] * logp * batch["loss_mask"])

    expected = jax.tree.map(lambda g: g / 11.0, jax.grad(reinforce)(params))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-8), grad, expected)
    assert float(grpo_loss_fn(CFG, params, batch)[1]) == 6 + 5  # completion targets: 6 in row 0, 5 in row 1


# ----------------------------------------------------------------------------- preferences


def test_bradley_terry_by_hand_with_margin_centering_and_padding():
    chosen, rejected, weights = jnp.array([2.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 0.0])
    s, n, aux = losses.bradley_terry_loss(chosen, rejected, weights)
    # -log sigmoid(2) - log sigmoid(0); the third pair is padding
    assert float(s) == pytest.approx(np.log1p(np.exp(-2.0)) + np.log(2.0), rel=1e-6) and float(n) == 2
    assert float(aux["correct"]) == 1.5  # a win and a tie
    assert float(aux["margin"]) == 2.0 and float(aux["reward"]) == 2.0 and float(aux["reward_sq"]) == 4.0
    s, _, _ = losses.bradley_terry_loss(chosen, rejected, weights, margin_B=jnp.array([1.0, 1.0, 1.0]))
    assert float(s) == pytest.approx(-_log_sigmoid(1.0) - _log_sigmoid(-1.0), rel=1e-6)  # 0.3133 + 1.3133
    s, _, _ = losses.bradley_terry_loss(chosen, rejected, weights, center_coef=0.1)
    assert float(s) == pytest.approx(np.log1p(np.exp(-2.0)) + np.log(2.0) + 0.1 * 4.0, rel=1e-6)


def test_dpo_by_hand_with_label_smoothing():
    # implicit rewards: beta * (logp - ref) = 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5; z = 1
    args = (jnp.array([-10.0, 3.0]), jnp.array([-12.0, 3.0]), jnp.array([-11.0, 0.0]), jnp.array([-11.0, 0.0]),
            jnp.array([1.0, 0.0]))
    s, n, aux = losses.dpo_loss(*args, beta=0.5)
    assert float(s) == pytest.approx(-_log_sigmoid(1.0), rel=1e-6) and float(n) == 1  # 0.31326
    assert float(aux["margin"]) == pytest.approx(1.0) and float(aux["correct"]) == 1.0
    assert float(aux["chosen_reward"]) == pytest.approx(0.5) and float(aux["rejected_reward"]) == pytest.approx(-0.5)
    assert float(aux["chosen_logp"]) == -10.0
    s, _, _ = losses.dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326
    assert float(s) == pytest.approx(0.9 * -_log_sigmoid(1.0) + 0.1 * -_log_sigmoid(-1.0), rel=1e-6)
