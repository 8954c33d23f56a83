"""Sharding on 8 fake CPU devices: golden PartitionSpecs, and sharded == single-device math."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llm import model, sharding
from llm.config import ModelConfig, base_config, model_config

GOLDEN_TINY_SPECS = {
    "dp": {
        "blocks/attn/k": (None, None, None, None),
        "blocks/attn/o": (None, None, None, None),
        "blocks/attn/q": (None, None, None, None),
        "blocks/attn/v": (None, None, None, None),
        "blocks/attn_norm/scale": (None, None),
        "blocks/mlp/down": (None, None, None),
        "blocks/mlp/gate": (None, None, None),
        "blocks/mlp/up": (None, None, None),
        "blocks/mlp_norm/scale": (None, None),
        "embed": (None, None),
        "final_norm/scale": (None,),
    },
    "fsdp": {
        "blocks/attn/k": (None, "fsdp", None, None),
        "blocks/attn/o": (None, None, None, "fsdp"),
        "blocks/attn/q": (None, "fsdp", None, None),
        "blocks/attn/v": (None, "fsdp", None, None),
        "blocks/attn_norm/scale": (None, "fsdp"),
        "blocks/mlp/down": (None, None, "fsdp"),
        "blocks/mlp/gate": (None, "fsdp", None),
        "blocks/mlp/up": (None, "fsdp", None),
        "blocks/mlp_norm/scale": (None, "fsdp"),
        "embed": (None, "fsdp"),
        "final_norm/scale": ("fsdp",),
    },
    "fsdp_tp": {
        "blocks/attn/k": (None, "fsdp", "tensor", None),
        "blocks/attn/o": (None, "tensor", None, "fsdp"),
        "blocks/attn/q": (None, "fsdp", "tensor", None),
        "blocks/attn/v": (None, "fsdp", "tensor", None),
        "blocks/attn_norm/scale": (None, "fsdp"),
        "blocks/mlp/down": (None, "tensor", "fsdp"),
        "blocks/mlp/gate": (None, "fsdp", "tensor"),
        "blocks/mlp/up": (None, "fsdp", "tensor"),
        "blocks/mlp_norm/scale": (None, "fsdp"),
        "embed": ("tensor", "fsdp"),
        "final_norm/scale": ("fsdp",),
    },
}


def _flat_specs(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(spec) for path, spec in leaves}


@pytest.mark.parametrize("rule_set", sorted(GOLDEN_TINY_SPECS))
def test_golden_partition_specs_of_the_tiny_config(rule_set):
    config = base_config("tiny", sharding=rule_set)
    specs = sharding.param_specs(model.param_axes(model_config(config)), dict(config.sharding))
    assert _flat_specs(specs) == GOLDEN_TINY_SPECS[rule_set]


SMALL = {
    "llama": ModelConfig(family="llama", vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                         max_seq_len=32, tie_embeddings=False, rope_factor=4.0, rope_original_max_len=8),
    "gpt2": ModelConfig(family="gpt2", vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, mlp_dim=256,
                        max_seq_len=32),
}


def _loss(cfg, params, tokens_BxT):
    logits, _ = model.forward(cfg, params, tokens_BxT[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1).mean(), logits


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_forward_and_gradient_equal_single_device(family, mesh_shape):
    cfg = SMALL[family]
    rules = dict(base_config("tiny", sharding="fsdp_tp").sharding)
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)
    grad_fn = jax.value_and_grad(functools.partial(_loss, cfg), has_aux=True)

    single = jax.devices()[:1]
    params_1 = jax.device_put(model.init_params(cfg, jax.random.key(0)), single[0])
    (loss_1, logits_1), grads_1 = jax.jit(grad_fn)(params_1, tokens)

    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    params = sharding.init_sharded(functools.partial(model.init_params, cfg), model.param_axes(cfg), mesh, rules,
                                   jax.random.key(0))
    if mesh_shape[1] > 1:  # the parameters really are split, not silently replicated
        assert params["blocks"]["attn"]["q"].sharding.spec[1] == "fsdp"
        assert params["blocks"]["attn"]["q"].addressable_shards[0].data.shape[1] == cfg.n_embd // mesh_shape[1]
    batch = sharding.shard_batch(np.asarray(tokens), mesh, rules)
    assert batch.sharding.spec == P(("data", "fsdp"), None)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    with sharding.use_rules(mesh, rules):
        step = jax.jit(grad_fn, in_shardings=(param_shardings, batch.sharding),
                       out_shardings=((NamedSharding(mesh, P()), None), param_shardings))
        (loss, logits), grads = step(params, batch)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, params_1)
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
    np.testing.assert_allclose(logits, logits_1, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, grads_1)
    assert grads["blocks"]["mlp"]["fc" if family == "gpt2" else "gate"].sharding.spec == P(
        None, "fsdp", "tensor"
    )


def test_mesh_must_match_the_device_count():
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        sharding.make_mesh(dict(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="8 is not divisible by 3"):
        sharding.make_mesh(dict(data=-1, fsdp=3, tensor=1))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh(dict(data=8, pipeline=1))
    assert dict(sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2)).shape) == dict(data=2, fsdp=2, tensor=2)


def test_parameter_that_cannot_split_evenly_is_named():
    cfg = model_config(base_config("tiny"))
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": 4097})
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = dict(base_config("tiny", sharding="fsdp_tp").sharding)
    with pytest.raises(ValueError, match=r"parameter \['embed'\] of shape \(4097, 128\): dimension 0"):
        sharding.init_sharded(functools.partial(model.init_params, cfg), model.param_axes(cfg), mesh, rules,
                              jax.random.key(0))


def test_rules_naming_unknown_axes_are_rejected():
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        sharding.check_rules({"embd": ("fsdp",)})
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        sharding.check_rules({"embed": ("model",)})
