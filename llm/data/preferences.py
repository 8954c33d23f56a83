"""Preference pairs: a conversation so far and two assistant replies, one preferred by a person (or a rule).

    read_pairs(path)              JSONL, any of three shapes (detected per line):
                                  {"prompt": str | messages, "chosen": str | messages, "rejected": ...}
                                  (TRL's explicit prompt; when both sides are whole conversations, as in
                                  UltraFeedback, their shared prefix is the prompt), {"chosen": messages,
                                  "rejected": messages} (the shared prefix is the prompt), or Anthropic
                                  HH-RLHF transcripts
                                  {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}
    read_oasst_pairs(path)        OpenAssistant trees: adjacent human-ranked sibling replies (rank i over i + 1)
    read_hub_pairs(repo_id, ...)  a Hugging Face dataset by id (parquet or JSONL files of one split)
    render_pairs(pairs, tok, W)   both sides in the model's chat format -> `PairRows` of width W

A pair whose sides are equal, empty, or do not parse is skipped and counted, as
is one whose rendering is longer than the row (`render_pairs`); nothing stops a
run midway (`errors="raise"` raises a `PreferenceError` naming the file and
line instead). The reply is one assistant message: that is what a reward model
scores and what DPO's log-probabilities sum over.

Shape legend: N pairs, W row width (tokens).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from llm.data.conversations import Collector, Errors, Message, Records, _jsonl_records, _plain, check_messages
from llm.data.pipeline import _process_slice
from llm.data.sources import DataError, hub_dataset_files, validation_mask
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class PreferenceError(DataError):
    """A pair that cannot be trained on; the message names the file and line (or record)."""


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: tuple[Message, ...]  # the conversation so far, ending with the user's turn
    chosen: str  # the preferred assistant reply
    rejected: str
    key: str  # file:line, or the message ids
    group: str = ""  # what the train/validation split hashes (default: key): one prompt's pairs share a side

    @property
    def split_key(self) -> str:
        return self.group or self.key


class Pairs(Records):
    """The kept pairs of a source and how many were skipped, by reason."""

    noun = "pairs"


class _Collector(Collector):
    error = PreferenceError

    def __init__(self, errors: Errors):
        super().__init__(errors, Pairs([]))

    def add(self, prompt: Any, chosen: Any, rejected: Any, where: str, group: str = "") -> None:
        problem = check_pair(prompt, chosen, rejected)
        if problem is not None:
            self.bad(where, problem)
        else:
            self.out.items.append(Pair(tuple(prompt), chosen, rejected, where, group))


def check_pair(prompt: Any, chosen: Any, rejected: Any) -> str | None:
    """What makes a pair unusable, or None: the prompt must be a conversation ending with a user turn."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "a side is not text"
    if not chosen.strip() or not rejected.strip():
        return "an empty side"
    if chosen.strip() == rejected.strip():
        return "chosen equals rejected"
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return "no prompt"
    # A prompt is well formed when it plus a reply is a well-formed conversation.
    problem = check_messages([*prompt, {"role": "assistant", "content": chosen}])
    if problem is not None:
        return f"bad prompt ({problem[1]})"
    if prompt[-1].get("role") != "user":
        return "the prompt does not end with a user turn"
    return None


# ----------------------------------------------------------------------------- JSONL


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(transcript: str) -> list[Message] | None:
    """An HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`) as messages; None when it does not parse."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]


def split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], Any, Any]:
    """(prompt, chosen reply, rejected reply) of two whole conversations that differ only in their last message.

    A side whose last message is not the assistant's, or conversations that differ
    earlier, give `None` replies (the pair is then counted as unparsable).
    """
    prompt, last_c, last_r = chosen[:-1], chosen[-1:], rejected[-1:]
    if prompt != rejected[:-1] or not last_c or not last_r:
        return prompt, None, None
    if last_c[0].get("role") != "assistant" or last_r[0].get("role") != "assistant":
        return prompt, None, None
    return prompt, last_c[0].get("content"), last_r[0].get("content")


def _reply(side: Any) -> Any:
    """A reply given as text, or as a one-message list `[{"role": "assistant", "content": ...}]` (TRL)."""
    if isinstance(side, list) and len(side) == 1 and isinstance(side[0], Mapping) and \
            side[0].get("role") == "assistant":
        return side[0].get("content")
    return side


def pair_from_record(record: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    """(prompt messages, chosen text, rejected text) of one record in any supported shape; None if unrecognised."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if chosen is None or rejected is None:
        return None
    if "prompt" in record:
        chosen, rejected = _plain(chosen), _plain(rejected)
        if isinstance(chosen, list) and isinstance(rejected, list) and min(len(chosen), len(rejected)) > 1:
            return split_shared_prefix(chosen, rejected)  # whole conversations (UltraFeedback): the prefix is the prompt
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        return _plain(prompt), _reply(_plain(chosen)), _reply(_plain(rejected))
    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen_messages, rejected_messages = parse_hh(chosen), parse_hh(rejected)
        if chosen_messages is None or rejected_messages is None:
            return None
        return split_shared_prefix(chosen_messages, rejected_messages)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return split_shared_prefix(_plain(chosen), _plain(rejected))
    return None


def read_pairs(path: str | Path, *, errors: Errors = "skip") -> Pairs:
    """Pairs from a JSONL file (`.jsonl` or `.jsonl.gz`) in any shape `pair_from_record` reads."""
    collector = _Collector(errors)
    for where, record in _jsonl_records(path, collector):
        _add_record(collector, record, where)
    return collector.out


