"""GPT-2 and Llama-3 Transformers as pure functions over one parameter pytree.

    params = init_params(cfg, rng)
    logits_BxTxV, cache = forward(cfg, params, tokens_BxT, positions=..., cache=...)

`cfg.family` selects the block: "gpt2" (learned positions, LayerNorm with bias,
GELU(tanh) MLP, biases everywhere, tied embeddings) or "llama" (RoPE with the
Llama-3.1 frequency scaling, RMSNorm, SwiGLU, grouped-query attention, no biases,
tied or untied embeddings). Layers are stored stacked on a leading `layers` axis
whether or not they are scanned, so checkpoints do not depend on `scan_layers`.

A KV cache is any object with `KVCache`'s four members (`length`, `rows`, `write`,
`attend`): attention hands it the new keys and values and asks it for the
attended output, so a sampler may keep its own cache layout (generate.py's CPU
one) while training, rollouts and evals share this module's stacked `KVCache`.

Shape legend for tensor names:
    B batch          T query length        S key/value (cache) length
    D model width    N query heads         K key/value heads        H head dim
    F MLP hidden     V vocabulary          L layers
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.sharding import constrain

Params = dict[str, Any]
Cache = Any  # a KVCache, or another object with its members (the cache protocol)


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dimension
    init: Callable[[jax.Array, tuple[int, ...]], jax.Array]


def _normal(std: float):
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def _zeros(key, shape):
    return jnp.zeros(shape, jnp.float32)


def _ones(key, shape):
    return jnp.ones(shape, jnp.float32)


def _norm_specs(cfg: ModelConfig, stacked: bool) -> dict[str, ParamSpec]:
    lead, lead_axes = ((cfg.n_layer,), ("layers",)) if stacked else ((), ())
    specs = {"scale": ParamSpec(lead + (cfg.n_embd,), lead_axes + ("embed",), _ones)}
    if cfg.family == "gpt2":
        specs["bias"] = ParamSpec(lead + (cfg.n_embd,), lead_axes + ("embed",), _zeros)
    return specs


def param_specs(cfg: ModelConfig) -> Params:
    """Shape, logical axes and initialiser of every parameter, in the params pytree layout."""
    L, D, N, K, H, F, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    std = cfg.init_std
    # GPT-2's scaling of the residual projections keeps the residual stream's variance flat in depth.
    out_std = std / math.sqrt(2 * L)
    gpt2 = cfg.family == "gpt2"

    attn = {
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), _normal(std)),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), _normal(std)),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), _normal(std)),
        "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), _normal(out_std)),
    }
    if gpt2:
        attn |= {
            "q_bias": ParamSpec((L, N, H), ("layers", "heads", "head_dim"), _zeros),
            "k_bias": ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), _zeros),
            "v_bias": ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), _zeros),
            "o_bias": ParamSpec((L, D), ("layers", "embed"), _zeros),
        }
    if cfg.qk_norm:
        attn |= {
            "q_norm": ParamSpec((L, H), ("layers", "head_dim"), _ones),
            "k_norm": ParamSpec((L, H), ("layers", "head_dim"), _ones),
        }
    if gpt2:
        mlp = {
            "fc": ParamSpec((L, D, F), ("layers", "embed", "mlp"), _normal(std)),
            "fc_bias": ParamSpec((L, F), ("layers", "mlp"), _zeros),
            "proj": ParamSpec((L, F, D), ("layers", "mlp", "embed"), _normal(out_std)),
            "proj_bias": ParamSpec((L, D), ("layers", "embed"), _zeros),
        }
    else:
        mlp = {
            "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), _normal(std)),
            "up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), _normal(std)),
            "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), _normal(out_std)),
        }
    specs: Params = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), _normal(std)),
        "blocks": {
            "attn_norm": _norm_specs(cfg, stacked=True),
            "attn": attn,
            "mlp_norm": _norm_specs(cfg, stacked=True),
            "mlp": mlp,
        },
        "final_norm": _norm_specs(cfg, stacked=False),
    }
    if gpt2:
        specs["pos_embed"] = ParamSpec((cfg.max_seq_len, D), (None, "embed"), _normal(0.01))
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), _normal(std))
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Freshly initialised float32 parameters (call under `sharding.init_sharded` to shard)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(treedef, [s.init(k, s.shape) for s, k in zip(leaves, keys)])


def param_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, in the params pytree layout."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6 N + 12 L D T (llm.c's count; attention's causal half not discounted)."""
    return 6 * count_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * seq_len


