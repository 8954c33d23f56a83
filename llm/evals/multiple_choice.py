"""Multiple choice by log-likelihood: each choice's summed log-probability as a continuation of the context.

    scores = score(cfg, params, tokenizer, items)            # one ChoiceScores per MultipleChoice
    summarize(scores)   # {"acc", "acc_norm", "items", "truncated"}

The rule is lm-evaluation-harness's (Gao et al., "A framework for few-shot
language model evaluation"; `lm_eval/models/huggingface.py` `_encode_pair` and
`lm_eval/api/task.py` `process_results` for `output_type: multiple_choice`):

- Tokens: whitespace that ends the context moves to the front of the choice; the
  choice's tokens are those of `encode(context + choice)` past `len(encode(context))`
  (so a context is encoded once and shared by its choices, and the boundary
  token is the one the whole text would have); the model reads
  `(context + choice)[:-1]` and the choice's tokens are scored. An empty context
  is preceded by the end-of-text token, as the harness does.
- `acc`: the choice with the largest summed log-likelihood. `acc_norm`: the
  largest log-likelihood divided by the choice's length in characters,
  `len(choice)` of the Python string without the delimiter the harness puts in
  front of it (its `completion_len`; it keeps a separate `acc_bytes`, not used
  here). Ties go to the first choice (`np.argmax`).
- Context too long: `(context + choice)` keeps its last `max_len + 1` tokens
  (truncated from the left, as the harness does); such items are counted.

Departures, none of which changes a score: the rows a forward reads are packed
(several context+choice sequences per row, each with its own positions and
`segment_ids`, so none attends to another; the harness pads one per row), and
`prefix` (e.g. the tokenizer's document-start token) may be put before every
context; the harness's `hf` backend adds none for GPT-2/Llama tokenizers, nor
does `prefix=()`, the default. Chat items (`MultipleChoice.messages`) put the
rendered conversation with an open assistant turn before the context. The batch
is sharded over the mesh's batch axes; one process only (no multi-host slices).

Shape legend: B rows, W row width (tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import sharding
from llm.config import ModelConfig
from llm.tasks import MultipleChoice
from llm.train.losses import token_logprobs


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """One item's per-choice log-likelihoods (natural log, summed over the choice's tokens)."""

    logliks: tuple[float, ...]
    lengths: tuple[int, ...]  # characters of each choice: acc_norm's divisor
    label: int
    truncated: bool = False  # some context + choice lost tokens on the left
    key: str = ""

    @property
    def pred(self) -> int:
        return int(np.argmax(self.logliks))

    @property
    def pred_norm(self) -> int:
        return int(np.argmax(np.asarray(self.logliks) / np.maximum(np.asarray(self.lengths, np.float64), 1.0)))


@dataclasses.dataclass(frozen=True)
class _Request:
    item: int
    choice: int
    ids: tuple[int, ...]  # context + choice tokens, after truncation
    n_choice: int  # the last n_choice of `ids` are scored
    truncated: bool


def encode_requests(tokenizer, items: Sequence[MultipleChoice], max_len: int, prefix: Sequence[int] = ()
                    ) -> list[_Request]:
    """The harness's token split of every (context, choice), left-truncated to `max_len` model inputs."""
    requests = []
    for i, item in enumerate(items):
        if not item.choices:
            raise ValueError(f"item {i} ({item.key or 'no key'}) has no choices")
        if not 0 <= item.label < len(item.choices):
            raise ValueError(f"item {i} ({item.key or 'no key'}): label {item.label} outside its {len(item.choices)} choices")
        context = item.context
        moved = context[len(context.rstrip()):]  # trailing whitespace belongs to the continuation
        context = context[: len(context) - len(moved)]
        head = list(prefix) + (list(tokenizer.render_for_completion(item.messages)) if item.messages else [])
        context_ids = tokenizer.encode(context)
        if not head and not context_ids:
            head = [tokenizer.eot]
        for j, choice in enumerate(item.choices):
            choice_ids = tokenizer.encode(context + moved + choice)[len(context_ids):]
            if not choice_ids:
                raise ValueError(f"item {i} ({item.key or 'no key'}): choice {j} {choice!r} encodes to no tokens")
            if len(choice_ids) > max_len:
                raise ValueError(f"item {i} ({item.key or 'no key'}): choice {j} has {len(choice_ids)} tokens, "
                                 f"more than the {max_len} the model reads")
            ids = head + context_ids + choice_ids
            truncated = len(ids) - 1 > max_len
            requests.append(_Request(i, j, tuple(ids[-(max_len + 1):]), len(choice_ids), truncated))
    return requests


def pack(requests: Sequence[_Request], width: int) -> list[list[int]]:
    """Request indices per row, longest first, first fit: each row's inputs (len(ids) - 1 each) fit in `width`."""
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r].ids))
    rows, free = [], []
    for r in order:
        need = len(requests[r].ids) - 1
        for k, room in enumerate(free):
            if room >= need:
                rows[k].append(r)
                free[k] -= need
                break
        else:
            rows.append([r])
            free.append(width - need)
    return rows