def _add_record(collector: _Collector, record: Mapping[str, Any], where: str) -> None:
    parsed = pair_from_record(record)
    if parsed is None:
        collector.bad(where, "not a preference pair (no chosen/rejected, or a transcript that does not parse)")
        return
    prompt, chosen, rejected = parsed
    if chosen is None:
        collector.bad(where, "the two sides differ before their last assistant reply")
        return
    collector.add(prompt, chosen, rejected, where, group=_prompt_key(prompt))


def _prompt_key(prompt: Any) -> str:
    """Pairs of one prompt share a split side: the key is the prompt's text."""
    if not isinstance(prompt, list):
        return ""
    return "\x1e".join(f"{m.get('role')}:{m.get('content')}" for m in prompt if isinstance(m, Mapping))


# ----------------------------------------------------------------------------- OpenAssistant


def read_oasst_pairs(path: str | Path, *, errors: Errors = "skip") -> Pairs:
    """Adjacent human-ranked sibling replies of OpenAssistant trees: (rank i, rank i + 1) for each parent.

    The prompt is the path from the tree's root to the parent (a prompter
    message). Deleted messages, ones that failed review and their subtrees are
    left out; pairs of one tree share a train/validation side.
    """
    collector = _Collector(errors)
    rows = list(_jsonl_records(path, collector))
    _oasst_pairs(rows, collector)
    return collector.out


def _oasst_pairs(rows: Sequence[tuple[str, Mapping]], collector: _Collector) -> None:
    by_id, children = {}, collections.defaultdict(list)
    for where, row in rows:
        if "message_id" not in row or "role" not in row:
            collector.bad(where, "not an OpenAssistant message row")
            continue
        if row.get("deleted") or row.get("review_result") is False:
            continue
        by_id[row["message_id"]] = row
        children[row.get("parent_id")].append((where, row))
    roles = {"prompter": "user", "assistant": "assistant"}

    def path_to(message_id: str) -> list[Message] | None:
        path = []
        while message_id is not None:
            row = by_id.get(message_id)
            if row is None:  # an ancestor was deleted or failed review
                return None
            path.append({"role": roles.get(row["role"], row["role"]), "content": row.get("text")})
            message_id = row.get("parent_id")
        return path[::-1]

    for parent_id, kids in children.items():
        ranked = sorted(((where, k) for where, k in kids if k.get("role") == "assistant" and k.get("rank") is not None),
                        key=lambda item: item[1]["rank"])
        if len(ranked) < 2 or parent_id is None:
            continue
        prompt = path_to(parent_id)
        tree = str(by_id[parent_id].get("message_tree_id", parent_id))
        for (where, better), (_, worse) in zip(ranked, ranked[1:]):
            if prompt is None:
                collector.bad(where, "an ancestor message was deleted or failed review")
                continue
            collector.add(prompt, better.get("text"), worse.get("text"), f"{where} ({better['message_id']} over "
                          f"{worse['message_id']})", group=tree)


# ----------------------------------------------------------------------------- the hub


def read_hub_pairs(repo_id: str, split: str = "train", *, folder: str = "", max_files: int | None = None,
                   cache_dir: str | None = None, errors: Errors = "skip") -> Pairs:
    """A Hugging Face preference dataset by id: the parquet or JSONL files of `split` under `folder`.

    Examples: `Anthropic/hh-rlhf` (folder `harmless-base`, split `test`: JSONL
    transcripts), `HuggingFaceH4/ultrafeedback_binarized` (split `train_prefs`:
    parquet, message lists), `OpenAssistant/oasst1` (split `validation`: message
    rows, read as ranked siblings). Downloads share FineWeb's cache, progress and
    offline errors (`sources.hub_dataset_files`).
    """
    import pyarrow.parquet as pq

    def keep(name: str) -> bool:
        base = Path(name).name
        return base.startswith(split) and (base.endswith(".parquet") or ".jsonl" in base)

    paths = hub_dataset_files(repo_id, folder, keep, max_files=max_files, cache_dir=cache_dir,
                              what=f"split {split}" + (f", folder {folder}/" if folder else ""),
                              fallback="use local files (read_pairs, read_oasst_pairs)")
    collector = _Collector(errors)
    oasst_rows = []
    for path in paths:
        if ".jsonl" in Path(path).name:
            records = list(_jsonl_records(path, collector))
        else:
            records = [(f"{path}:row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
        for where, record in records:
            if "message_id" in record and "parent_id" in record:
                oasst_rows.append((where, record))
            else:
                _add_record(collector, record, where)
    if oasst_rows:
        _oasst_pairs(oasst_rows, collector)
    return collector.out


def open_pairs(kind: str, path: str, **options: Any) -> Pairs:
    """A source by kind: `jsonl` (any `read_pairs` shape), `oasst` (ranked siblings) or `hub` (path = repo id)."""
    readers = {"jsonl": read_pairs, "oasst": read_oasst_pairs, "hub": read_hub_pairs}
    if kind not in readers:
        raise ValueError(f"unknown preference source kind {kind!r}; expected one of {sorted(readers)}")
    return readers[kind](path, **options)


def split_pairs(pairs: Sequence[Pair], val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) by a hash of each pair's split key (its prompt or tree): stable under reordering."""
    held = validation_mask([p.split_key for p in pairs], val_fraction)
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


# ----------------------------------------------------------------------------- rendering


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
