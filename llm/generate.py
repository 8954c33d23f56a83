"""KV-cache sampling engine: batched prompts, every sampling control, stop strings, tool calls.

    engine = Engine(cfg, params, tokenizer, tools={"python": Calculator()})
    samples = engine.generate([prompt_ids], SamplingParams(temperature=0.8, top_p=0.95, n=4))

One step function serves prefill (all prompt tokens at once) and decode (one
token per row): run the model over the new tokens with the cache, then sample the
next token of every row on device. A prompt is prefilled once however many
samples it has; they start from copies of its cache rows. Decode steps feed
themselves (each row's sample and next position stay on device), so the host
queues step k+1 before it reads step k's tokens to apply stop conditions and tool
calls; a tool's output is forced in by overriding that row's input. Shapes are
bucketed (batch to a power of two, lengths to powers of two), so a step compiles
once per bucket; the sampling knobs are traced values, so changing them never
recompiles, except top-k, whose k is a compile-time constant.

Shape legend: U prompt rows, B batch rows (prompts x samples), T new tokens, S cache length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.config import ModelConfig
from llm.tokenizer import tool_tokens
from llm.tools import Tool


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # 1 keeps every token
    repetition_penalty: float = 1.0  # 1 is off; CTRL's rule, as in transformers
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # matched in the text the model wrote (not in tool outputs)
    n: int = 1  # samples per prompt
    seed: int = 0  # one key per call: the same prompt and seed sample differently in another batch or with another n

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens} and {self.n}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling controls: {self}")
        if "" in self.stop_strings:
            raise ValueError("an empty stop string would stop every sample at once")


@dataclasses.dataclass
class Sample:
    tokens: list[int]  # everything after the prompt, forced tool outputs and the stop token included
    logprobs: list[float]  # the model's log-probability (temperature 1, unfiltered) of each token; 0 where forced
    forced: list[bool]  # True for tokens the engine wrote (tool outputs), False for sampled ones
    finish_reason: str  # "stop" (stop token or string), "length" (max_new_tokens), "context" (model context full)
    text: str = ""  # the decoded sample, cut before its stop token or string; empty without a tokenizer


# ----------------------------------------------------------------------------- sampling math


def _candidates(
    logits_BxV: jax.Array,
    *,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float = 1.0,
    repetition_penalty: jax.Array | float = 1.0,
    seen_BxV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The tokens that may be sampled, most likely first, and their processed logits (-inf if cut): two [B, K] arrays.

    Order and rules follow `transformers`: repetition penalty (CTRL, Keskar et al.
    2019: a seen token's logit is divided by the penalty if positive, multiplied if
    negative), then temperature, then top-k, then top-p, which keeps the smallest
    set of most likely tokens whose probability reaches `top_p` (tokens tied with
    the last one kept are kept too; top-k keeps exactly k). Temperature 0 leaves the
    logits for argmax. `top_k` is a Python int (a compile-time constant) so that
    top-k picks the K candidates without sorting the vocabulary; everything
    after it, top-p and the draw itself, works on K values instead of V.
    """
    x_BxV = logits_BxV.astype(jnp.float32)
    if seen_BxV is not None:
        penalised = jnp.where(x_BxV > 0, x_BxV / repetition_penalty, x_BxV * repetition_penalty)
        x_BxV = jnp.where(seen_BxV, penalised, x_BxV)
    divisor = jnp.where(temperature > 0, temperature, 1.0)  # greedy (0) keeps the logits
    if top_k:
        # Dividing by a positive temperature keeps the order, so it is applied to the K picked, not to all V.
        x_BxK, ids_BxK = top_k_by_blocks(x_BxV, min(top_k, x_BxV.shape[-1]))
        x_BxK = x_BxK / divisor
    else:  # every token is a candidate; sort them only if top-p needs the order

        def by_probability(x):
            ids = jnp.argsort(-x, axis=-1).astype(jnp.int32)
            return jnp.take_along_axis(x, ids, axis=-1), ids

        def as_is(x):
            return x, jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)

        x_BxK, ids_BxK = jax.lax.cond(top_p < 1.0, by_probability, as_is, x_BxV / divisor)
    probs_BxK = jax.nn.softmax(x_BxK, axis=-1)
    mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    n_keep_B = jnp.maximum(jnp.sum(mass_before_BxK < top_p, axis=-1), 1)
    threshold_Bx1 = jnp.take_along_axis(x_BxK, n_keep_B[:, None] - 1, axis=-1)
    return jnp.where((top_p < 1.0) & (x_BxK < threshold_Bx1), -jnp.inf, x_BxK), ids_BxK


