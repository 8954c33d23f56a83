"""Parity with Hugging Face `transformers`: import, forward, export, reload."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from llm import hf, model


def _randomize(torch_model):
    """Every weight random (biases and norm scales too), so a mis-mapped tensor cannot hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.normal_(0.0, 0.2 if p.ndim == 1 else 0.05)
            if p.ndim == 1:
                p.add_(1.0 if p.shape[0] == torch_model.config.hidden_size else 0.0)
    return torch_model.eval()


def _gpt2():
    config = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    return _randomize(transformers.GPT2LMHeadModel(config))


def _llama(tie: bool, rope_scaling: bool):
    rope = dict(rope_type="default", rope_theta=10_000.0)
    if rope_scaling:
        # A short original context so all three frequency bands of the Llama-3.1 rule occur.
        rope = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rope_parameters=rope,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )
    return _randomize(transformers.LlamaForCausalLM(config))


CASES = {
    "gpt2": _gpt2,
    "llama_gqa_scaled_rope_tied": lambda: _llama(tie=True, rope_scaling=True),
    "llama_gqa_scaled_rope_untied": lambda: _llama(tie=False, rope_scaling=True),
    "llama_default_rope_untied": lambda: _llama(tie=False, rope_scaling=False),
}


def _torch_logits(torch_model, tokens):
    with torch.no_grad():
        return torch_model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers_and_export_reloads(case, tmp_path):
    torch_model = CASES[case]()
    torch_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tokens = np.random.RandomState(0).randint(0, torch_model.config.vocab_size, (2, 40))
    reference = _torch_logits(torch_model, tokens)

    cfg, params = hf.load_hf(str(tmp_path / "hf"))
    logits, _ = jax.jit(model.forward, static_argnums=0)(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-4, rtol=0)

    hf.save_hf(cfg, params, str(tmp_path / "ours"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(reloaded) is type(torch_model)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), reference, atol=1e-5, rtol=0)


def test_sharded_safetensors_index_is_followed(tmp_path):
    torch_model = _llama(tie=False, rope_scaling=True)
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cfg, params = hf.load_hf(str(tmp_path))
    tokens = np.arange(12)[None] % 101
    logits, _ = model.forward(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(torch_model, tokens), atol=1e-4, rtol=0)


def test_unsupported_or_inconsistent_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 'bert'"):
        hf.model_config_from_hf({"model_type": "bert"})
    torch_model = _gpt2()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    with pytest.raises(KeyError, match="no tensor 'h.3.attn.c_attn.weight'"):
        hf.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_inner": 128}))
    with pytest.raises(ValueError, match=r"\['blocks'\]\['mlp'\]\['fc'\]: checkpoint \(3, 64, 256\), config \(3, 64, 128\)"):
        hf.load_hf(str(tmp_path))


def test_missing_local_directory_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        hf.load_hf(str(tmp_path / "nope"))
