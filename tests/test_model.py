"""The Transformer: parameter counts, KV-cache decoding, document masking, execution options."""

import dataclasses
import functools
import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import model
from llm.config import ModelConfig, base_config, load_config, model_config
from llm.cpu_layout import CPU_LAYOUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = {
    "llama": ModelConfig(family="llama", vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                         max_seq_len=64, rope_factor=8.0, rope_original_max_len=16, tie_embeddings=False),
    "gpt2": ModelConfig(family="gpt2", vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, mlp_dim=256,
                        max_seq_len=64),
}


def _random_params(cfg, seed=0):
    """Initial params with every leaf perturbed, so zero biases and unit norms can't hide a bug."""
    params = model.init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize(
    "config_file, expected",
    [("gpt2_124m", 124_439_808), ("llama31_8b", 8_030_261_248), ("llama32_1b", 1_235_814_400)],
)
def test_full_size_parameter_counts_from_abstract_init(config_file, expected):
    cfg = model_config(load_config(os.path.join(ROOT, "configs", f"{config_file}.py")))
    shapes = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected
    assert model.count_params(cfg) == expected


def test_full_size_forward_shape_checks_without_allocating():
    cfg = model_config(load_config(os.path.join(ROOT, "configs", "llama31_8b.py")))
    params = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((2, 4096), jnp.int32)
    logits, _ = jax.eval_shape(functools.partial(model.forward, cfg), params, tokens)
    assert logits.shape == (2, 4096, 128_256) and logits.dtype == jnp.float32


def _model_decoder(cfg, params, batch, max_len):
    """The model's own cache path (what training-time rollouts and evals use): `forward` over a stacked KVCache."""
    return jax.jit(functools.partial(model.forward, cfg)), params, model.init_cache(cfg, batch, max_len)


def _engine_cpu_decoder(cfg, params, batch, max_len):
    """The sampling engine's CPU layout: per-layer blocks, an untied [D, V] head, its per-layer cache."""
    cfg, params = CPU_LAYOUT.place(cfg, params)
    assert isinstance(params["blocks"], list)

    def step(params, tokens_BxT, *, positions_BxT, cache):
        x_BxTxD, cache = CPU_LAYOUT.hidden_states(cfg, params, tokens_BxT, positions_BxT, cache)
        return model.output_logits(cfg, params, x_BxTxD), cache

    return jax.jit(step), params, CPU_LAYOUT.empty_cache(cfg, batch, max_len)


@pytest.mark.parametrize("layout", ["stacked_scan", "stacked_unrolled", "engine_cpu"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_decode_matches_full_forward_at_every_position(family, layout):
    cfg = dataclasses.replace(SMALL[family], scan_layers=layout != "stacked_unrolled")
    params = _random_params(cfg)
    B, T = 2, 20
    tokens = jax.random.randint(jax.random.key(3), (B, T), 0, cfg.vocab_size)
    full_logits, _ = model.forward(cfg, params, tokens)
    decoder = _engine_cpu_decoder if layout == "engine_cpu" else _model_decoder
    step, params, cache = decoder(cfg, params, B, max_len=32)

    # Rows start decoding at different positions; the prefill of the shorter row carries
    # padding past its prompt, which decode must overwrite before anything attends to it.
    prompt_lens = np.array([5, 9])
    prefill = np.array(tokens[:, : prompt_lens.max()])
    prefill[0, prompt_lens[0]:] = 0
    positions = jnp.broadcast_to(jnp.arange(prefill.shape[1]), prefill.shape)
    logits, cache = step(params, prefill, positions_BxT=positions, cache=cache)
    for b in range(B):
        np.testing.assert_allclose(logits[b, : prompt_lens[b]], full_logits[b, : prompt_lens[b]], atol=1e-4)

    # Copies of rows (n samples of a prompt) decode on from their prompt's cache.
    rows = np.array([1, 0, 1])
    cache = model.cache_rows(cache, rows)
    assert model.cache_length(cache) == 32
    B, tokens, full_logits, prompt_lens = len(rows), tokens[rows], full_logits[rows], prompt_lens[rows]
    for offset in range(T - prompt_lens.max()):
        pos = prompt_lens + offset
        next_tokens = np.asarray(tokens)[np.arange(B), pos][:, None]
        logits, cache = step(params, next_tokens, positions_BxT=pos[:, None], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full_logits[np.arange(B), pos], atol=1e-4)


def test_one_batched_cache_write_equals_writing_rows_one_by_one():
    """64 rows (a GRPO rollout batch) of 3 tokens each at scattered positions, in one `KVCache.write`."""
    cfg = SMALL["llama"]
    B, T, K, H, S = 64, 3, cfg.n_kv_head, cfg.head_dim, 32
    keys = jax.random.split(jax.random.key(7), 4)
    cache = model.KVCache(*(jax.random.normal(k, (cfg.n_layer, B, K, S, H)) for k in keys[:2]))
    new_k, new_v = (jax.random.normal(k, (B, T, K, H)) for k in keys[2:])
    starts = np.random.RandomState(0).randint(0, S - T + 1, B)
    positions = starts[:, None] + np.arange(T)
    written = jax.jit(lambda c, k, v, p: c.write(1, k, v, p))(cache, new_k, new_v, jnp.asarray(positions))
    expected_k, expected_v = np.array(cache.k_LxBxKxSxH), np.array(cache.v_LxBxKxSxH)
    for b in range(B):
        for t in range(T):
            expected_k[1, b, :, positions[b, t]] = new_k[b, t]
            expected_v[1, b, :, positions[b, t]] = new_v[b, t]
    np.testing.assert_array_equal(written.k_LxBxKxSxH, expected_k)
    np.testing.assert_array_equal(written.v_LxBxKxSxH, expected_v)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_segment_ids_isolate_packed_documents(family):
    cfg = SMALL[family]
    params = _random_params(cfg)
    doc_a = jax.random.randint(jax.random.key(1), (1, 7), 0, cfg.vocab_size)
    doc_b = jax.random.randint(jax.random.key(2), (1, 9), 0, cfg.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 7 + [2] * 9])
    positions = jnp.array([list(range(7)) + list(range(9))])
    packed_logits, _ = model.forward(cfg, params, packed, positions_BxT=positions, segment_ids_BxT=segments)
    logits_a, _ = model.forward(cfg, params, doc_a)
    logits_b, _ = model.forward(cfg, params, doc_b)
    np.testing.assert_allclose(packed_logits[:, :7], logits_a, atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, 7:], logits_b, atol=1e-5)
    unmasked_logits, _ = model.forward(cfg, params, packed, positions_BxT=positions)
    assert not np.allclose(unmasked_logits[:, 7:], logits_b, atol=1e-3)


