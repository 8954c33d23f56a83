"""Conversations -> packed, masked token rows for supervised fine-tuning, on grain.

Legend: B rows per batch on this process, T = seq_len, W = T + 1 (a row holds the
inputs and, shifted by one, the targets).

    mixture {source: conversations, epochs}  -> render each once (chat format + loss mask),
    drop and count the ones longer than W    -> mixture epochs of indices (`epoch_indices`, each
    shuffled, fractional parts redrawn)      -> this process's slice of the stream
    -> groups of `pack_window` conversations -> best-fit rows (`best_fit_rows`, no crop) -> batch B

* Rendering is the tokenizer's (`render_conversation`): the mask is 1 on the
  assistant's content, its tool calls and the token that closes its turn, 0 on
  system, user and tool-output tokens and on the chat format's headers.
* Packing never splits a conversation: each row takes the longest remaining
  conversation of its group that fits the space left, and is closed (padded) when
  none does. Every conversation of an epoch lands in exactly one row once.
  Rows carry `segment_ids` (1, 2, ... per conversation, 0 on padding) and
  `positions` (restarting at 0 per conversation), so attention never crosses
  conversations and each one sees the positions it would see alone.
* `loss_mask` is the rendered mask of each target token, and 0 where a target
  belongs to another conversation than its input (a row's boundaries, padding).
* The iterator's state is a position in the index stream (grain replays from the
  start of the current packing group), so it checkpoints beside the train state.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from llm.data.conversations import Conversation
from llm.data.pipeline import _process_slice, best_fit_rows
from llm.data.sources import validation_mask
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class Rendered:
    """Token ids and loss masks of every kept conversation, and what was dropped, per source."""

    tokens: list[np.ndarray]  # int32 [n_i] per conversation
    masks: list[np.ndarray]  # int32 [n_i]: 1 where the token is trained on
    sources: list[str]  # the source of each conversation
    dropped: dict[str, collections.Counter]  # source -> reason -> count

    def of(self, source: str) -> np.ndarray:
        """Indices of one source's conversations."""
        return np.array([i for i, s in enumerate(self.sources) if s == source], np.int64)

    def describe(self) -> str:
        parts = []
        for name in dict.fromkeys(self.sources + list(self.dropped)):
            kept = sum(s == name for s in self.sources)
            drops = self.dropped.get(name, {})
            parts.append(f"{name} {kept}" + (" (dropped " + ", ".join(
                f"{n} {reason}" for reason, n in sorted(drops.items())) + ")" if drops else ""))
        return ", ".join(parts)


def render(mixture: Mapping[str, Sequence[Conversation]], tokenizer: Tokenizer, max_tokens: int) -> Rendered:
    """Renders each conversation once; ones over `max_tokens` or that cannot be rendered are dropped and counted."""
    out = Rendered([], [], [], {})
    for name, conversations in mixture.items():
        dropped = out.dropped.setdefault(name, collections.Counter())
        for conversation in conversations:
            try:
                ids, mask = tokenizer.render_conversation(conversation.messages)
            except (ValueError, TypeError, KeyError) as e:  # e.g. tool calls for a tokenizer without tool tokens
                log.info("%s: dropped, cannot render it: %s", conversation.key, e)
                dropped["unrenderable"] += 1
                continue
            if len(ids) > max_tokens:
                dropped["over-long"] += 1
                continue
            out.tokens.append(np.asarray(ids, np.int32))
            out.masks.append(np.asarray(mask, np.int32))
            out.sources.append(name)
        if not dropped:
            del out.dropped[name]
    return out


def split_keys(conversations: Sequence[Conversation], val_fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) by `sources.validation_mask` of each conversation's split key, stable under reordering."""
    held = validation_mask([c.split_key for c in conversations], val_fraction)
    return [c for c, h in zip(conversations, held) if not h], [c for c, h in zip(conversations, held) if h]


