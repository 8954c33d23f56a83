"""KV-cache sampling engine: batched prompts, every sampling control, stop strings, tool calls.

    engine = Engine(cfg, params, tokenizer, tools={"python": Calculator()})
    samples = engine.generate([prompt_ids], SamplingParams(temperature=0.8, top_p=0.95, n=4))

This module is the host side: requests and their samples, shape buckets, the loop
that keeps the device busy, stop conditions and tool calls. The compiled prefill
and decode steps, and the layouts they read the model in, are
`llm.engine_steps`'; the logits -> token math is `llm.sampling`'s. The host
queues decode step k+1 before it reads step k's tokens to apply stop conditions
and tool calls; a tool's output is forced in by overriding that row's input.
Shapes are bucketed (batch to a power of two, lengths to powers of two), so a
step compiles once per bucket; the sampling knobs never recompile, except top-k.

Shape legend: U prompt rows, B batch rows (prompts x samples), T new tokens, S cache length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm.chat_format import tool_tokens
from llm.config import ModelConfig
from llm.engine_steps import Layout, decode_step, default_layout, prefill_step
from llm.tools import Calculator, Tool


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


def engine_for(cfg: ModelConfig, params, tokenizer, tools: bool) -> Engine:
    """The engine on `params` as they are placed (say, sharded on the training mesh), with the calculator if asked.

    The calculator is the `python` tool, given only when `tools` and the tokenizer has that tool's tokens.
    """
    use = tools and tokenizer.has_tool("python")
    return Engine(cfg, params, tokenizer, tools={"python": Calculator()} if use else None)


def _bucket(n: int, cap: int | None = None, minimum: int = 1) -> int:
    size = max(minimum, 1 << max(0, n - 1).bit_length())
    return min(size, cap) if cap else size


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Samples from one model; `tokenizer` is needed for stop strings, tool calls and `text`.

    `layout` (how the steps read the model) defaults to the backend's (`engine_steps.default_layout`).
    """

    def __init__(self, cfg: ModelConfig, params, tokenizer=None, tools: Mapping[str, Tool] | None = None,
                 layout: Layout | None = None):
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
        self._layout = layout or default_layout()
        self._step_cfg, self._step_params = self._layout.place(cfg, params)
        self._prefill = prefill_step(self._step_cfg, self._layout)

    def _decode_step(self, batch: int) -> Callable:
        """The jitted decode step for `batch` rows: one per set of compiler options the layout asks for."""
        return decode_step(self._step_cfg, self._layout, self._layout.compiler_options(batch))

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
        decode = self._decode_step(B)

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
                next_B, logprob_B, cache, seen_BxV, inputs = decode(
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