# ----------------------------------------------------------------------------- forward


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    if cfg.dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(cfg.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's keys and values, both [L, B, K, S, H]: S slots per row, written at token positions.

    One stacked buffer per tensor, like the blocks, so the cache rides in the carry of
    a layer scan. Its methods are the cache protocol attention calls; generate.py
    implements the same four members for its CPU layout.
    """

    k_LxBxKxSxH: jax.Array
    v_LxBxKxSxH: jax.Array

    @property
    def length(self) -> int:
        return self.k_LxBxKxSxH.shape[3]

    def rows(self, rows_B: jax.Array) -> KVCache:
        return KVCache(self.k_LxBxKxSxH[:, rows_B], self.v_LxBxKxSxH[:, rows_B])

    def write(self, layer: Any, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, positions_BxT: jax.Array) -> KVCache:
        """Layer `layer`'s new keys and values written at their positions, all rows in one scatter.

        Row b's token t goes to slot positions_BxT[b, t]; (row, position) pairs are
        distinct, and a position past the cache is dropped rather than clamped onto
        another slot.
        """
        rows_Bx1 = jnp.arange(k_BxTxKxH.shape[0])[:, None]

        def scatter(slots_LxBxKxSxH, new_BxTxKxH):
            # Advanced indices split by a slice index the update as [B, T, K, H], the new tokens as computed.
            at = slots_LxBxKxSxH.at[layer, rows_Bx1, :, positions_BxT]
            return at.set(new_BxTxKxH.astype(slots_LxBxKxSxH.dtype), mode="drop", unique_indices=True)

        return KVCache(scatter(self.k_LxBxKxSxH, k_BxTxKxH), scatter(self.v_LxBxKxSxH, v_BxTxKxH))

    def attend(self, layer: Any, q_BxTxNxH: jax.Array, mask_Bx1xTxS: jax.Array) -> jax.Array:
        """Layer `layer`'s attention output [B, T, N, H] over its slots; the mask says which slots each query sees."""
        dtype = q_BxTxNxH.dtype
        probs_BxKxGxTxS = attention_weights(q_BxTxNxH, self.k_LxBxKxSxH[layer].astype(dtype), mask_Bx1xTxS)
        out_BxTxKxGxH = jnp.einsum("bkgts,bksh->btkgh", probs_BxKxGxTxS, self.v_LxBxKxSxH[layer].astype(dtype))
        return out_BxTxKxGxH.reshape(q_BxTxNxH.shape)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty stacked KV cache holding `max_len` positions per row."""
    if max_len > cfg.max_seq_len and cfg.family == "gpt2":
        raise ValueError(f"cache length {max_len} exceeds GPT-2's {cfg.max_seq_len} learned positions")
    shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
    dtype = dtype or compute_dtype(cfg)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cache_rows(cache: Cache, rows_B: jax.Array) -> Cache:
    """A cache whose row b is row `rows_B[b]` of `cache` (rows may repeat: n samples continuing one prompt)."""
    return cache.rows(rows_B)


def cache_length(cache: Cache) -> int:
    """S, the positions a cache holds per row."""
    return cache.length


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens_BxT: jax.Array,
    *,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    cache: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """Float32 logits for every position, and the updated KV cache when one is given.

    Without a cache: causal self-attention over `tokens_BxT`; `segment_ids_BxT`
    (packed documents) additionally stops attention across document boundaries.
    With a cache: the new keys/values are written at `positions_BxT` (contiguous
    per row, so a cache may write a row as one slice) and each query attends to
    every cache slot at or before its position, so prefill and one-token decode are
    the same call.
    """
    x_BxTxD, cache = hidden_states(
        cfg, params, tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT, cache=cache
    )
    return output_logits(cfg, params, x_BxTxD), cache


def hidden_states(cfg: ModelConfig, params: Params, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
                  segment_ids_BxT: jax.Array | None = None, cache: Cache | None = None
                  ) -> tuple[jax.Array, Cache | None]:
    """The final-norm hidden states `forward` turns into logits (a sampler or reward head picks rows first); the
    arguments are `forward`'s."""
    x_BxTxD, context = embed(cfg, params, tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT,
                             cache=cache)
    layer = functools.partial(block, cfg, context)
    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    # The whole cache rides in the carry and each layer writes its own slots: scanning
    # over a stacked cache instead would copy every layer's cache in and out.
    carry = (x_BxTxD, cache)
    if cfg.scan_layers:
        carry, _ = jax.lax.scan(layer, carry, (params["blocks"], jnp.arange(cfg.n_layer)))
    else:
        for i in range(cfg.n_layer):
            carry, _ = layer(carry, (jax.tree.map(lambda a: a[i], params["blocks"]), i))
    x_BxTxD, cache = carry
    return final_norm(cfg, params, x_BxTxD), cache


def embed(cfg: ModelConfig, params: Params, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
          segment_ids_BxT: jax.Array | None = None, cache: Cache | None = None) -> tuple[jax.Array, dict]:
    """The first block's input and the context every block reads (positions, RoPE tables, attention mask).

    With `block` and `final_norm`, the pieces of `hidden_states` for a caller that
    runs the layers in its own layout (generate.py's per-layer weights on CPU).
    """
    B, T = tokens_BxT.shape
    dtype = compute_dtype(cfg)
    if positions_BxT is None:
        if cache is not None:
            raise ValueError("forward with a cache needs positions_BxT (where the new tokens go)")
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if cache is None and T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len}")

    x_BxTxD = params["embed"].astype(dtype)[tokens_BxT]
    if cfg.family == "gpt2":
        x_BxTxD = x_BxTxD + params["pos_embed"].astype(dtype)[positions_BxT]
    x_BxTxD = constrain(x_BxTxD, ("batch", "seq", None))

    rope = _rope_tables(cfg, positions_BxT) if cfg.family == "llama" else None
    if cache is not None:
        # A query at position p sees cache slots 0..p: earlier tokens, and itself once written.
        mask_Bx1xTxS = (jnp.arange(cache.length)[None, None, :] <= positions_BxT[:, :, None])[:, None]
    elif segment_ids_BxT is not None:
        mask_Bx1xTxS = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    else:
        mask_Bx1xTxS = None
    return x_BxTxD, dict(positions_BxT=positions_BxT, rope=rope, mask_Bx1xTxS=mask_Bx1xTxS)