def _loss(cfg, params, tokens):
    logits, _ = model.forward(cfg, params, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scan_unrolled_and_remat_give_the_same_loss_and_gradients(family):
    base = SMALL[family]
    params = _random_params(base)
    tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, base.vocab_size)
    ref_loss, ref_grads = jax.value_and_grad(functools.partial(_loss, base))(params, tokens)
    for options in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots", scan_layers=False)]:
        cfg = dataclasses.replace(base, **options)
        loss, grads = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))(params, tokens)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_qk_norm_and_logit_softcap():
    cfg = dataclasses.replace(SMALL["llama"], qk_norm=True, logit_softcap=2.0)
    params = _random_params(cfg)
    assert params["blocks"]["attn"]["q_norm"].shape == (cfg.n_layer, cfg.head_dim)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, cfg.vocab_size)
    logits, _ = model.forward(cfg, params, tokens)
    assert float(jnp.abs(logits).max()) < 2.0
    uncapped, _ = model.forward(dataclasses.replace(cfg, logit_softcap=0.0), params, tokens)
    np.testing.assert_allclose(logits, 2.0 * jnp.tanh(uncapped / 2.0), atol=1e-5)
    # Scaling a head's query by any factor must not change attention once queries are normalised.
    scaled = jax.tree.map(lambda x: x, params)
    scaled["blocks"]["attn"]["q"] = params["blocks"]["attn"]["q"] * 3.0
    np.testing.assert_allclose(model.forward(cfg, scaled, tokens)[0], logits, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(SMALL["llama"], dtype="bfloat16")
    params = _random_params(cfg)
    tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, cfg.vocab_size)
    logits, _ = jax.jit(functools.partial(model.forward, cfg))(params, tokens)
    ref, _ = model.forward(dataclasses.replace(cfg, dtype="float32"), params, tokens)
    assert logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=100, n_head=3), "n_embd=100 is not divisible by model.n_head=3"),
        (dict(n_head=4, n_kv_head=3), "n_head=4 is not divisible by model.n_kv_head=3"),
        (dict(family="mamba"), "model.family must be one of"),
        (dict(remat="sometimes"), "model.remat must be one of"),
    ],
)
def test_invalid_model_configs_fail_before_anything_compiles(fields, message):
    config = base_config("tiny")
    config.model.update(fields)
    with pytest.raises(ValueError, match=message):
        model_config(config)


def test_sequence_longer_than_context_is_a_clear_error():
    cfg = SMALL["gpt2"]
    params = model.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        model.forward(cfg, params, jnp.zeros((1, 65), jnp.int32))


def test_every_config_file_loads_and_opens_with_its_command():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert len(files) >= 7
    for path in files:
        config = load_config(path)
        if "model" in config:  # a training config (refinement configs have no model)
            model_config(config)
        with open(path) as f:
            docstring = f.read().split('"""')[1]
        assert f"--config configs/{os.path.basename(path)}" in docstring, path


def test_command_line_overrides_apply_and_typos_are_errors():
    path = os.path.join(ROOT, "configs", "tiny.py")
    config = load_config(path, ["--config.model.n_layer=2", "--config.mesh.fsdp=4", "--config.model.dtype=bfloat16"])
    assert (config.model.n_layer, config.mesh.fsdp, config.model.dtype) == (2, 4, "bfloat16")
    with pytest.raises(ValueError, match="unknown config key 'model.n_layr'.*did you mean 'model.n_layer'"):
        load_config(path, ["--config.model.n_layr=2"])
    with pytest.raises(ValueError, match="unknown config key 'optimizer.lr'"):
        load_config(path, ["--config.optimizer.lr=0.1"])
