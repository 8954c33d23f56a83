"""Parity with Hugging Face `transformers`: import, forward, export, reload."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from hf_models import gpt2, llama
from llm import hf, model
from llm.release import load_release


CASES = {
    "gpt2": gpt2,
    "llama_gqa_scaled_rope_tied": lambda: llama(tie=True, rope_scaling=True),
    "llama_gqa_scaled_rope_untied": lambda: llama(tie=False, rope_scaling=True),
    "llama_default_rope_untied": lambda: llama(tie=False, rope_scaling=False),
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
    torch_model = llama(tie=False, rope_scaling=True)
    torch_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cfg, params = hf.load_hf(str(tmp_path))
    tokens = np.arange(12)[None] % 101
    logits, _ = model.forward(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(logits), _torch_logits(torch_model, tokens), atol=1e-4, rtol=0)


def test_unsupported_or_inconsistent_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 'bert'"):
        hf.model_config_from_hf({"model_type": "bert"})
    torch_model = gpt2()
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


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not fetch 'openai-community/gpt2'.*Offline\\?"):
        hf.load_hf("openai-community/gpt2")
    with pytest.raises(RuntimeError, match="could not fetch 'openai-community/gpt2'.*Offline\\?"):
        load_release("openai-community/gpt2")  # what init_from and launch.sample call
