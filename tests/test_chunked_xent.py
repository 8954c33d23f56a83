"""Chunked cross-entropy (`xent.chunked_logprobs`): the full logits' values and gradients, a chunk at a time."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm import model, sharding
from llm.config import ModelConfig, base_config
from llm.train import losses, xent
from llm.train.step import StateLayout, init_train_state, jit_train_step

CFG = ModelConfig(family="llama", vocab_size=96, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_dim=64,
                  max_seq_len=16, loss_chunk=0)


def _problem(tied: bool, softcap: float, seed: int = 0):
    """A [3, 12, 32] problem whose logits span several units (so the softmax and soft-cap are far from flat)."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tied, logit_softcap=softcap)
    rng = np.random.RandomState(seed)
    head = rng.randn(*((96, 32) if tied else (32, 96))).astype(np.float32) * 0.5
    x_BxTxD = rng.randn(3, 12, 32).astype(np.float32)
    targets_BxT = rng.randint(0, 96, (3, 12)).astype(np.int32)
    mask_BxT = (rng.rand(3, 12) < 0.7).astype(np.float32)
    return cfg, jnp.asarray(head), jnp.asarray(x_BxTxD), jnp.asarray(targets_BxT), jnp.asarray(mask_BxT)


@pytest.mark.parametrize("tied,softcap,chunk", [
    (True, 0.0, 4),    # divides T = 12
    (True, 0.0, 5),    # does not: the last chunk is padded
    (False, 0.0, 5),
    (False, 3.0, 4),   # soft-capped logits
    (True, 3.0, 7),
    (False, 0.0, 1),   # one position per chunk
    (True, 0.0, 64),   # longer than T: one chunk
])
def test_chunked_equals_full_in_value_and_gradient(tied, softcap, chunk):
    cfg, head, x_BxTxD, targets_BxT, mask_BxT = _problem(tied, softcap)
    key = "embed" if tied else "lm_head"

    def full(x, h):
        logits_BxTxV = model.output_logits(cfg, {key: h}, x)
        logprobs_BxT = -optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
        return jnp.sum(mask_BxT * logprobs_BxT), logprobs_BxT

    def chunked(x, h):
        logprobs_BxT = xent.chunked_logprobs(cfg, h, x, targets_BxT, chunk)
        return jnp.sum(mask_BxT * logprobs_BxT), logprobs_BxT

    (want, want_BxT), want_grads = jax.value_and_grad(full, (0, 1), has_aux=True)(x_BxTxD, head)
    (got, got_BxT), got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(x_BxTxD, head)
    assert float(jnp.abs(want)) > 10  # a real loss, not a near-zero one that any tolerance accepts
    np.testing.assert_allclose(got_BxT, want_BxT, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert float(jnp.max(jnp.abs(w))) > 1e-2
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # Masked-out positions still get their log-probabilities, but no gradient reaches x there.
    assert float(jnp.max(jnp.abs(got_grads[0] * (1 - mask_BxT)[..., None]))) == 0.0


@pytest.mark.slow
def test_lm_loss_step_on_a_sharded_mesh_equals_the_full_logits():
    """One SGD step of `lm_loss` through the generic step, vocabulary split over `tensor`: same loss, same update."""
    config = base_config("tiny", sharding="fsdp_tp")
    rules = dict(config.sharding)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, CFG.vocab_size, (2, 4, 13)).astype(np.int32)  # 2 micro-batches of 4 x 12
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
             "loss_mask": (rng.rand(2, 4, 12) < 0.8).astype(np.float32)}
    sgd = optax.sgd(1.0)
    runs = []
    for tied, chunk in ((True, 0), (True, 5), (False, 0), (False, 5)):
        cfg = dataclasses.replace(CFG, tie_embeddings=tied, loss_chunk=chunk)
        abstract = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
        layout = StateLayout.create(model.param_axes(cfg), abstract, sgd, mesh, rules)
        params, opt_state = init_train_state(functools.partial(model.init_params, cfg), sgd, layout,
                                             jax.random.key(0))
        step = jit_train_step(functools.partial(losses.lm_loss, cfg), sgd, layout)
        before = jax.device_get(params)  # the step donates its inputs
        new_params, _, metrics = step(params, opt_state, batch, jax.random.key(0))
        runs.append((before, jax.device_get(new_params), metrics))
    for (p0, full, m_full), (_, chunked, m_chunked) in (runs[:2], runs[2:]):
        np.testing.assert_allclose(m_chunked["loss"], m_full["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_chunked["grad_norm"], m_full["grad_norm"], rtol=1e-5)
        # With SGD at lr 1 the update is the gradient: compare it, not the (much larger) parameters.
        jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - p, b - p, rtol=1e-5, atol=1e-6), chunked, full, p0)


def test_loss_chunk_knob():
    assert xent.loss_chunk(dataclasses.replace(CFG, loss_chunk=-1)) == (0 if jax.default_backend() == "cpu"
                                                                         else xent.AUTO_LOSS_CHUNK)
    assert xent.loss_chunk(dataclasses.replace(CFG, loss_chunk=256)) == 256
    with pytest.raises(ValueError, match="loss_chunk"):
        dataclasses.replace(CFG, loss_chunk=-2)
    with pytest.raises(ValueError, match="positive"):
        cfg, head, x_BxTxD, targets_BxT, _ = _problem(True, 0.0)
        xent.chunked_logprobs(cfg, head, x_BxTxD, targets_BxT, 0)


@pytest.mark.slow
def test_bfloat16_compute_agrees_with_the_full_logits():
    """bf16 compute (the GPU default): chunked and full differ only by bf16 rounding of the logits' gradient."""
    rng = np.random.RandomState(2)
    tokens = rng.randint(0, CFG.vocab_size, (2, 13)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": (rng.rand(2, 12) < 0.8).astype(np.float32)}
    runs = {}
    for chunk in (0, 5):
        cfg = dataclasses.replace(CFG, dtype="bfloat16", tie_embeddings=False, loss_chunk=chunk)
        params = model.init_params(cfg, jax.random.key(0))
        runs[chunk] = jax.jit(jax.value_and_grad(lambda p, cfg=cfg: losses.lm_loss(cfg, p, batch)[0]))(params)
    (full, g_full), (chunked, g_chunked) = runs[0], runs[5]
    np.testing.assert_allclose(chunked, full, rtol=1e-6)  # the same f32 logits either way
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_chunked))
    relative = jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)), g_chunked, g_full)
    assert max(jax.tree.leaves(relative)) < 2e-2, relative
