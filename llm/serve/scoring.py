"""Log-probabilities of given tokens (`/v1/completions` with `echo` and `logprobs`): the model read once, no sampling.

Each token's log-probability comes from `llm.train.losses.token_logprobs`, the function
`launch.eval`'s multiple-choice scoring reads the model through (`llm.evals.multiple_choice`),
over the same inputs/targets/positions/segment_ids arrays, so the values are the
evaluator's. The first token has none (OpenAI answers null there). Lengths are bucketed
to powers of two so a few compiles cover every request.

Shape legend: W padded width (tokens - 1 inputs), V vocabulary, K top log-probabilities.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.config import ModelConfig
from llm.serve.protocol import MAX_LOGPROBS
from llm.train.losses import token_logprobs


@functools.partial(jax.jit, static_argnums=(0,))
def _scores(cfg: ModelConfig, params: Any, batch: dict):
    logprobs_1xW = token_logprobs(cfg, params, batch)
    logits_1xWxV, _ = model.forward(cfg, params, batch["inputs"], positions_BxT=batch["positions"],
                                    segment_ids_BxT=batch["segment_ids"])
    top_1xWxK, ids_1xWxK = jax.lax.top_k(jax.nn.log_softmax(logits_1xWxV.astype(jnp.float32), axis=-1), MAX_LOGPROBS)
    return logprobs_1xW, top_1xWxK, ids_1xWxK


def _width(n: int, cap: int) -> int:
    return min(max(16, 1 << max(0, n - 1).bit_length()), cap)


def score_tokens(cfg: ModelConfig, params: Any, tokens: Sequence[int], top: int = 0
                 ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """(log-probability of each token given those before it, None first; the `top` most likely ids at each)."""
    n = len(tokens) - 1
    width = _width(max(n, 1), cfg.max_seq_len)
    ids = np.asarray(tokens, np.int32)
    batch = {name: np.zeros((1, width), np.int32) for name in ("inputs", "targets", "positions", "segment_ids")}
    batch["inputs"][0, :n], batch["targets"][0, :n] = ids[:-1], ids[1:]
    batch["positions"][0, :n], batch["segment_ids"][0, :n] = np.arange(n), 1
    # Always the most the API allows (MAX_LOGPROBS): one compile per width, not per `logprobs` value.
    logprobs_1xW, top_1xWxK, ids_1xWxK = _scores(cfg, params, batch)
    values = [None, *(float(v) for v in np.asarray(logprobs_1xW)[0, :n])]
    top_values, top_ids = np.asarray(top_1xWxK)[0, :n, :top], np.asarray(ids_1xWxK)[0, :n, :top]
    # The first token's top entries stay empty: nothing predicts it.
    tops = [[], *([(int(i), float(v)) for i, v in zip(top_ids[t], top_values[t])] for t in range(n))]
    return values, tops
