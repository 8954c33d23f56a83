"""The generic train step, losses and optimizer: exact accumulation, frozen subtrees, sharded == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm import model, sharding
from llm.config import ModelConfig, base_config
from llm.train.losses import lm_loss, token_logprobs
from llm.train.optimizer import learning_rate_schedule, make_optimizer, muon_dimensions, weight_decay_mask
from llm.train.step import StateLayout, init_train_state, jit_train_step, split_frozen, train_step

CFG = ModelConfig(family="llama", vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                  max_seq_len=32, tie_embeddings=False)


def _batch(n_rows=4, T=16, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, CFG.vocab_size, (n_rows, T + 1)).astype(np.int32)
    loss_mask = (rng.rand(n_rows, T) < np.linspace(0.2, 1.0, n_rows)[:, None]).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask}


def _split(batch, micro_batches):
    return {k: v.reshape(micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}


def _layout(optimizer, mesh, rules):
    abstract = jax.eval_shape(functools.partial(model.init_params, CFG), jax.random.key(0))
    return StateLayout.create(model.param_axes(CFG), abstract, optimizer, mesh, rules)


@pytest.mark.slow
def test_gradient_accumulation_is_exact_in_tokens():
    """Rows hold different numbers of target tokens, so a mean of micro-batch means would differ."""
    params = model.init_params(CFG, jax.random.key(0))
    sgd = optax.sgd(1.0)
    batch = _batch()
    assert len(set(batch["loss_mask"].sum(axis=1))) == 4  # every row holds a different number of targets
    results = []
    for micro_batches in (1, 2, 4):
        step = jax.jit(functools.partial(train_step, functools.partial(lm_loss, CFG), sgd))
        new_params, _, metrics = step(params, sgd.init(params), _split(batch, micro_batches), jax.random.key(1))
        results.append((new_params, metrics))
    for new_params, metrics in results[1:]:
        np.testing.assert_allclose(metrics["loss"], results[0][1]["loss"], rtol=1e-6)
        assert metrics["normalizer"] == batch["loss_mask"].sum()
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_params, results[0][0])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_sharded_steps_equal_single_device_steps(optimizer_name):
    config = base_config("tiny", sharding="fsdp_tp")
    config.optimizer.update(name=optimizer_name, warmup_steps=1, learning_rate=1e-2)
    optimizer = make_optimizer(config.optimizer, model.param_axes(CFG))
    rules = dict(config.sharding)
    batch = _split(_batch(n_rows=8), 2)

    single = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    runs = []
    for m in (single, mesh):
        layout = _layout(optimizer, m, rules)
        params, opt_state = init_train_state(functools.partial(model.init_params, CFG), optimizer, layout,
                                             jax.random.key(0))
        step = jit_train_step(functools.partial(lm_loss, CFG), optimizer, layout)
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


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_a_fixed_batch_is_memorised(optimizer_name):
    config = base_config("tiny")
    config.optimizer.update(name=optimizer_name, warmup_steps=5, total_steps=40, learning_rate=1e-2)
    optimizer = make_optimizer(config.optimizer, model.param_axes(CFG))
    layout = _layout(optimizer, sharding.make_mesh(dict(data=8)), dict(config.sharding))
    params, opt_state = init_train_state(functools.partial(model.init_params, CFG), optimizer, layout,
                                         jax.random.key(0))
    step = jit_train_step(functools.partial(lm_loss, CFG), optimizer, layout)
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
    # Update c warms up at lr * (c + 1) / warmup: the first update is not wasted at lr 0.
    assert [float(cosine(s)) for s in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert float(cosine(60)) == pytest.approx(0.55) and float(cosine(110)) == pytest.approx(0.1)
    opt.schedule = "wsd"
    wsd = learning_rate_schedule(opt)
    assert [float(wsd(s)) for s in (10, 40, 60, 85, 110)] == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1])


def test_weight_decay_and_muon_cover_exactly_the_matrices():
    gpt2 = ModelConfig(family="gpt2", vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, mlp_dim=64,
                       max_seq_len=16)
    mask = weight_decay_mask(model.param_axes(gpt2))
    assert mask["blocks"]["attn"]["q"] and mask["blocks"]["mlp"]["proj"] and mask["embed"] and mask["pos_embed"]
    assert not any([mask["blocks"]["attn"]["q_bias"], mask["blocks"]["attn_norm"]["scale"],
                    mask["blocks"]["mlp"]["fc_bias"], mask["final_norm"]["bias"]])
    dims = muon_dimensions(model.param_axes(gpt2))
    assert (dims["blocks"]["attn"]["q"].reduction_axis, dims["blocks"]["attn"]["q"].output_axis) == ((1,), (2, 3))
    assert (dims["blocks"]["attn"]["o"].reduction_axis, dims["blocks"]["attn"]["o"].output_axis) == ((1, 2), (3,))
    assert (dims["blocks"]["mlp"]["proj"].reduction_axis, dims["blocks"]["mlp"]["proj"].output_axis) == ((1,), (2,))
    assert dims["embed"] is None and dims["blocks"]["attn"]["q_bias"] is None and dims["final_norm"]["scale"] is None


def _sgd_layout_run(loss_fn, params_fn, axes, batch, mesh, frozen=(), optimizer=None, steps=1):
    optimizer = optimizer or optax.sgd(1.0)
    rules = dict(base_config("tiny", sharding="fsdp_tp").sharding)
    layout = StateLayout.create(axes, jax.eval_shape(params_fn, jax.random.key(0)), optimizer, mesh, rules, frozen)
    params, opt_state = init_train_state(params_fn, optimizer, layout, jax.random.key(0))
    initial = jax.device_get(params)  # a host copy: the step donates its inputs
    step = jit_train_step(loss_fn, optimizer, layout)
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    return jax.device_get(params), opt_state, jax.device_get(metrics), initial


@pytest.mark.slow
def test_a_masked_loss_gives_the_same_update_for_any_micro_batching_and_mesh():
    """1 micro-batch of 8 rows == 8 of 1 row == 2 of 4, on one device and meshes (8,1,1), (2,2,2).

    Rows hold different numbers of targets (one none), so a mean of micro-batch or
    per-device means would differ. A micro-batch must split over the mesh's batch
    axes, so 8 x 1 runs on one device and 2 x 4 on (2,2,2), whose batch axes are 4 wide.
    """
    batch = _batch(n_rows=8)
    batch["loss_mask"][0] = 0.0  # one micro-batch of the 8 has nothing to learn from
    counts = batch["loss_mask"].sum(axis=1)
    assert counts[0] == 0 and len(set(counts)) >= 6
    init = functools.partial(model.init_params, CFG)
    runs = {}
    for micro_batches, shape in [(1, (1, 1, 1)), (8, (1, 1, 1)), (1, (8, 1, 1)), (1, (2, 2, 2)), (2, (2, 2, 2))]:
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devices)
        runs[micro_batches, shape] = _sgd_layout_run(functools.partial(lm_loss, CFG), init, model.param_axes(CFG),
                                                     _split(batch, micro_batches), mesh)
    reference_params, _, reference_metrics, _ = runs[1, (1, 1, 1)]
    assert reference_metrics["normalizer"] == counts.sum()
    for params, _, metrics, _ in runs.values():
        np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), params, reference_params)


@pytest.mark.slow
def test_an_all_zero_mask_gives_loss_zero_and_gradient_zero():
    params = model.init_params(CFG, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"])
    loss, count, _ = lm_loss(CFG, params, batch)
    grads = jax.grad(lambda p: lm_loss(CFG, p, batch)[0])(params)
    assert float(loss) == 0.0 and float(count) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    sgd = optax.sgd(1.0)
    new_params, _, metrics = jax.jit(functools.partial(train_step, functools.partial(lm_loss, CFG), sgd))(
        params, sgd.init(params), _split(jax.device_get(batch), 2), jax.random.key(0))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, new_params, params)


def test_token_logprobs_are_the_log_softmax_at_each_target():
    params = model.init_params(CFG, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _batch(n_rows=2, T=8).items()}
    logits_BxTxV, _ = model.forward(CFG, params, batch["inputs"])
    probs_BxTxV = np.exp(logits_BxTxV - logits_BxTxV.max(-1, keepdims=True))
    probs_BxTxV /= probs_BxTxV.sum(-1, keepdims=True)
    expected_BxT = np.log(np.take_along_axis(probs_BxTxV, np.asarray(batch["targets"])[..., None], -1)[..., 0])
    logprobs_BxT = token_logprobs(CFG, params, batch)
    assert logprobs_BxT.dtype == jnp.float32
    np.testing.assert_allclose(logprobs_BxT, expected_BxT, rtol=1e-5, atol=1e-5)


def test_each_micro_batch_gets_its_own_key_folded_from_the_step_key():
    def noise_loss(params, microbatch, rng):
        draw = jax.random.uniform(rng)
        return jnp.sum(params["w"]) * 0.0, jnp.float32(1.0), {"draw": draw}

    sgd = optax.sgd(1.0)
    params = {"w": jnp.ones(2)}
    rng = jax.random.key(7)
    _, _, metrics = train_step(noise_loss, sgd, params, sgd.init(params), {"x": jnp.zeros((3, 1))}, rng)
    expected = sum(float(jax.random.uniform(jax.random.fold_in(rng, i))) for i in range(3))
    assert float(metrics["draw"]) == pytest.approx(expected, rel=1e-6)


HEAD_AXES = {"w": ("embed", None), "b": (None,)}


def _reward_params(key):
    """A backbone (the Transformer) and a scalar head on its last hidden state: a reward model's tree."""
    k1, k2 = jax.random.split(key)
    return {"backbone": model.init_params(CFG, k1),
            "head": {"w": 0.02 * jax.random.normal(k2, (CFG.n_embd, 1)), "b": jnp.zeros((1,))}}


