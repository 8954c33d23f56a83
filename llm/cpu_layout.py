"""The sampling engine's CPU layout: how its step reads weights and KV cache when it runs on XLA:CPU.

    engine = Engine(cfg, params)  # on CPU the engine picks CPU_LAYOUT; accelerators keep the model's layout

A decode step is a few matrix-vector products per row, memory-bound streams of
weights, so on CPU the step reads everything in the layout that streams fastest,
at the cost of one extra copy of the parameters (docs/experiments/performance.md):
each layer's weights and cache as their own buffers (slicing a stacked layer copies it at
every step), the head as an untied [D, V] matrix (XLA:CPU multiplies it faster
than the tied [V, D] table), and the cache stored the way a decode step's two
matrix-vector products read it. Batched decode steps also pick XLA:CPU's own
matrix kernels over YNNPACK. Accelerators keep the training layout, its memory
and the model's stacked `KVCache` (`llm.generate.STACKED`); this module is the
one place the engine's CPU special cases live.

Shape legend: L layers, B rows, T new tokens, S cache length, K kv heads, G query heads per kv head,
N query heads, H head dim, D model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm import model
from llm.config import ModelConfig

# XLA:CPU hands matrix products to YNNPACK by default. For a decode step of 4+ rows its own
# (Eigen) kernels are faster; at 1-2 rows YNNPACK is as fast or faster, so small batches keep it
# (docs/experiments/performance.md, "Sampling engine").
_BATCHED_ROWS = 4
_BATCHED_OPTIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@dataclasses.dataclass(frozen=True)
class CpuLayout:
    """Per-layer blocks run unrolled over a `LayerCache`, an untied [D, V] head, Eigen kernels for batched steps."""

    def place(self, cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
        """The config and parameters the step runs on: each layer its own buffers, the head [D, V]."""
        params = {**params, "blocks": [jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(cfg.n_layer)]}
        if cfg.tie_embeddings:
            cfg, params = dataclasses.replace(cfg, tie_embeddings=False), {**params, "lm_head": params["embed"].T}
        return cfg, params

    def hidden_states(self, cfg: ModelConfig, params, tokens_BxT, positions_BxT, cache):
        """`model.hidden_states` over placed params: the per-layer blocks run unrolled, each read in place."""
        x_BxTxD, context = model.embed(cfg, params, tokens_BxT, positions_BxT=positions_BxT, cache=cache)
        carry = (x_BxTxD, cache)
        for i, layer_params in enumerate(params["blocks"]):
            carry, _ = model.block(cfg, context, carry, (layer_params, i))
        x_BxTxD, cache = carry
        return model.final_norm(cfg, params, x_BxTxD), cache

    def empty_cache(self, cfg: ModelConfig, batch: int, length: int) -> LayerCache:
        B, K, H, S, dtype = batch, cfg.n_kv_head, cfg.head_dim, length, model.compute_dtype(cfg)
        return LayerCache([jnp.zeros((B, K, S, H), dtype) for _ in range(cfg.n_layer)],
                          [jnp.zeros((B, K, H, S), dtype) for _ in range(cfg.n_layer)])

    def compiler_options(self, batch: int) -> tuple[tuple[str, str], ...]:
        """XLA options for a decode step of `batch` rows (empty: XLA's defaults)."""
        return _BATCHED_OPTIONS if batch >= _BATCHED_ROWS else ()


CPU_LAYOUT = CpuLayout()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """The CPU sampler's KV cache: per layer its own buffers, keys [B, K, S, H] and values [B, K, H, S].

    The model's cache protocol (`model.KVCache`) in the layout XLA:CPU decodes
    fastest. Each tensor is stored the way a decode step's two matrix-vector
    products read it, the contracted dimension minor (head dims for keys,
    positions for values), so no step transposes the cache; and each layer, like
    its weights, is its own buffer read in place, not sliced out of a stack.
    Layers are Python ints: it runs under `CpuLayout.hidden_states`' unrolled loop, not a scan.
    """

    k: list[jax.Array]  # L x [B, K, S, H]
    v: list[jax.Array]  # L x [B, K, H, S]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def rows(self, rows_B: jax.Array) -> LayerCache:
        return LayerCache([k[rows_B] for k in self.k], [v[rows_B] for v in self.v])

    def write(self, layer: int, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, positions_BxT: jax.Array) -> LayerCache:
        k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
        v_BxKxHxT = v_BxTxKxH.transpose(0, 2, 3, 1)
        k = _write_rows(self.k[layer], k_BxKxTxH, positions_BxT[:, 0], axis=2)
        v = _write_rows(self.v[layer], v_BxKxHxT, positions_BxT[:, 0], axis=3)
        return LayerCache([*self.k[:layer], k, *self.k[layer + 1:]], [*self.v[:layer], v, *self.v[layer + 1:]])

    def attend(self, layer: int, q_BxTxNxH: jax.Array, mask_Bx1xTxS: jax.Array) -> jax.Array:
        dtype = q_BxTxNxH.dtype
        probs_BxKxGxTxS = model.attention_weights(q_BxTxNxH, self.k[layer].astype(dtype), mask_Bx1xTxS)
        out_BxTxKxGxH = jnp.einsum("bkgts,bkhs->btkgh", probs_BxKxGxTxS, self.v[layer].astype(dtype))
        return out_BxTxKxGxH.reshape(q_BxTxNxH.shape)


def _write_rows(slots: jax.Array, new: jax.Array, start_B: jax.Array, axis: int) -> jax.Array:
    """`slots` ([B, ...]) with row b's new tokens (`new`, laid out as the slots) written from `start_B[b]` along `axis`.

    A row's tokens sit at consecutive positions (a prompt, a chunk of one, or one
    decoded token), so each row is one in-place dynamic-update-slice. A scatter at
    per-row positions, as the model's `KVCache.write` does, made XLA:CPU transpose
    the whole cache around it (docs/experiments/performance.md); blending the tokens
    in with a one-hot product costs B*T*S*K*H flops. The caller keeps positions + T
    within the cache (dynamic-update-slice clamps).
    """
    new = new.astype(slots.dtype)

    def write_row(b, slots):
        start = [b if d == 0 else start_B[b] if d == axis else 0 for d in range(slots.ndim)]
        return jax.lax.dynamic_update_slice(slots, jax.lax.dynamic_slice_in_dim(new, b, 1), start)

    return jax.lax.fori_loop(0, start_B.shape[0], write_row, slots, unroll=min(start_B.shape[0], 8))
