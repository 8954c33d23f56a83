"""The train step and optimizer: exact accumulation, sharded == single device, schedules, decay masks."""

import functools

import jax
import numpy as np
import optax
import pytest

from llm import model, sharding
from llm.config import ModelConfig, base_config
from llm.train.optimizer import learning_rate_schedule, make_optimizer, muon_dimensions, weight_decay_mask
from llm.train.step import init_train_state, jit_train_step, train_step

CFG = ModelConfig(family="llama", vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                  max_seq_len=32, tie_embeddings=False)


def _batch(n_rows=4, T=16, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, CFG.vocab_size, (n_rows, T + 1)).astype(np.int32)
    loss_mask = (rng.rand(n_rows, T) < np.linspace(0.2, 1.0, n_rows)[:, None]).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask}


def _split(batch, micro_batches):
    return {k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}


def test_gradient_accumulation_is_exact_in_tokens():
    """Rows hold different numbers of target tokens, so a mean of micro-batch means would differ."""
    params = model.init_params(CFG, jax.random.key(0))
    sgd = optax.sgd(1.0)
    batch = _batch()
    assert len(set(batch["loss_mask"].sum(axis=1))) == 4  # every row holds a different number of targets
    results = []
    for micro_batches in (1, 2, 4):
        step = jax.jit(functools.partial(train_step, CFG, sgd))
        new_params, _, metrics = step(params, sgd.init(params), _split(batch, micro_batches), jax.random.key(1))
        results.append((new_params, metrics))
    for new_params, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
        assert metrics["tokens"] == batch["loss_mask"].sum()
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_params, results[0][0])


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_sharded_steps_equal_single_device_steps(optimizer_name):
    config = base_config("tiny", sharding="fsdp_tp")
    config.optimizer.update(name=optimizer_name, warmup_steps=1, learning_rate=1e-2)
    optimizer = make_optimizer(config.optimizer, CFG)
    rules = dict(config.sharding)
    batch = _split(_batch(n_rows=8), 2)

    single = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    runs = []
    for m in (single, mesh):
        params, opt_state = init_train_state(CFG, optimizer, m, rules, jax.random.key(0))
        step = jit_train_step(CFG, optimizer, m, rules)
        losses = []
        for i in range(3):
            params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        runs.append((params, losses))
    assert runs[1][0]["blocks"]["mlp"]["gate"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5)
    # Adam's update is about lr * sign(g) where g is tiny, so float-order noise in a
    # near-zero gradient may move an element by a fraction of one step (lr = 1e-2).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-4), runs[1][0], runs[0][0])


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_a_fixed_batch_is_memorised(optimizer_name):
    config = base_config("tiny")
    config.optimizer.update(name=optimizer_name, warmup_steps=5, total_steps=40, learning_rate=1e-2)
    optimizer = make_optimizer(config.optimizer, CFG)
    mesh = sharding.make_mesh(dict(data=8))
    rules = dict(config.sharding)
    params, opt_state = init_train_state(CFG, optimizer, mesh, rules, jax.random.key(0))
    step = jit_train_step(CFG, optimizer, mesh, rules)
    batch = _split(_batch(n_rows=8), 1)
    losses = []
    for i in range(40):
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[0] > 4.5 and losses[-1] < 0.5 * losses[0], losses


def test_schedules_reach_peak_and_floor():
    opt = base_config("tiny").optimizer
    opt.update(learning_rate=1.0, warmup_steps=10, total_steps=110, min_learning_rate_ratio=0.1, decay_fraction=0.5)
    cosine = learning_rate_schedule(opt)
    assert [float(cosine(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(cosine(60)) == pytest.approx(0.55) and float(cosine(110)) == pytest.approx(0.1)
    opt.schedule = "wsd"
    wsd = learning_rate_schedule(opt)
    assert [float(wsd(s)) for s in (10, 40, 60, 85, 110)] == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1])


def test_weight_decay_and_muon_cover_exactly_the_matrices():
    gpt2 = ModelConfig(family="gpt2", vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, mlp_dim=64,
                       max_seq_len=16)
    mask = weight_decay_mask(gpt2)
    assert mask["blocks"]["attn"]["q"] and mask["blocks"]["mlp"]["proj"] and mask["embed"] and mask["pos_embed"]
    assert not any([mask["blocks"]["attn"]["q_bias"], mask["blocks"]["attn_norm"]["scale"],
                    mask["blocks"]["mlp"]["fc_bias"], mask["final_norm"]["bias"]])
    dims = muon_dimensions(gpt2)
    assert (dims["blocks"]["attn"]["q"].reduction_axis, dims["blocks"]["attn"]["q"].output_axis) == ((1,), (2, 3))
    assert (dims["blocks"]["attn"]["o"].reduction_axis, dims["blocks"]["attn"]["o"].output_axis) == ((1, 2), (3,))
    assert (dims["blocks"]["mlp"]["proj"].reduction_axis, dims["blocks"]["mlp"]["proj"].output_axis) == ((1,), (2,))
    assert dims["embed"] is None and dims["blocks"]["attn"]["q_bias"] is None and dims["final_norm"]["scale"] is None