def _reward_loss(params, batch, rng):
    hidden_BxTxD, _ = model.hidden_states(CFG, params["backbone"], batch["inputs"])
    score_B = (hidden_BxTxD[:, -1] @ params["head"]["w"])[:, 0] + params["head"]["b"][0]
    return jnp.sum(jnp.square(score_B - batch["target"])), jnp.float32(score_B.shape[0]), {}


@pytest.mark.slow
def test_a_frozen_backbone_stays_bit_identical_keeps_no_optimizer_state_and_shards_like_single_device():
    axes = {"backbone": model.param_axes(CFG), "head": HEAD_AXES}
    config = base_config("tiny")
    config.optimizer.update(warmup_steps=1, learning_rate=1e-2)
    optimizer = make_optimizer(config.optimizer, split_frozen(axes, ("backbone",))[0])
    rng = np.random.RandomState(0)
    batch = {"inputs": rng.randint(0, CFG.vocab_size, (1, 8, 16)).astype(np.int32),
             "target": rng.randn(1, 8).astype(np.float32)}
    runs = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices=devices)
        runs.append(_sgd_layout_run(_reward_loss, _reward_params, axes, batch, mesh, frozen=("backbone",),
                                    optimizer=optimizer, steps=3))
    (params, opt_state, metrics, initial), (sharded_params, _, sharded_metrics, sharded_initial) = runs
    jax.tree.map(np.testing.assert_array_equal, params["backbone"], initial["backbone"])
    jax.tree.map(np.testing.assert_array_equal, sharded_params["backbone"], sharded_initial["backbone"])
    assert not np.allclose(params["head"]["w"], initial["head"]["w"])
    state_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(opt_state)]
    assert state_paths and not any("backbone" in path for path in state_paths)
    head_size = CFG.n_embd + 1
    assert sum(x.size for x in jax.tree.leaves(opt_state)) <= 2 * head_size + 4  # Adam's two moments + counters
    np.testing.assert_allclose(sharded_metrics["loss"], metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded_params["head"], params["head"])


def test_split_frozen_names_a_missing_path():
    with pytest.raises(ValueError, match="frozen path 'backbone/nope'"):
        split_frozen({"backbone": {"embed": 1}, "head": 2}, ("backbone/nope",))
    trainable, fixed = split_frozen({"backbone": {"embed": 1, "blocks": 2}, "head": 3}, ("backbone/embed",))
    assert trainable == {"backbone": {"blocks": 2}, "head": 3} and fixed == {"backbone": {"embed": 1}}
