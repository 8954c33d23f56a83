"""A reward model: the policy's Transformer (the backbone) and a scalar head on its final hidden state at the last token.

    params = {"backbone": model params, "head": {"kernel": [D], "bias": []}}
    rewards_B = scores(cfg, params, tokens_BxT, lengths_B)
    rm = RewardModel.load("runs/reward/release"); rm.score([[user, assistant], ...])  -> [N] floats

As in InstructGPT (Ouyang et al. 2022, section 3.5): the language model with its
output head replaced by a linear map to one number, read at the last token of the
conversation (here the token that closes the assistant's turn, so the reward sees
the whole reply and that it ended). Departure: the head starts at zero (every
reward 0, loss log 2), not random; training moves it first, then the backbone.

A release is the backbone's release (`save_release`: `load_release` opens it as a
language model too) plus `reward_head.safetensors`.

Shape legend: B conversations, T tokens, D width.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.config import ModelConfig
from llm.release import load_release, save_release
from llm.tokenizer import Tokenizer

HEAD_FILE = "reward_head.safetensors"


def init_head(cfg: ModelConfig) -> dict[str, jax.Array]:
    return {"kernel": jnp.zeros((cfg.n_embd,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def head_axes() -> dict[str, tuple]:
    return {"kernel": ("embed",), "bias": ()}


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    return {"backbone": model.param_axes(cfg), "head": head_axes()}


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
    """A fresh backbone and a zero head (stages that start from a release replace the backbone)."""
    return {"backbone": model.init_params(cfg, rng), "head": init_head(cfg)}


def scores(cfg: ModelConfig, params: Mapping[str, Any], tokens_BxT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """Float32 reward of each row: the head on the final hidden state at position `lengths_B - 1`.

    Attention is causal, so what follows a row's last token (padding) cannot change its reward.
    """
    hidden_BxTxD, _ = model.hidden_states(cfg, params["backbone"], tokens_BxT)
    last_BxD = jnp.take_along_axis(hidden_BxTxD, (lengths_B - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    head = params["head"]
    return jnp.einsum("bd,d->b", last_BxD.astype(jnp.float32), head["kernel"]) + head["bias"]


def save(directory: str, cfg: ModelConfig, params: Mapping[str, Any], tokenizer: Tokenizer) -> None:
    """The backbone as a release and the head beside it; `RewardModel.load` reads both."""
    from safetensors.numpy import save_file

    save_release(directory, cfg, params["backbone"], tokenizer)
    save_file({k: np.asarray(v, np.float32) for k, v in params["head"].items()},
              os.path.join(directory, HEAD_FILE))


def load(directory: str) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """(config, {"backbone", "head"} host params, tokenizer) of a reward-model release."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, HEAD_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a reward-model release: it has no {HEAD_FILE} "
                                f"(train one with `python -m launch.reward`)")
    cfg, backbone, tokenizer = load_release(directory)
    head = load_file(path)
    if set(head) != {"kernel", "bias"} or head["kernel"].shape != (cfg.n_embd,):
        raise ValueError(f"{path}: expected a kernel of shape ({cfg.n_embd},) and a scalar bias, got "
                         f"{ {k: v.shape for k, v in head.items()} }")
    return cfg, {"backbone": backbone, "head": head}, tokenizer


class RewardModel:
    """A loaded reward model that scores whole conversations (each ending with the assistant's reply)."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], tokenizer: Tokenizer, device: Any = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.params = jax.device_put(params, device or jax.local_devices()[0])
        self._scores = jax.jit(lambda p, t, n: scores(cfg, p, t, n))

    @classmethod
    def load(cls, directory: str) -> RewardModel:
        return cls(*load(directory))

    def score(self, conversations: Sequence[Sequence[Mapping[str, Any]]], batch_size: int = 16, *,
              keep_end: bool = False) -> np.ndarray:
        """The reward of each conversation, rendered in the tokenizer's chat format: float32 [N].

        Rows are padded to the next power of two (at most the context), so a few
        shapes are compiled. A conversation longer than the context is an error
        naming it, never silently cut, unless `keep_end`: then its last
        `max_seq_len` tokens are scored (the reply, and as much before it as fits;
        RL scores its samples so, rather than stop midway).
        """
        rendered = [self.tokenizer.render_conversation(list(c))[0] for c in conversations]
        for i, ids in enumerate(rendered):
            if len(ids) > self.cfg.max_seq_len:
                if keep_end:
                    rendered[i] = ids[-self.cfg.max_seq_len:]
                    continue
                raise ValueError(f"conversation {i} is {len(ids)} tokens, longer than the reward model's context "
                                 f"of {self.cfg.max_seq_len}")
        out = []
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start:start + batch_size]
            width = min(self.cfg.max_seq_len, 1 << max(len(ids) for ids in chunk).bit_length())
            tokens = np.zeros((batch_size, width), np.int32)
            lengths = np.ones((batch_size,), np.int32)
            for j, ids in enumerate(chunk):
                tokens[j, :len(ids)], lengths[j] = ids, len(ids)
            out.append(np.asarray(self._scores(self.params, tokens, lengths))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
