"""Chunked cross-entropy: `log_softmax(output_logits(x))[targets]` without the [B, T, V] logits, in either pass.

Implements the blockwise cross-entropy of Levanter and MaxText's vocabulary
tiling (Liger Kernel's fused linear cross-entropy, Hsu et al. 2024, is the same
idea as one Triton kernel) as a `jax.custom_vjp` over chunks of sequence
positions; `chunked_logprobs` states how and where it departs. `loss_chunk`
resolves a config's chunk length; `losses.token_logprobs` calls this when it is > 0.

Shape legend: B batch, T sequence, V vocabulary, D model width, C positions per chunk, N chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llm import model
from llm.config import ModelConfig
from llm.sharding import constrain

AUTO_LOSS_CHUNK = 128  # `model.loss_chunk=-1` on GPU/TPU: [B, 128, V] f32 logits at a time


def loss_chunk(cfg: ModelConfig) -> int:
    """Sequence positions per chunk of the output head's log-softmax (`model.loss_chunk`, -1 resolved); 0: none."""
    if cfg.loss_chunk >= 0:
        return cfg.loss_chunk
    # XLA:CPU is compute-bound on the head and has the memory: the recomputed product would only cost time there.
    return 0 if jax.default_backend() == "cpu" else AUTO_LOSS_CHUNK


def chunked_logprobs(cfg: ModelConfig, head: jax.Array, x_BxTxD: jax.Array, targets_BxT: jax.Array,
                     chunk: int) -> jax.Array:
    """`log_softmax(output_logits(x))[targets]` over `chunk` sequence positions at a time, never [B, T, V] at once.

    The blockwise cross-entropy of Levanter and MaxText's vocabulary tiling (and
    Liger's fused linear cross-entropy): `head` is the output table (`embed` [V, D]
    when tied, else `lm_head` [D, V]). The forward keeps, per chunk, only the
    target logit and the log-normaliser; the custom VJP recomputes each chunk's
    logits (one more head product per step) and gives the gradients of `x` and
    `head`, so the loss's memory is O(B * chunk * V) in both passes. Chunks run
    along the sequence so the batch axis keeps its sharding; a last, short chunk
    is zero-padded (padded rows get a zero cotangent). The logits are
    `model.output_logits`' (f32, soft-capped); departure: with bf16 compute, the
    logits' gradient enters the two backward products in bf16 (f32 accumulation),
    as under PyTorch autocast, where autodiff would multiply f32 by bf16.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of sequence positions, got {chunk}")
    return _chunked_logprobs(cfg, min(chunk, x_BxTxD.shape[1]), x_BxTxD, head, targets_BxT)


def _head_axes(cfg: ModelConfig) -> tuple[str, str]:
    return ("vocab", "embed") if cfg.tie_embeddings else ("embed", "vocab")


def _chunk_logits(cfg: ModelConfig, head: jax.Array, x_BxCxD: jax.Array) -> jax.Array:
    return model.output_logits(cfg, {"embed" if cfg.tie_embeddings else "lm_head": head}, x_BxCxD)


def _to_chunks(a_BxT: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...], T zero-padded up to a multiple of chunk."""
    B, T = a_BxT.shape[:2]
    n = -(-T // chunk)
    a_BxT = jnp.pad(a_BxT, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (a_BxT.ndim - 2))
    return jnp.moveaxis(a_BxT.reshape(B, n, chunk, *a_BxT.shape[2:]), 1, 0)


def _from_chunks(a_NxBxC: jax.Array, T: int) -> jax.Array:
    n, B, chunk = a_NxBxC.shape[:3]
    return jnp.moveaxis(a_NxBxC, 0, 1).reshape(B, n * chunk, *a_NxBxC.shape[3:])[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_logprobs(cfg, chunk, x_BxTxD, head, targets_BxT):
    return _chunked_fwd(cfg, chunk, x_BxTxD, head, targets_BxT)[0]


def _chunked_fwd(cfg, chunk, x_BxTxD, head, targets_BxT):
    def one(chunk_args):
        x_BxCxD, targets_BxC = chunk_args
        logits_BxCxV = _chunk_logits(cfg, head_c, x_BxCxD)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        return jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0] - lse_BxC, lse_BxC

    head_c = head.astype(x_BxTxD.dtype)  # once, not per chunk (output_logits casts to the compute dtype)
    T = x_BxTxD.shape[1]
    logprobs_NxBxC, lse_NxBxC = jax.lax.map(one, (_to_chunks(x_BxTxD, chunk), _to_chunks(targets_BxT, chunk)))
    lse_BxT = _from_chunks(lse_NxBxC, T)
    return _from_chunks(logprobs_NxBxC, T), (x_BxTxD, head, targets_BxT, lse_BxT)


def _chunked_bwd(cfg, chunk, residuals, g_BxT):
    x_BxTxD, head, targets_BxT, lse_BxT = residuals
    dtype = x_BxTxD.dtype
    head_c = head.astype(dtype)
    tied = cfg.tie_embeddings

    def one(dhead, chunk_args):
        x_BxCxD, targets_BxC, lse_BxC, g_BxC = chunk_args
        logits_BxCxV = _chunk_logits(cfg, head_c, x_BxCxD)
        # d logp[t] / d logits = onehot(t) - softmax(logits); the saved normaliser gives the softmax.
        p_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
        onehot_BxCxV = jax.nn.one_hot(targets_BxC, logits_BxCxV.shape[-1], dtype=jnp.float32)
        dlogits_BxCxV = g_BxC[..., None] * (onehot_BxCxV - p_BxCxV)
        if cfg.logit_softcap:  # logits = c tanh(raw / c): d/d raw = 1 - tanh^2 = 1 - (logits / c)^2
            dlogits_BxCxV = dlogits_BxCxV * (1.0 - jnp.square(logits_BxCxV / cfg.logit_softcap))
        dlogits_BxCxV = dlogits_BxCxV.astype(dtype)
        if tied:
            dx_BxCxD = jnp.einsum("btv,vd->btd", dlogits_BxCxV, head_c, preferred_element_type=jnp.float32)
            dhead_c = jnp.einsum("btv,btd->vd", dlogits_BxCxV, x_BxCxD, preferred_element_type=jnp.float32)
        else:
            dx_BxCxD = jnp.einsum("btv,dv->btd", dlogits_BxCxV, head_c, preferred_element_type=jnp.float32)
            dhead_c = jnp.einsum("btd,btv->dv", x_BxCxD, dlogits_BxCxV, preferred_element_type=jnp.float32)
        dhead = constrain(dhead + dhead_c, _head_axes(cfg))
        return dhead, constrain(dx_BxCxD.astype(dtype), ("batch", "seq", None))

    T = x_BxTxD.shape[1]
    chunks = tuple(_to_chunks(a, chunk) for a in (x_BxTxD, targets_BxT, lse_BxT, g_BxT.astype(jnp.float32)))
    dhead0 = constrain(jnp.zeros(head.shape, jnp.float32), _head_axes(cfg))
    dhead, dx_NxBxCxD = jax.lax.scan(one, dhead0, chunks)
    return _from_chunks(dx_NxBxCxD, T), dhead.astype(head.dtype), None


_chunked_logprobs.defvjp(_chunked_fwd, _chunked_bwd)