def final_norm(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array) -> jax.Array:
    return _norm(cfg, params["final_norm"], x_BxTxD)


def output_logits(cfg: ModelConfig, params: Params, x_BxTxD: jax.Array) -> jax.Array:
    """Float32 logits of final hidden states (the output head, then the optional soft-cap)."""
    # Contract the tied table as stored: materialising embed.T would copy it at every call.
    head, spec = (params["embed"], "btd,vd->btv") if cfg.tie_embeddings else (params["lm_head"], "btd,dv->btv")
    logits_BxTxV = jnp.einsum(spec, x_BxTxD, head.astype(x_BxTxD.dtype), preferred_element_type=jnp.float32)
    logits_BxTxV = constrain(logits_BxTxV, ("batch", "seq", "vocab"))
    if cfg.logit_softcap:
        logits_BxTxV = cfg.logit_softcap * jnp.tanh(logits_BxTxV / cfg.logit_softcap)
    return logits_BxTxV


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block(cfg: ModelConfig, context: dict, carry: tuple, layer: tuple) -> tuple[tuple, None]:
    """One pre-norm Transformer block as a scan body: carry is (x, whole cache or None), layer is (params, index)."""
    x_BxTxD, cache = carry
    p, index = layer
    x_BxTxD = constrain(x_BxTxD, ("batch", "seq", None))
    attn_out_BxTxD, cache = _attention(cfg, context, p["attn"], _norm(cfg, p["attn_norm"], x_BxTxD), cache, index)
    x_BxTxD = x_BxTxD + attn_out_BxTxD
    x_BxTxD = x_BxTxD + _mlp(cfg, p["mlp"], _norm(cfg, p["mlp_norm"], x_BxTxD))
    return (x_BxTxD, cache), None