def epoch_indices(rendered: Rendered, epochs: Mapping[str, float], seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Mixture epoch `epoch`: each source's conversations `epochs[source]` times (2.5: twice, then a random half).

    The fractional part is drawn again every mixture epoch (from `seed` and
    `epoch`), so over many epochs every conversation of the source is seen; the
    count per source, and so the epoch's length, is the same every epoch.
    """
    picked = []
    for name, times in epochs.items():
        if times < 0:
            raise ValueError(f"source {name!r}: epochs must be >= 0, got {times}")
        ids = rendered.of(name)
        whole, fraction = divmod(float(times), 1.0)
        picked += [ids] * int(whole)
        if fraction and len(ids):
            rng = np.random.default_rng([seed, epoch, zlib.crc32(name.encode())])
            picked.append(np.sort(rng.choice(ids, int(round(fraction * len(ids))), replace=False)))
    indices = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    if not len(indices):
        raise ValueError(f"the mixture {dict(epochs)} selects no conversation")
    return indices


@dataclasses.dataclass
class _MixtureStream(grain.transforms.MapWithIndex):
    """Position k of the index stream -> the conversation at k % n of mixture epoch k // n (shuffled per epoch)."""

    rendered: Rendered
    epochs: Mapping[str, float]
    seed: int
    shuffle: bool
    per_epoch: int  # conversations per mixture epoch: the same every epoch
    _cached: tuple[int, np.ndarray] | None = None  # the epoch being read; the stream reads them in order

    def map_with_index(self, k: int, _) -> int:
        return int(self.epoch(k // self.per_epoch)[k % self.per_epoch])

    def epoch(self, e: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != e:
            ids = epoch_indices(self.rendered, self.epochs, self.seed, e)
            self._cached = (e, np.random.default_rng([self.seed, e]).permutation(ids) if self.shuffle else ids)
        return self._cached[1]


def pack(rendered: Rendered, indices: Sequence[int], width: int) -> list[dict[str, np.ndarray]]:
    """Rows {inputs, targets, loss_mask, segment_ids, positions} (int32 [W - 1]) of these conversations, none split."""
    out = []
    for row in best_fit_rows([len(rendered.tokens[i]) for i in indices], width, crop=False):
        tokens_W = np.zeros(width, np.int32)
        mask_W = np.zeros(width, np.int32)
        segments_W = np.zeros(width, np.int32)
        positions_W = np.zeros(width, np.int32)
        start = 0
        for segment, (j, n) in enumerate(row, 1):
            i = indices[j]
            tokens_W[start:start + n] = rendered.tokens[i]
            mask_W[start:start + n] = rendered.masks[i]
            segments_W[start:start + n] = segment
            positions_W[start:start + n] = np.arange(n)
            start += n
        same = (segments_W[1:] == segments_W[:-1]) & (segments_W[1:] > 0)
        out.append({"inputs": tokens_W[:-1], "targets": tokens_W[1:], "loss_mask": mask_W[1:] * same,
                    "segment_ids": segments_W[:-1], "positions": positions_W[:-1]})
    return out


@dataclasses.dataclass(frozen=True)
class _Pack(grain.experimental.FlatMapTransform):
    """A group of conversation indices -> its best-fit rows."""

    rendered: Rendered
    width: int
    max_fan_out: int = 1 << 20

    def flat_map(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return pack(self.rendered, list(indices), self.width)


def make_chat_pipeline(
    rendered: Rendered,
    epochs: Mapping[str, float],
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    pack_window: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Batches of packed conversations (dicts of int32 [batch_size // process_count, seq_len]); `iter` is checkpointable.

    The index stream is mixture epoch after mixture epoch (`epoch_indices`, each
    shuffled and its fractional parts drawn anew); `num_epochs=None` never ends.
    Processes take disjoint slices of the stream. Rows are packed from groups of
    `pack_window` consecutive conversations.
    """
    index, count = _process_slice(process_index, process_count)
    if batch_size % count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the {count} processes")
    used = [i for name, times in epochs.items() if times > 0 for i in rendered.of(name)]
    longest = max((len(rendered.tokens[i]) for i in used), default=0)
    if longest > seq_len + 1:
        raise ValueError(f"a conversation of {longest} tokens does not fit a row of seq_len + 1 = {seq_len + 1}: "
                         f"render with max_tokens=seq_len + 1")
    per_epoch = len(epoch_indices(rendered, epochs, seed))
    ds = grain.MapDataset.range(per_epoch).repeat(num_epochs).map_with_index(
        _MixtureStream(rendered, dict(epochs), seed, shuffle, per_epoch))[index::count]
    ds = ds.batch(pack_window, batch_fn=list).to_iter_dataset()
    ds = grain.experimental.FlatMapIterDataset(ds, _Pack(rendered, seq_len + 1))
    if shuffle:  # best fit emits long-first rows; mix them
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=pack_window // 4 or 1, seed=seed)
    return ds.batch(batch_size // count, drop_remainder=True)


def padded_batches(rows: list[dict[str, np.ndarray]], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Rows in batches of `batch_size`, the last one filled with rows that train nothing (evaluation)."""
    if not rows:
        return []
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows = rows + [empty] * (-len(rows) % batch_size)
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def batch_spec(seq_len: int, local_batch: int) -> dict[str, Any]:
    """Shapes and dtypes of one batch."""
    return {k: np.zeros((local_batch, seq_len), np.int32) for k in BATCH_KEYS}
