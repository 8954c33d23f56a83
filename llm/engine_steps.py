"""The sampling engine's device side: the compiled prefill and decode steps, over a `Layout`.

One step function serves prefill (all prompt tokens at once) and decode (one
token per row): run the model over the new tokens with the cache, then sample the
next token of every row on device (`llm.sampling`). A prompt is prefilled once
however many samples it has; they start from copies of its cache rows. Decode
steps feed themselves (each row's sample and next position stay on device), so
the host can queue step k+1 before it reads step k's tokens; a forced token
(a tool's output) comes in by overriding that row's input. The sampling knobs
are traced values, so changing them never recompiles, except top-k, whose k is a
compile-time constant.

How a step reads the model is its layout: the model's own stacked layout
(`STACKED`) on accelerators, `llm.cpu_layout`'s on CPU. `default_layout` picks
one by backend; nothing else here branches on the platform.

Shape legend: U prompt rows, B batch rows (prompts x samples), T new tokens, S cache length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from llm import model
from llm.config import ModelConfig
from llm.cpu_layout import CPU_LAYOUT
from llm.sampling import sample_tokens


# ----------------------------------------------------------------------------- layouts


class Layout(Protocol):
    """How the steps read the model: `place` once per engine, the rest inside the compiled steps (hashable)."""

    def place(self, cfg: ModelConfig, params) -> tuple[ModelConfig, Any]: ...

    def hidden_states(self, cfg: ModelConfig, params, tokens_BxT, positions_BxT, cache) -> tuple[jax.Array, Any]: ...

    def empty_cache(self, cfg: ModelConfig, batch: int, length: int) -> Any: ...

    def compiler_options(self, batch: int) -> tuple[tuple[str, str], ...]: ...


@dataclasses.dataclass(frozen=True)
class StackedLayout:
    """The training layout as it is: stacked blocks, the model's `KVCache`, XLA's default options."""

    def place(self, cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
        return cfg, params

    def hidden_states(self, cfg: ModelConfig, params, tokens_BxT, positions_BxT, cache) -> tuple[jax.Array, Any]:
        return model.hidden_states(cfg, params, tokens_BxT, positions_BxT=positions_BxT, cache=cache)

    def empty_cache(self, cfg: ModelConfig, batch: int, length: int) -> model.KVCache:
        return model.init_cache(cfg, batch, length)

    def compiler_options(self, batch: int) -> tuple[tuple[str, str], ...]:
        return ()


STACKED = StackedLayout()


def default_layout() -> Layout:
    """The layout for the backend JAX runs on: the CPU's own (`llm.cpu_layout`), else the model's."""
    return CPU_LAYOUT if jax.default_backend() == "cpu" else STACKED


# ----------------------------------------------------------------------------- the jitted step


def _step(cfg: ModelConfig, layout: Layout, params, cache, tokens_UxT, positions_UxT, last_U, seen_UxV, key, step,
          controls, top_k, rows_B=None):
    """Runs the new tokens through the model and samples each row's next token.

    `last_U` indexes each row's last real token within T (prefill rows are right-padded).
    `rows_B`, at prefill, says which of the U prompt rows each of the B sampled rows
    continues: the n samples of a prompt share its one prefill and output head, then
    get copies of its logits and cache rows. Without it the rows are sampled as they
    are (B = U, as at every decode step).
    Returns (next token, its log-probability, cache, seen-token mask or None) for B rows.
    """
    x_UxTxD, cache = layout.hidden_states(cfg, params, tokens_UxT, positions_UxT, cache)
    U, T = tokens_UxT.shape
    x_UxD = x_UxTxD[jnp.arange(U), last_U]  # only each row's last position is sampled from
    if seen_UxV is not None:  # tracked only under a repetition penalty
        real_UxT = jnp.arange(T)[None, :] <= last_U[:, None]
        seen_UxV = seen_UxV.at[jnp.arange(U)[:, None], tokens_UxT].max(real_UxT)
    logits_UxV = model.output_logits(cfg, params, x_UxD[:, None])[:, 0]
    if rows_B is None:
        logits_BxV, seen_BxV = logits_UxV, seen_UxV
    else:
        logits_BxV, seen_BxV = jax.tree.map(lambda a: a[rows_B], (logits_UxV, seen_UxV))
        cache = model.cache_rows(cache, rows_B)
    next_B = sample_tokens(jax.random.fold_in(key, step), logits_BxV, seen_BxV=seen_BxV, top_k=top_k, **controls)
    # log p(next) = logit - logsumexp: two reductions, no [B, V] log-softmax written out.
    logprob_B = jnp.take_along_axis(logits_BxV, next_B[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits_BxV, axis=-1)
    return next_B, logprob_B, cache, seen_BxV


def _prefill(cfg: ModelConfig, layout: Layout, params, tokens_UxP, positions_UxP, last_U, key, controls, top_k,
             cache_len, track_seen, rows_B):
    """The first step: an empty cache of `cache_len` slots per prompt row, the prompts run through it, first samples.

    The cache (and, under a repetition penalty, the seen-token mask) is made inside
    the compiled step, so nothing is copied in or donated, whatever the batch becomes.
    """
    U = tokens_UxP.shape[0]
    cache = layout.empty_cache(cfg, U, cache_len)
    seen_UxV = jnp.zeros((U, cfg.vocab_size), bool) if track_seen else None
    return _step(cfg, layout, params, cache, tokens_UxP, positions_UxP, last_U, seen_UxV, key, 0, controls, top_k, rows_B)


def _decode(cfg: ModelConfig, layout: Layout, params, cache, seen_BxV, inputs, overrides_Bx2, key, controls, top_k):
    """One decode step whose inputs are the previous step's outputs, so steps can be queued ahead of the host.

    inputs = (token_B, position_B, step): by default each row feeds the token it just
    sampled at the next position. `overrides_Bx2` (token, position; position -1 where
    unused) replaces a row's input: a forced tool-output token. Rows that run past the
    cache (finished ones) stay parked on its last slot, which no live row attends to.
    Returns (sampled token, its log-probability, cache, seen mask, next step's inputs).
    """
    token_B, position_B, step = inputs
    override_B = overrides_Bx2[:, 1] >= 0
    token_B = jnp.where(override_B, overrides_Bx2[:, 0], token_B)
    position_B = jnp.where(override_B, overrides_Bx2[:, 1], position_B)
    next_B, logprob_B, cache, seen_BxV = _step(
        cfg, layout, params, cache, token_B[:, None], position_B[:, None], jnp.zeros_like(position_B), seen_BxV, key,
        step, controls, top_k,
    )
    S = model.cache_length(cache)
    return next_B, logprob_B, cache, seen_BxV, (next_B, jnp.minimum(position_B + 1, S - 1), step + 1)



# ----------------------------------------------------------------------------- compiled once per process
# Built once per config, layout and process, so engines made afresh (the training loop
# makes one per sample) reuse the compilations instead of compiling again.


@functools.cache
def prefill_step(cfg: ModelConfig, layout: Layout) -> Callable:
    """`_prefill` jitted; top-k, the cache length and whether to track seen tokens are compile-time constants."""
    return jax.jit(functools.partial(_prefill, cfg, layout), static_argnames=("top_k", "cache_len", "track_seen"))


@functools.cache
def decode_step(cfg: ModelConfig, layout: Layout, options: tuple[tuple[str, str], ...]) -> Callable:
    """`_decode` jitted with the cache and seen mask donated, under `options` (a layout's `compiler_options`)."""
    return jax.jit(functools.partial(_decode, cfg, layout), donate_argnums=(1, 2), static_argnames="top_k",
                   compiler_options=dict(options) if options else None)