def _norm(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    """LayerNorm (gpt2) or RMSNorm (llama), computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    if cfg.family == "gpt2":
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]
    else:
        y = _rms(x32, cfg.norm_eps) * p["scale"]
    return y.astype(x.dtype)


def _rms(x32: jax.Array, eps: float) -> jax.Array:
    return x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)


def _attention(cfg: ModelConfig, context: dict, p: Params, h_BxTxD: jax.Array, cache: Cache | None, layer: Any):
    dtype = h_BxTxD.dtype
    q_BxTxNxH = jnp.einsum("btd,dnh->btnh", h_BxTxD, p["q"].astype(dtype))
    k_BxTxKxH = jnp.einsum("btd,dkh->btkh", h_BxTxD, p["k"].astype(dtype))
    v_BxTxKxH = jnp.einsum("btd,dkh->btkh", h_BxTxD, p["v"].astype(dtype))
    if cfg.family == "gpt2":
        q_BxTxNxH += p["q_bias"].astype(dtype)
        k_BxTxKxH += p["k_bias"].astype(dtype)
        v_BxTxKxH += p["v_bias"].astype(dtype)
    if cfg.qk_norm:
        q_BxTxNxH = (_rms(q_BxTxNxH.astype(jnp.float32), cfg.norm_eps) * p["q_norm"]).astype(dtype)
        k_BxTxKxH = (_rms(k_BxTxKxH.astype(jnp.float32), cfg.norm_eps) * p["k_norm"]).astype(dtype)
    if context["rope"] is not None:
        q_BxTxNxH = _apply_rope(q_BxTxNxH, *context["rope"])
        k_BxTxKxH = _apply_rope(k_BxTxKxH, *context["rope"])
    q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "seq", "heads", None))
    k_BxTxKxH = constrain(k_BxTxKxH, ("batch", "seq", "kv_heads", None))
    v_BxTxKxH = constrain(v_BxTxKxH, ("batch", "seq", "kv_heads", None))

    if cache is None:
        impl = _attention_impl(cfg, dtype)
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=context["mask_Bx1xTxS"], is_causal=True, implementation=impl
        )
    else:
        cache = cache.write(layer, k_BxTxKxH, v_BxTxKxH, context["positions_BxT"])
        out_BxTxNxH = cache.attend(layer, q_BxTxNxH, context["mask_Bx1xTxS"])
    # Heads and head_dim merged into one contracting axis on both sides (a free reshape):
    # contracting over (n, h) as two axes made XLA:CPU transpose the [N, H, D] weight at every step.
    B, T, N, H = out_BxTxNxH.shape
    out_BxTxD = out_BxTxNxH.reshape(B, T, N * H) @ p["o"].reshape(N * H, -1).astype(dtype)
    if cfg.family == "gpt2":
        out_BxTxD += p["o_bias"].astype(dtype)
    return out_BxTxD, cache


def attention_weights(q_BxTxNxH: jax.Array, k_BxKxSxH: jax.Array, mask_Bx1xTxS: jax.Array) -> jax.Array:
    """Grouped-query attention probabilities over one layer's cached keys, [B, K, G, T, S] with G = N / K.

    Scores and softmax in float32, as in jax.nn.dot_product_attention's XLA path; the
    mask encodes causality. The product with the values is left to the cache, which
    knows their layout.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxKxSxH.shape[1]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgh,bksh->bkgts", q_BxTxKxGxH, k_BxKxSxH, preferred_element_type=jnp.float32
    ) / math.sqrt(H)
    scores_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxKxGxTxS, -jnp.inf)
    return jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(q_BxTxNxH.dtype)


def _attention_impl(cfg: ModelConfig, dtype: jnp.dtype) -> str:
    """`attention_impl`, with "auto" resolved: cuDNN's fused kernel where it applies, else XLA.

    JAX's own default is XLA's unfused attention; cuDNN's fused kernel is the faster
    one where it applies (BENCHMARKS.md, "Model forward+backward"): a GPU, 16-bit
    inputs and head_dim <= 128 in multiples of 8.
    """
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    fits_cudnn = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    return "cudnn" if jax.default_backend() == "gpu" and fits_cudnn else "xla"


def _mlp(cfg: ModelConfig, p: Params, h_BxTxD: jax.Array) -> jax.Array:
    dtype = h_BxTxD.dtype
    if cfg.family == "gpt2":
        hidden_BxTxF = jnp.einsum("btd,df->btf", h_BxTxD, p["fc"].astype(dtype)) + p["fc_bias"].astype(dtype)
        hidden_BxTxF = jax.nn.gelu(hidden_BxTxF, approximate=True)
    else:
        gate_BxTxF = jnp.einsum("btd,df->btf", h_BxTxD, p["gate"].astype(dtype))
        up_BxTxF = jnp.einsum("btd,df->btf", h_BxTxD, p["up"].astype(dtype))
        hidden_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    hidden_BxTxF = constrain(hidden_BxTxF, ("batch", "seq", "mlp"))
    out_BxTxD = jnp.einsum("btf,fd->btd", hidden_BxTxF, p["proj" if cfg.family == "gpt2" else "down"].astype(dtype))
    if cfg.family == "gpt2":
        out_BxTxD += p["proj_bias"].astype(dtype)
    return out_BxTxD


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies of RoPE, with Llama-3.1's scaling when `rope_factor` > 1.

    Llama 3.1 (Meta's `apply_scaling`): wavelengths longer than
    `original_max_len / low_freq_factor` are stretched by `rope_factor`, those shorter
    than `original_max_len / high_freq_factor` are kept, and the band between is
    interpolated linearly in 1/wavelength.
    """
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    if cfg.rope_factor == 1.0:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_freq_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return jnp.where(is_medium, interpolated, scaled)


def _rope_tables(cfg: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(cfg)
    return jnp.cos(angles_BxTxH2), jnp.sin(angles_BxTxH2)


def _apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH2: jax.Array, sin_BxTxH2: jax.Array) -> jax.Array:
    """Rotates the two halves of each head: the Hugging Face layout, whose q/k weights are permuted from Meta's interleaved pairs."""
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_BxTxH2[:, :, None, :], sin_BxTxH2[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)
