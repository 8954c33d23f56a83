"""A released model: one directory with the params, the model config and the tokenizer.

    save_release("release/", cfg, params, tokenizer)
    cfg, params, tokenizer = load_release("release/")     # or a Hugging Face GPT-2/Llama directory, or a .gguf

Files: `model.safetensors` (our params, keys are pytree paths such as
`blocks/attn/q`), `model_config.json` (the `ModelConfig` fields) and
`tokenizer.tiktoken` + `tokenizer.json`. Loading needs nothing from training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import gguf, hf, hf_tokenizer
from llm.config import ModelConfig
from llm.model import init_params
from llm.tokenizer import Tokenizer

FORMAT = "llm-release-v1"
# Our tokenizer beside exported Hugging Face files: its JSON side file must not be named tokenizer.json (HF's own).
HF_DIR_TOKENIZER = "llm_tokenizer.tiktoken"


def save_release(directory: str, cfg: ModelConfig, params: Any, tokenizer: Tokenizer) -> None:
    """Writes params (float32), config and tokenizer; the directory is loadable by `load_release`."""
    from safetensors.numpy import save_file

    if tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_vocab} ids but the model only {cfg.vocab_size} logits")
    os.makedirs(directory, exist_ok=True)
    flat = {_key(path): np.asarray(leaf, np.float32) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    save_file(flat, os.path.join(directory, "model.safetensors"), metadata={"format": FORMAT})
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump({"format": FORMAT, **dataclasses.asdict(cfg)}, f, indent=2)
    tokenizer.save(os.path.join(directory, "tokenizer.tiktoken"))


def load_release(directory: str, tokenizer: str | None = None, **model_overrides: Any) -> tuple[ModelConfig, Any, Tokenizer]:
    """Our release directory, a Hugging Face directory or hub id, or a GGUF file or hub id.

    `tokenizer` (a name or path) overrides the model's own.
    """
    from safetensors.numpy import load_file

    if gguf.is_gguf(directory):
        return gguf.load_gguf(directory, tokenizer=tokenizer, **model_overrides)
    if not os.path.exists(directory) and directory.count("/") == 1 and not directory.startswith("."):
        directory = hf.resolve_checkpoint_dir(directory)  # an owner/name hub id: its files, cached

    config_path = os.path.join(directory, "model_config.json")
    if not os.path.exists(config_path):
        if os.path.exists(os.path.join(directory, "config.json")):
            cfg, params = hf.load_hf(directory, **model_overrides)
            found = tokenizer or _hf_tokenizer(directory, cfg)
            return cfg, params, found if isinstance(found, Tokenizer) else Tokenizer.load(found)
        raise FileNotFoundError(f"{directory} holds neither a release (model_config.json) nor a Hugging Face config.json")
    with open(config_path) as f:
        fields = json.load(f)
    if fields.pop("format", None) != FORMAT:
        raise ValueError(f"{config_path} is not a {FORMAT} model config")
    cfg = ModelConfig(**{**fields, **model_overrides})
    flat = load_file(os.path.join(directory, "model.safetensors"))
    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves = []
    for path, shape in jax.tree_util.tree_leaves_with_path(expected):
        key = _key(path)
        if key not in flat or flat[key].shape != shape.shape:
            got = flat[key].shape if key in flat else "missing"
            raise ValueError(f"release parameter {key}: file has {got}, config expects {shape.shape}")
        leaves.append(jnp.asarray(flat[key]))
    params = jax.tree.unflatten(jax.tree.structure(expected), leaves)
    return cfg, params, Tokenizer.load(tokenizer or os.path.join(directory, "tokenizer.tiktoken"))


def _hf_tokenizer(directory: str, cfg: ModelConfig) -> str | Tokenizer:
    """The encoding of a Hugging Face directory: ours (an export), its tokenizer.json, GPT-2's for a GPT-2 vocabulary."""
    if os.path.exists(os.path.join(directory, HF_DIR_TOKENIZER)):
        return os.path.join(directory, HF_DIR_TOKENIZER)
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return hf_tokenizer.from_hf_directory(directory)
    if cfg.family == "gpt2" and cfg.vocab_size in (50257, 50304):
        return "gpt2"
    found = [name for name in ("tokenizer.model", "tokenizer_config.json")
             if os.path.exists(os.path.join(directory, name))]
    raise ValueError(
        f"{directory}: no tokenizer this project can read for a {cfg.family} model with {cfg.vocab_size} ids "
        f"(found {found or 'no tokenizer files'}; it reads tokenizer.tiktoken); pass the encoding explicitly, "
        f"e.g. load_release(dir, tokenizer='path/to/file.tiktoken')"
    )


def _key(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")
