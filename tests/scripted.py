"""A real GPT-2 whose hand-set weights make it say a given script: deterministic output for engine tests."""

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.config import ModelConfig
from llm.tokenizer import Tokenizer

TOKENIZER = Tokenizer.load("gpt2")


def scripted_gpt2(script: dict[int, int], max_seq_len: int = 64, strength: float = 8.0):
    """A real GPT-2 whose weights make the token after position p be `script[p]`.

    Blocks are zeroed, so the residual stream is embed[token] + pos_embed[p]; putting a
    large multiple of embed[script[p]] in pos_embed[p] makes the tied output head pick it.
    """
    cfg = ModelConfig(family="gpt2", vocab_size=TOKENIZER.n_vocab, n_layer=1, n_embd=128, n_head=2, n_kv_head=2,
                      mlp_dim=8, max_seq_len=max_seq_len)
    params = jax.tree.map(jnp.zeros_like, model.init_params(cfg, jax.random.key(0)))
    embed = np.asarray(jax.random.normal(jax.random.key(1), (cfg.vocab_size, cfg.n_embd))) / np.sqrt(cfg.n_embd)
    pos_embed = np.zeros((max_seq_len, cfg.n_embd), np.float32)
    for position, token in script.items():
        pos_embed[position] = strength * embed[token]
    params |= {"embed": jnp.asarray(embed), "pos_embed": jnp.asarray(pos_embed),
               "final_norm": {"scale": jnp.ones(cfg.n_embd), "bias": jnp.zeros(cfg.n_embd)}}
    return cfg, params


def script(prompt, continuation):
    """{position: next token} so that the model continues `prompt` with `continuation` (None entries are forced)."""
    return {len(prompt) - 1 + i: t for i, t in enumerate(continuation) if t is not None}
