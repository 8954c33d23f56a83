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

Rendered into token rows and batches by `llm.data.pair_rows`. A pair whose sides
are equal, empty, or do not parse is skipped and counted; nothing stops a run
midway (`errors="raise"` raises a `PreferenceError` naming the file and
line instead). The reply is one assistant message: that is what a reward model
scores and what DPO's log-probabilities sum over.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm.data.conversations import Collector, Errors, Message, Records, _jsonl_records, _plain, check_messages
from llm.data.hub import hub_dataset_files
from llm.data.sources import validation_mask
from llm.errors import DataError

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
    offline errors (`hub.hub_dataset_files`).
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
