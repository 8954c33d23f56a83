"""Preference pairs as token rows and batches: both sides rendered in the model's chat format, then batched.

    train, val, lines = load_sources(config.data.sources, tokenizer, width, val_fraction)   # per source
    rows = concat_rows(train); batches = pair_batches(rows, batch_size=16, seed=0)

A pair whose rendering is longer than the row, that renders both sides the same,
or that the chat format cannot render is dropped and counted (`PairRows.dropped`).

Shape legend: N pairs, W row width (tokens).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from llm.data.conversations import Message
from llm.data.pipeline import _process_slice
from llm.data.preferences import Pair, open_pairs, split_pairs
from llm.errors import DataError
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PairRows:
    """Both sides of N pairs as token rows: `{chosen,rejected}_tokens` [N, W] int32 (0 after the end),
    `{chosen,rejected}_mask` [N, W] (1 on the reply's tokens, its end-of-turn included), `_length` [N]."""

    arrays: dict[str, np.ndarray]
    keys: list[str]
    dropped: collections.Counter

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        return f"{len(self)} pairs" + (f" (dropped {drops})" if drops else "")

    def take(self, index: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(index, np.int64)] for k, v in self.arrays.items()}


def render_reply(tokenizer: Tokenizer, prompt: Sequence[Message], reply: str) -> tuple[list[int], list[int]]:
    """(tokens, reply mask) of a prompt and one assistant reply in the chat format; the mask is 1 on the reply
    (its content and the token closing its turn), 0 on the prompt and on the format's headers."""
    ids, mask = tokenizer.render_conversation([*prompt, {"role": "assistant", "content": reply}])
    start = len(tokenizer.render_for_completion(prompt))
    # Rendering a prompt for completion is the conversation's own prefix; a template for
    # which it is not would put the mask on the wrong tokens, so it is checked, not assumed.
    if tokenizer.render_for_completion(prompt) != ids[:start]:
        raise ValueError(f"{tokenizer.name}: the chat format renders a prompt differently alone and with a reply")
    return ids, [0] * start + mask[start:]


def render_pairs(pairs: Iterable[Pair], tokenizer: Tokenizer, width: int) -> PairRows:
    """Both sides of each pair rendered once; a pair with a side longer than `width` tokens is dropped and counted."""
    sides = {"chosen": ([], []), "rejected": ([], [])}
    keys, dropped = [], collections.Counter()
    for pair in pairs:
        try:
            rendered = {side: render_reply(tokenizer, pair.prompt, getattr(pair, side)) for side in sides}
        except (ValueError, TypeError, KeyError) as e:
            log.info("%s: dropped, cannot render it: %s", pair.key, e)
            dropped["unrenderable"] += 1
            continue
        if any(len(ids) > width for ids, _ in rendered.values()):
            dropped["longer than the row"] += 1
            continue
        if rendered["chosen"][0] == rendered["rejected"][0]:
            dropped["chosen equals rejected"] += 1
            continue
        for side, (ids, mask) in rendered.items():
            sides[side][0].append(ids)
            sides[side][1].append(mask)
        keys.append(pair.key)
    arrays = {}
    for side, (all_ids, all_masks) in sides.items():
        tokens = np.zeros((len(keys), width), np.int32)
        masks = np.zeros((len(keys), width), np.float32)
        for i, (ids, mask) in enumerate(zip(all_ids, all_masks)):
            tokens[i, :len(ids)], masks[i, :len(ids)] = ids, mask
        arrays |= {f"{side}_tokens": tokens, f"{side}_mask": masks,
                   f"{side}_length": np.asarray([len(ids) for ids in all_ids], np.int32).reshape(len(keys))}
    return PairRows(arrays, keys, dropped)


def load_sources(sources: Mapping[str, Mapping[str, Any]], tokenizer: Tokenizer, width: int, val_fraction: float
                 ) -> tuple[dict[str, PairRows], dict[str, PairRows], list[str]]:
    """(training rows, held-out rows) per named source, rendered, and log lines saying what was kept and dropped.

    Each source is `{kind, path, [val_fraction], ...reader options}` (a stage config's `data.sources`).
    """
    train, val, lines = {}, {}, []
    for name, spec in sources.items():
        options = {k: v for k, v in spec.items() if k not in ("kind", "path", "val_fraction")}
        found = open_pairs(spec["kind"], spec["path"], **options)
        train_pairs, val_pairs = split_pairs(found.items, spec.get("val_fraction", val_fraction))
        train[name], val[name] = render_pairs(train_pairs, tokenizer, width), render_pairs(val_pairs, tokenizer, width)
        lines.append(f"{name} ({spec['kind']}): {found.describe()}; train {train[name].describe()}, "
                     f"held out {val[name].describe()}")
    return train, val, lines


def concat_rows(parts: Mapping[str, PairRows]) -> PairRows:
    """One `PairRows` of several sources' rows (a training stream then mixes them in proportion to their sizes)."""
    dropped = sum((p.dropped for p in parts.values()), start=collections.Counter())
    kept = [p for p in parts.values() if len(p)]
    if not kept:
        return PairRows({}, [], dropped)
    return PairRows({k: np.concatenate([p.arrays[k] for p in kept]) for k in kept[0].arrays},
                    [key for p in kept for key in p.keys], dropped)


# ----------------------------------------------------------------------------- batches


def pair_batches(rows: PairRows, *, batch_size: int, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """Endless batches of training pairs (this process's `batch_size / process_count`), reshuffled every epoch;
    `iter` of it is checkpointable. Each batch carries `weights` (all 1)."""
    index, count = _process_slice(process_index, process_count)
    if batch_size % count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the {count} processes")
    if len(rows) == 0:
        raise DataError("no training pairs left after rendering: " + rows.describe())
    local = batch_size // count
    ds = grain.MapDataset.range(len(rows)).shuffle(seed=seed).repeat()[index::count]
    return ds.batch(local).map(lambda index_B: rows.take(index_B) | {"weights": np.ones(len(index_B), np.float32)}
                               ).to_iter_dataset()


def padded_pair_batches(rows: PairRows, batch_size: int, process_index: int = 0, process_count: int = 1
                        ) -> list[dict[str, np.ndarray]]:
    """This process's slice of every pair, once, in batches of `batch_size / process_count`; the last batches are
    filled with pairs of weight 0, and every process gets as many batches (evaluation)."""
    local = batch_size // process_count
    n_batches = -(-len(rows) // batch_size)
    mine = np.arange(len(rows))[process_index::process_count]
    out = []
    for b in range(n_batches):
        index = mine[b * local:(b + 1) * local]
        weights = np.zeros(local, np.float32)
        weights[:len(index)] = 1.0
        padded = np.concatenate([index, np.zeros(local - len(index), np.int64)])
        out.append(rows.take(padded) | {"weights": weights})
    return out