def _batch_arrays(requests: Sequence[_Request], rows: Sequence[Sequence[int]], n_rows: int, width: int) -> dict:
    """inputs/targets/positions/segment_ids/score_mask [n_rows, width] for `rows` (the rest are padding rows)."""
    arrays = {name: np.zeros((n_rows, width), np.int32) for name in ("inputs", "targets", "positions", "segment_ids")}
    mask_BxW = np.zeros((n_rows, width), np.float32)
    for b, row in enumerate(rows):
        start = 0
        for segment, r in enumerate(row, start=1):
            ids = np.asarray(requests[r].ids, np.int32)
            n = len(ids) - 1
            span = slice(start, start + n)
            arrays["inputs"][b, span], arrays["targets"][b, span] = ids[:-1], ids[1:]
            arrays["positions"][b, span] = np.arange(n)
            arrays["segment_ids"][b, span] = segment
            mask_BxW[b, start + n - requests[r].n_choice: start + n] = 1.0
            start += n
    return {**arrays, "score_mask": mask_BxW}


@functools.partial(jax.jit, static_argnums=(0,))
def _masked_logprobs(cfg: ModelConfig, params: Any, batch: dict) -> jax.Array:
    logprobs_BxW = token_logprobs(cfg, params, batch)
    return jnp.where(batch["score_mask"] > 0, logprobs_BxW, 0.0)


def _batch_axis_size(mesh, rules) -> int:
    spec = sharding.logical_to_spec(("batch",), rules)[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[name] for name in names)


def score(
    cfg: ModelConfig,
    params: Any,
    tokenizer,
    items: Sequence[MultipleChoice],
    *,
    batch_rows: int = 16,
    row_len: int = 256,
    max_len: int | None = None,
    prefix: Sequence[int] = (),
    mesh=None,
    rules=None,
    on_progress: Callable[[int], None] | None = None,
) -> list[ChoiceScores]:
    """Every item's per-choice log-likelihoods, about `batch_rows` x `row_len` packed tokens per forward.

    `max_len` (default the model's context) bounds what the model reads of a context
    and choice. With `mesh` and `rules` the rows are sharded over the batch axes (the
    caller places `params`). `on_progress(n)` is told of each n items finished.
    """
    max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
    requests = encode_requests(tokenizer, items, max_len, prefix)
    longest = max((len(r.ids) - 1 for r in requests), default=1)
    width = min(max_len, max(row_len, 1 << (longest - 1).bit_length()))
    rows = pack(requests, width)
    # A forward reads about batch_rows x row_len tokens however long the rows: wider rows (long few-shot
    # contexts) come fewer at a time, which bounds the [rows, width, vocab] logits in memory.
    n_rows = max(1, batch_rows * row_len // width)
    placement = None
    if mesh is not None:
        per = _batch_axis_size(mesh, rules)
        n_rows = -(-n_rows // per) * per  # every device gets whole rows
        placement = sharding.batch_sharding(mesh, rules)
    totals = np.zeros(len(requests), np.float64)
    left = np.bincount([r.item for r in requests], minlength=len(items))  # choices still unscored, per item
    for start in range(0, len(rows), n_rows):
        chunk = rows[start:start + n_rows]
        batch = _batch_arrays(requests, chunk, n_rows, width)
        if placement is not None:
            batch = jax.device_put(batch, placement)
            with sharding.use_rules(mesh, rules):
                logprobs_BxW = np.asarray(_masked_logprobs(cfg, params, batch))
        else:
            logprobs_BxW = np.asarray(_masked_logprobs(cfg, params, batch))
        finished = 0
        for b, row in enumerate(chunk):
            start_t = 0
            for r in row:
                n = len(requests[r].ids) - 1
                totals[r] = float(logprobs_BxW[b, start_t:start_t + n].astype(np.float64).sum())
                start_t += n
                left[requests[r].item] -= 1
                finished += left[requests[r].item] == 0
        if on_progress is not None and finished:
            on_progress(int(finished))
    by_item: list[list[_Request]] = [[] for _ in items]
    for r, request in enumerate(requests):
        by_item[request.item].append(r)
    return [
        ChoiceScores(
            logliks=tuple(float(totals[r]) for r in by_item[i]),
            lengths=tuple(len(c) for c in item.choices),
            label=item.label,
            truncated=any(requests[r].truncated for r in by_item[i]),
            key=item.key,
        )
        for i, item in enumerate(items)
    ]


def summarize(scores: Sequence[ChoiceScores]) -> dict[str, float | int]:
    """acc, acc_norm (means over items), items, and how many items were truncated."""
    if not scores:
        raise ValueError("no items scored")
    return {
        "acc": float(np.mean([s.pred == s.label for s in scores])),
        "acc_norm": float(np.mean([s.pred_norm == s.label for s in scores])),
        "items": len(scores),
        "truncated": int(sum(s.truncated for s in scores)),
    }