def top_k_by_blocks(x_BxV: jax.Array, k: int, block: int = 32) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` over the last axis, exactly, in two small passes instead of one over V.

    Each block of `block` logits is summarised by its maximum; the k blocks with the
    largest maxima hold the k largest logits (a logit outside them is at most its own
    block's maximum, and each chosen block has a larger one, so k logits beat it), so
    a second top_k runs over those k * block candidates. XLA:CPU's top_k works through
    rows one after another; over 8 rows of a 50,304-token vocabulary this is 1.3-2.5x
    faster (bench/top_k.py, BENCHMARKS.md); blocks of 32 beat 64 and 128 by 0.05-0.2 ms
    at batch 1 and 8. Ties at the k-th value may keep a different one of the tied
    tokens than `lax.top_k`.
    """
    B, V = x_BxV.shape
    n_blocks = -(-V // block)
    if n_blocks <= k:  # small vocabularies: nothing to skip
        return jax.lax.top_k(x_BxV, k)
    if n_blocks * block != V:
        x_BxV = jnp.pad(x_BxV, ((0, 0), (0, n_blocks * block - V)), constant_values=-jnp.inf)
    x_BxNxC = x_BxV.reshape(B, n_blocks, block)
    _, blocks_BxK = jax.lax.top_k(x_BxNxC.max(axis=-1), k)
    candidates_BxKxC = jnp.take_along_axis(x_BxNxC, blocks_BxK[:, :, None], axis=1)
    x_BxK, at_BxK = jax.lax.top_k(candidates_BxKxC.reshape(B, k * block), k)
    ids_BxK = jnp.take_along_axis(blocks_BxK, at_BxK // block, axis=1) * block + at_BxK % block
    return x_BxK, ids_BxK


def process_logits(logits_BxV: jax.Array, **controls) -> jax.Array:
    """The logits actually sampled from, over the whole vocabulary: -inf wherever a control cut a token."""
    x_BxK, ids_BxK = _candidates(logits_BxV, **controls)
    B = logits_BxV.shape[0]
    return jnp.full(logits_BxV.shape, -jnp.inf).at[jnp.arange(B)[:, None], ids_BxK].set(x_BxK)


def sample_tokens(key: jax.Array, logits_BxV: jax.Array, temperature: jax.Array | float = 1.0, **controls) -> jax.Array:
    """One token per row: argmax at temperature 0, else a draw from the candidates' processed logits."""
    x_BxK, ids_BxK = _candidates(logits_BxV, temperature=temperature, **controls)
    choice_B = jnp.where(temperature > 0, jax.random.categorical(key, x_BxK, axis=-1), jnp.argmax(x_BxK, axis=-1))
    return jnp.take_along_axis(ids_BxK, choice_B[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- the jitted step


def _step(cfg: ModelConfig, params, cache, tokens_UxT, positions_UxT, last_U, seen_UxV, key, step, controls, top_k,
          rows_B=None):
    """Runs the new tokens through the model and samples each row's next token.

    `last_U` indexes each row's last real token within T (prefill rows are right-padded).
    `rows_B`, at prefill, says which of the U prompt rows each of the B sampled rows
    continues: the n samples of a prompt share its one prefill and output head, then
    get copies of its logits and cache rows. Without it the rows are sampled as they
    are (B = U, as at every decode step).
    Returns (next token, its log-probability, cache, seen-token mask or None) for B rows.
    """
    x_UxTxD, cache = _hidden_states(cfg, params, tokens_UxT, positions_UxT, cache)
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


def _prefill(cfg: ModelConfig, params, tokens_UxP, positions_UxP, last_U, key, controls, top_k, cache_len, track_seen,
             rows_B):
    """The first step: an empty cache of `cache_len` slots per prompt row, the prompts run through it, first samples.

    The cache (and, under a repetition penalty, the seen-token mask) is made inside
    the compiled step, so nothing is copied in or donated, whatever the batch becomes.
    """
    U = tokens_UxP.shape[0]
    cache = _empty_cache(cfg, params, U, cache_len)
    seen_UxV = jnp.zeros((U, cfg.vocab_size), bool) if track_seen else None
    return _step(cfg, params, cache, tokens_UxP, positions_UxP, last_U, seen_UxV, key, 0, controls, top_k, rows_B)


def _decode(cfg: ModelConfig, params, cache, seen_BxV, inputs, overrides_Bx2, key, controls, top_k):
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
        cfg, params, cache, token_B[:, None], position_B[:, None], jnp.zeros_like(position_B), seen_BxV, key, step,
        controls, top_k,
    )
    S = model.cache_length(cache)
    return next_B, logprob_B, cache, seen_BxV, (next_B, jnp.minimum(position_B + 1, S - 1), step + 1)


def _sampling_layout(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """The config and parameters the sampling step runs on: on CPU, per-layer blocks and an untied [D, V] head.

    A decode step is a few matrix-vector products per row, memory-bound streams of
    weights, so on CPU the step reads weights in the layout that streams fastest,
    at the cost of one extra copy of the parameters: each layer as its own buffer
    (slicing a stacked layer copies it at every step) and the head as [D, V], which
    XLA:CPU multiplies ~1.5x faster than the tied [V, D] table (BENCHMARKS.md).
    Per-layer blocks go with a `_LayerCache`. Accelerators keep the training layout,
    its memory and the model's stacked `KVCache`.
    """
    if jax.default_backend() != "cpu":
        return cfg, params
    params = {**params, "blocks": [jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(cfg.n_layer)]}
    if cfg.tie_embeddings:
        cfg, params = dataclasses.replace(cfg, tie_embeddings=False), {**params, "lm_head": params["embed"].T}
    return cfg, params


def _hidden_states(cfg: ModelConfig, params, tokens_BxT, positions_BxT, cache):
    """`model.hidden_states` over the sampling layout: per-layer blocks run unrolled, each read in place."""
    if not isinstance(params["blocks"], list):
        return model.hidden_states(cfg, params, tokens_BxT, positions_BxT=positions_BxT, cache=cache)
    x_BxTxD, context = model.embed(cfg, params, tokens_BxT, positions_BxT=positions_BxT, cache=cache)
    carry = (x_BxTxD, cache)
    for i, layer_params in enumerate(params["blocks"]):
        carry, _ = model.block(cfg, context, carry, (layer_params, i))
    x_BxTxD, cache = carry
    return model.final_norm(cfg, params, x_BxTxD), cache


def _empty_cache(cfg: ModelConfig, params, batch: int, length: int):
    """A cache in the layout that goes with the blocks': `_LayerCache` for per-layer blocks, else the model's."""
    if not isinstance(params["blocks"], list):
        return model.init_cache(cfg, batch, length)
    B, K, H, S, dtype = batch, cfg.n_kv_head, cfg.head_dim, length, model.compute_dtype(cfg)
    return _LayerCache([jnp.zeros((B, K, S, H), dtype) for _ in range(cfg.n_layer)],
                       [jnp.zeros((B, K, H, S), dtype) for _ in range(cfg.n_layer)])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LayerCache:
    """The CPU sampler's KV cache: per layer its own buffers, keys [B, K, S, H] and values [B, K, H, S].

    The model's cache protocol (`model.KVCache`) in the layout XLA:CPU decodes
    fastest (BENCHMARKS.md). Each tensor is stored the way a decode step's two
    matrix-vector products read it, the contracted dimension minor (head dims for
    keys, positions for values), so no step transposes the cache; and each layer,
    like its weights, is its own buffer read in place, not sliced out of a stack.
    Layers are Python ints: it runs under `_hidden_states`' unrolled loop, not a scan.
    """

    k: list[jax.Array]  # L x [B, K, S, H]
    v: list[jax.Array]  # L x [B, K, H, S]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def rows(self, rows_B: jax.Array) -> _LayerCache:
        return _LayerCache([k[rows_B] for k in self.k], [v[rows_B] for v in self.v])

    def write(self, layer: int, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, positions_BxT: jax.Array) -> _LayerCache:
        k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
        v_BxKxHxT = v_BxTxKxH.transpose(0, 2, 3, 1)
        k = _write_rows(self.k[layer], k_BxKxTxH, positions_BxT[:, 0], axis=2)
        v = _write_rows(self.v[layer], v_BxKxHxT, positions_BxT[:, 0], axis=3)
        return _LayerCache([*self.k[:layer], k, *self.k[layer + 1:]], [*self.v[:layer], v, *self.v[layer + 1:]])

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
    the whole cache around it when the engine used one (BENCHMARKS.md); blending the tokens in with a one-hot product costs B*T*S*K*H
    flops. The caller keeps positions + T within the cache (dynamic-update-slice clamps).
    """
    new = new.astype(slots.dtype)

    def write_row(b, slots):
        start = [b if d == 0 else start_B[b] if d == axis else 0 for d in range(slots.ndim)]
        return jax.lax.dynamic_update_slice(slots, jax.lax.dynamic_slice_in_dim(new, b, 1), start)

    return jax.lax.fori_loop(0, start_B.shape[0], write_row, slots, unroll=min(start_B.shape[0], 8))


@functools.cache
def _jitted_steps(cfg: ModelConfig) -> tuple[Callable, dict[bool, Callable]]:
    """The jitted prefill step and decode steps (keyed by batch >= _BATCHED_ROWS) for one config.

    Built once per config and process, so engines made afresh (the training loop
    makes one per sample) reuse the compilations instead of compiling again.
    """
    prefill = jax.jit(functools.partial(_prefill, cfg), static_argnames=("top_k", "cache_len", "track_seen"))
    decode = functools.partial(_decode, cfg)
    on_cpu = jax.default_backend() == "cpu"
    return prefill, {
        batched: jax.jit(decode, donate_argnums=(1, 2), static_argnames="top_k",
                         compiler_options=_BATCHED_CPU_OPTIONS if batched and on_cpu else None)
        for batched in (False, True)
    }


# XLA:CPU hands matrix products to YNNPACK by default. For a decode step of 4+ rows its
# own (Eigen) kernels are faster (BENCHMARKS.md): 128 steps of the bench model at batch 8
# take 1.52-1.58 s vs 1.86-1.92 s, a step at batch 4 0.79-0.83x; at batch 2 YNNPACK's
# step is ~12% faster and at batch 1 they tie, so batches of 1-2 keep it.
_BATCHED_ROWS = 4
_BATCHED_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _bucket(n: int, cap: int | None = None, minimum: int = 1) -> int:
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    return min(size, cap) if cap else size


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Samples from one model; `tokenizer` is needed for stop strings, tool calls and `text`."""

    def __init__(self, cfg: ModelConfig, params, tokenizer=None, tools: Mapping[str, Tool] | None = None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.tools = dict(tools or {})
        if self.tools and tokenizer is None:
            raise ValueError("tool calls need a tokenizer (to read calls and write outputs)")
        self._tool_ids = {}  # call-start id -> (tool name, call-end id, output-start id, output-end id)
        for name in self.tools:
            ids = tuple(tokenizer.token_id(t) for t in tool_tokens(name))
            if max(ids) >= cfg.vocab_size:
                raise ValueError(f"tool {name!r} needs token ids {ids} but the model has {cfg.vocab_size} logits: "
                                 f"its control tokens are outside the model's vocabulary")
            call_start, call_end, out_start, out_end = ids
            self._tool_ids[call_start] = (name, call_end, out_start, out_end)
        self._step_cfg, self._step_params = _sampling_layout(cfg, params)
        self._prefill, self._decode = _jitted_steps(self._step_cfg)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams = SamplingParams(),
        on_token: Callable[[int, int, int], None] | None = None,
    ) -> list[list[Sample]]:
        """`sampling.n` samples for each prompt; `on_token(prompt_index, sample_index, token)` streams."""
        if not prompts:
            return []
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        context = self.cfg.max_seq_len
        for i, prompt in enumerate(prompts):
            if not len(prompt):
                raise ValueError(f"prompt {i} is empty; start it with a document separator or BOS token")
            if len(prompt) >= context:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens but the model's context is {context}: "
                    f"no room to generate; shorten the prompt to at most {context - 1} tokens"
                )
            ids = np.asarray(prompt)
            outside = (ids < 0) | (ids >= self.cfg.vocab_size)
            if outside.any():  # an embedding lookup would silently clamp them
                raise ValueError(
                    f"prompt {i} has token id {ids[outside][0]}, outside the model's vocabulary of "
                    f"{self.cfg.vocab_size} ids: was it encoded with another tokenizer, or with control tokens "
                    f"the model was not trained with?"
                )
        rows = [_Row(i, j, list(prompts[i])) for i in range(len(prompts)) for j in range(sampling.n)]
        # The prompts are prefilled once each (U rows); their n samples (B rows) continue copies of those rows.
        U, B = _bucket(len(prompts)), _bucket(len(rows))
        longest = max(len(p) for p in prompts)
        S = _bucket(longest + sampling.max_new_tokens, cap=context, minimum=16)
        P = _bucket(longest, cap=S, minimum=16)

        tokens_UxP = np.zeros((U, P), np.int32)
        last_U = np.zeros(U, np.int32)
        for i, prompt in enumerate(prompts):
            tokens_UxP[i, : len(prompt)] = prompt
            last_U[i] = len(prompt) - 1
        rows_B = np.arange(B, dtype=np.int32) % U  # padding rows copy any prompt row; they are never read
        rows_B[: len(rows)] = [row.prompt_index for row in rows]
        last_B = last_U[rows_B]
        controls = dict(
            temperature=jnp.float32(sampling.temperature), top_p=jnp.float32(sampling.top_p),
            repetition_penalty=jnp.float32(sampling.repetition_penalty),
        )
        key = jax.random.key(sampling.seed)
        next_B, logprob_B, cache, seen_BxV = self._prefill(
            self._step_params, tokens_UxP, np.broadcast_to(np.arange(P, dtype=np.int32), (U, P)), last_U, key, controls,
            top_k=sampling.top_k, cache_len=S,
            # Which tokens each row has seen, for the repetition penalty; nothing to track without one.
            track_seen=sampling.repetition_penalty != 1.0,
            rows_B=rows_B if B > U else None,  # with one sample per prompt the rows stay as they are
        )
        inputs = (next_B, jnp.asarray(last_B + 1), jnp.int32(1))
        no_overrides = jnp.asarray(np.full((B, 2), -1, np.int32))

        # The host runs one step behind the device: it queues step k+1, which feeds
        # step k's samples, before reading step k's samples. A step's sample for a row
        # is used only if that step fed the row's last token at its position; the one
        # time it did not is right after a tool call closes, when the host overrides
        # the row's input with the forced output tokens, one per step.
        pending = (next_B, logprob_B, _Fed(last_B.copy(), np.array([r.last_token for r in rows] + [0] * (B - len(rows)))))
        # Each step appends a token to every live row, except right after a forced token.
        for _ in range(2 * sampling.max_new_tokens + 2):
            if pending is None:
                break
            queued = None
            if any(row.may_continue(sampling.max_new_tokens, context) for row in rows):
                overrides_Bx2 = np.full((B, 2), -1, np.int32)
                for b, row in enumerate(rows):
                    if row.finish_reason is None and row.forced_queue:
                        token = self._append(row, row.forced_queue.pop(0), 0.0, True, sampling, on_token)
                        overrides_Bx2[b] = (token, row.position)
                forced_B = overrides_Bx2[:, 1] >= 0
                next_B, logprob_B, cache, seen_BxV, inputs = self._decode[B >= _BATCHED_ROWS](
                    self._step_params, cache, seen_BxV, inputs, overrides_Bx2 if forced_B.any() else no_overrides, key, controls,
                    top_k=sampling.top_k,
                )
                # Unforced rows feed the pending step's samples, one position on; known once that step is read.
                fed = _Fed(np.where(forced_B, overrides_Bx2[:, 1], np.minimum(pending[2].position_B + 1, S - 1)),
                           np.where(forced_B, overrides_Bx2[:, 0], -1))
                queued = (next_B, logprob_B, fed)
            sampled_B, logprobs_B, read = np.asarray(pending[0]), np.asarray(pending[1]), pending[2]
            if queued is not None:
                queued[2].token_B[:] = np.where(queued[2].token_B < 0, sampled_B, queued[2].token_B)
            for b, row in enumerate(rows):
                if row.finish_reason is None and read.matches(b, row):
                    self._append(row, int(sampled_B[b]), float(logprobs_B[b]), False, sampling, on_token)
            pending = queued
        if any(row.finish_reason is None for row in rows):
            raise RuntimeError("sampling loop exceeded its step bound with unfinished rows (an engine bug)")
        return [[self._finish(r) for r in rows if r.prompt_index == i] for i in range(len(prompts))]

    def _append(self, row: _Row, token: int, logprob: float, forced: bool, sampling: SamplingParams,
                on_token: Callable[[int, int, int], None] | None) -> int:
        """Appends a token to the row (sampled, or forced tool output); sets finish_reason; returns the token."""
        row.tokens.append(token)
        row.logprobs.append(logprob)
        row.forced.append(forced)
        if on_token is not None:
            on_token(row.prompt_index, row.sample_index, token)
        before = len(row.text_bytes)
        if self.tokenizer is not None:
            row.text_bytes += self.tokenizer.decode_bytes([token])
        if forced:
            row.stop_scan_from = len(row.text_bytes)  # a tool's output is not the model's text: no stop string in it
        elif token in sampling.stop_token_ids:
            row.finish_reason, row.text_end = "stop", before
        elif row.tool_call is not None:
            self._collect_tool_call(row, token)
        elif token in self._tool_ids:
            row.tool_call = (self._tool_ids[token], [])
        if row.finish_reason is None and sampling.stop_strings and not forced:
            # Only a match that ends in this token's bytes is new: search from where it could start.
            start = max(row.stop_scan_from, before - max(len(s.encode()) for s in sampling.stop_strings) + 1)
            found = [i for i in (row.text_bytes.find(s.encode(), start) for s in sampling.stop_strings) if i >= 0]
            if found:
                row.finish_reason, row.text_end = "stop", min(found)
        if row.finish_reason is None and len(row.tokens) >= sampling.max_new_tokens:
            row.finish_reason = "length"
        if row.finish_reason is None and len(row.prompt) + len(row.tokens) >= self.cfg.max_seq_len:
            row.finish_reason = "context"
        return token

    def _collect_tool_call(self, row: _Row, token: int) -> None:
        (name, call_end, out_start, out_end), call_tokens = row.tool_call
        if token != call_end:
            call_tokens.append(token)
            return
        row.tool_call = None
        try:
            result = self.tools[name](self.tokenizer.decode(call_tokens))
        except Exception as error:  # tools should answer errors as text; one that raises must not end the batch
            result = f"Error: {type(error).__name__}: {error}"
        # Output text is encoded as ordinary text: a tool cannot forge control tokens either.
        row.forced_queue = [out_start, *self.tokenizer.encode(result), out_end]

    def _finish(self, row: _Row) -> Sample:
        text = row.text_bytes[: row.text_end].decode("utf-8", errors="replace")
        return Sample(row.tokens, row.logprobs, row.forced, row.finish_reason, text)


@dataclasses.dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    forced: list[bool] = dataclasses.field(default_factory=list)
    forced_queue: list[int] = dataclasses.field(default_factory=list)
    tool_call: tuple | None = None  # ((name, call_end, out_start, out_end), tokens so far) while a call is open
    text_bytes: bytearray = dataclasses.field(default_factory=bytearray)  # the tokens' bytes (none without a tokenizer)
    text_end: int | None = None  # where the sample's text ends in text_bytes: before a stop token or string
    stop_scan_from: int = 0  # stop strings may start here or later: after the last forced tool output
    finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Where the row's last token sits in its sequence."""
        return len(self.prompt) + len(self.tokens) - 1

    @property
    def last_token(self) -> int:
        return self.tokens[-1] if self.tokens else self.prompt[-1]

    def may_continue(self, max_new_tokens: int, context: int) -> bool:
        """Whether the row may still need a step after the one pending (a forced token always does)."""
        if self.finish_reason is not None:
            return False
        room = min(max_new_tokens - len(self.tokens), context - len(self.prompt) - len(self.tokens))
        return bool(self.forced_queue) or room > 1


@dataclasses.dataclass
class _Fed:
    """What one queued step fed each row: the position and the token (-1 until the host knows it)."""

    position_B: np.ndarray
    token_B: np.ndarray

    def matches(self, b: int, row: _Row) -> bool:
        """Whether the step fed the row's last token at its position, so its sample continues the row."""
        return self.position_B[b] == row.position and self.token_B[b] == row.last_token
