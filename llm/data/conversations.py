"""Where conversations come from, each normalised to messages the tokenizer renders.

A conversation is a list of `{"role": "system" | "user" | "assistant" | "tool", "content": ...}`
(the format of `Tokenizer.render_conversation`; assistant content may be a list of
parts ending in a tool call, answered by the next `tool` message). Sources:

    read_openai(path)          {"messages": [...]} JSONL (OpenAI's fine-tuning format)
    read_sharegpt(path)        {"conversations": [{"from": "human" | "gpt" | ..., "value": ...}]} JSONL
    read_oasst(path)           OpenAssistant message trees (oasst1/oasst2 rows): the best-ranked path
                               per tree, or every ranked path (`all_paths=True`)
    read_hub(repo_id, split)   a Hugging Face dataset by id (parquet, any of the three shapes above)
    collect(pairs)             (key, messages) pairs from elsewhere, checked the same way: the
                               conversations a task contributes (`llm.tasks`: GSM8K with the
                               calculator, letter counting, who the assistant is, ...)

Every reader returns `Conversations` (the kept ones and a count of skips by
reason). Bad input never stops a run midway: a line that is not JSON, an unknown
role, an empty assistant turn, a conversation that opens with the assistant or
has no assistant turn is skipped and counted (`errors="skip"`, the default), or
raised as a `ConversationError` naming the file and line (`errors="raise"`).
Content that spells control tokens (`<|im_end|>`) is kept as it is: the
tokenizer encodes all content as ordinary text, so it stays text.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from llm.chat_format import ROLES, TOOLS
from llm.data.hub import hub_dataset_files
from llm.errors import DataError

log = logging.getLogger(__name__)

Message = dict[str, Any]
Errors = Literal["skip", "raise"]


class ConversationError(DataError):
    """A conversation that cannot be trained on; the message names the file and line (or record)."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: list[Message]
    key: str  # stable id (file:line, tree id, ...)
    group: str = ""  # what the train/validation split hashes (default: key): one tree's paths share a side

    @property
    def split_key(self) -> str:
        return self.group or self.key


@dataclasses.dataclass
class Records:
    """The kept records of a source and how many were skipped, by reason (`noun` names them in `describe`)."""

    items: list
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    noun: ClassVar[str] = "records"

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def describe(self) -> str:
        skips = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{len(self.items)} {self.noun}" + (f" ({sum(self.skipped.values())} skipped: {skips})" if skips else "")


class Conversations(Records):
    """The kept conversations of a source and how many were skipped, by reason."""

    noun = "conversations"


class Collector:
    """Validates records as they are read; skips and counts, or raises as `error`, the bad ones."""

    error: type[Exception] = ValueError

    def __init__(self, errors: Errors, out: Records):
        if errors not in ("skip", "raise"):
            raise ValueError(f"errors must be 'skip' or 'raise', got {errors!r}")
        self.errors, self.out = errors, out

    def bad(self, where: str, reason: str, detail: str = "") -> None:
        if self.errors == "raise":
            raise self.error(f"{where}: {detail or reason}")
        log.info("%s: skipped, %s", where, detail or reason)
        self.out.skipped[reason] += 1


class _Collector(Collector):
    error = ConversationError

    def __init__(self, errors: Errors):
        super().__init__(errors, Conversations([]))

    def add(self, messages: Any, where: str) -> None:
        problem = check_messages(messages)
        if problem is not None:
            self.bad(where, *problem)
        else:
            self.out.items.append(Conversation(list(messages), where))


def check_messages(messages: Any) -> tuple[str, str] | None:
    """(reason, detail) of what makes `messages` untrainable, or None when it is a well-formed conversation."""
    if not isinstance(messages, list) or not messages:
        return "not a conversation", "expected a non-empty list of messages"
    seen_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return "not a conversation", f"message {i} is not an object"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return "unknown role", f"message {i} has unknown role {role!r} (expected one of {ROLES})"
        if isinstance(content, list) and role == "assistant":
            kinds = [part.get("type") if isinstance(part, Mapping) else None for part in content]
            if not content or any(k not in ("text", *TOOLS) for k in kinds) or \
                    any(not isinstance(part.get("text"), str) for part in content):
                return "bad content", f"message {i}: assistant parts must be {{'type': text or a tool, 'text': str}}"
            text = "".join(part["text"] for part in content)
        elif isinstance(content, str):
            text = content
        else:
            return "bad content", f"message {i}: {role} content is {type(content).__name__}, not text"
        if role == "assistant":
            if not text.strip():
                return "empty assistant turn", f"message {i} is an empty assistant turn"
            if not seen_assistant and all(m.get("role") == "system" for m in messages[:i]):
                return "starts with the assistant", f"message {i}: the conversation starts with the assistant"
            seen_assistant = True
    if not seen_assistant:
        return "no assistant turn", "no assistant message: nothing to train on"
    return None


# ----------------------------------------------------------------------------- JSONL files


def _jsonl_records(path: str | Path, collector: _Collector) -> Iterable[tuple[str, dict]]:
    """(file:line, record) of each JSON object line; malformed lines go to the collector."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no conversation file at {path}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                collector.bad(where, "malformed JSON", f"not a JSON line ({e})")
                continue
            if not isinstance(record, dict):
                collector.bad(where, "malformed JSON", f"a JSON {type(record).__name__}, not an object")
                continue
            yield where, record


def read_openai(path: str | Path, *, errors: Errors = "skip") -> Conversations:
    """`{"messages": [{"role", "content"}, ...]}` per line (OpenAI's chat fine-tuning format)."""
    collector = _Collector(errors)
    for where, record in _jsonl_records(path, collector):
        collector.add(record.get("messages"), where)
    return collector.out


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


def read_sharegpt(path: str | Path, *, errors: Errors = "skip") -> Conversations:
    """`{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}` per line (ShareGPT)."""
    collector = _Collector(errors)
    for where, record in _jsonl_records(path, collector):
        collector.add(_from_sharegpt(record.get("conversations")), where)
    return collector.out


def _from_sharegpt(turns: Any) -> Any:
    if not isinstance(turns, list):
        return None
    return [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
            if isinstance(t, Mapping) else t for t in turns]


# ----------------------------------------------------------------------------- OpenAssistant trees


def read_oasst(path: str | Path, *, all_paths: bool = False, errors: Errors = "skip") -> Conversations:
    """Conversations from OpenAssistant message rows (oasst1/oasst2 `*.messages.jsonl` or the hub's rows).

    From each tree's root (a prompter message), the conversation follows the best
    ranked reply (`rank` 0) at every step, down to a leaf; with `all_paths` every
    path through ranked replies is a conversation. Deleted messages, ones that
    failed review and their subtrees are left out; a path ending in a prompter
    message is cut after its last assistant reply.
    """
    collector = _Collector(errors)
    rows = [(where, record) for where, record in _jsonl_records(path, collector)]
    return _oasst_conversations(rows, all_paths, collector)


def _oasst_conversations(rows: Sequence[tuple[str, Mapping]], all_paths: bool, collector: _Collector) -> Conversations:
    children: dict[str | None, list[Mapping]] = collections.defaultdict(list)
    where_of: dict[str, str] = {}
    for where, row in rows:
        if "message_id" not in row or "role" not in row:
            collector.bad(where, "not an oasst message", "no message_id or role: not an OpenAssistant message row")
            continue
        if row.get("deleted") or row.get("review_result") is False:
            continue
        children[row.get("parent_id")].append(row)
        where_of[row["message_id"]] = where

    def replies(node: Mapping) -> list[Mapping]:
        kids = children.get(node["message_id"], [])
        ranked = sorted((k for k in kids if k.get("rank") is not None), key=lambda k: k["rank"])
        if ranked:
            return ranked if all_paths else ranked[:1]
        return kids if all_paths else kids[:1]  # unranked (a single reply, or a prompter's follow-ups)

    def paths(node: Mapping) -> Iterable[list[Mapping]]:
        below = replies(node)
        if not below:
            yield [node]
        for child in below:
            for rest in paths(child):
                yield [node, *rest]

    roles = {"prompter": "user", "assistant": "assistant"}
    for root in children.get(None, []):
        for n, path in enumerate(paths(root)):
            while path and path[-1].get("role") != "assistant":
                path = path[:-1]
            if not path:
                continue
            messages = [{"role": roles.get(m["role"], m["role"]), "content": m.get("text")} for m in path]
            key = f"{root.get('message_tree_id', root['message_id'])}" + (f"#{n}" if all_paths else "")
            problem = check_messages(messages)
            if problem is not None:
                collector.bad(where_of[path[-1]["message_id"]], *problem)
            else:
                collector.out.items.append(Conversation(messages, key, group=str(root.get("message_tree_id",
                                                                                             root["message_id"]))))
    return collector.out


# ----------------------------------------------------------------------------- the hub


def read_hub(repo_id: str, split: str = "train", *, all_paths: bool = False, max_files: int | None = None,
             cache_dir: str | None = None, errors: Errors = "skip") -> Conversations:
    """A Hugging Face chat dataset by id: its parquet files of `split` (e.g. `train`, `train_sft`, `validation`).

    Downloads share FineWeb's cache, progress bars and offline behaviour
    (`hub.hub_dataset_files`). The shape is read from the columns: `messages`
    (smol-smoltalk, ultrachat_200k), `conversations` (ShareGPT) or OpenAssistant
    rows (`message_id`, `parent_id`: oasst1, oasst2).
    """
    import pyarrow.parquet as pq

    def keep(name: str) -> bool:
        return name.endswith(".parquet") and Path(name).name.startswith(f"{split}-")

    paths = hub_dataset_files(repo_id, "", keep, max_files=max_files, cache_dir=cache_dir, what=f"split {split}",
                              fallback="use local files (read_openai, read_sharegpt, read_oasst)")
    collector = _Collector(errors)
    oasst_rows = []
    for path in paths:
        table = pq.read_table(path)
        names = table.column_names
        for number, row in enumerate(table.to_pylist()):
            where = f"{path}:row {number}"
            if "messages" in names:
                collector.add(_plain(row["messages"]), where)
            elif "conversations" in names:
                collector.add(_from_sharegpt(row["conversations"]), where)
            elif "message_id" in names and "parent_id" in names:
                oasst_rows.append((where, row))
            else:
                raise DataError(f"{path}: no 'messages', 'conversations' or OpenAssistant columns; it has {names}")
    if oasst_rows:
        _oasst_conversations(oasst_rows, all_paths, collector)
    return collector.out


def _plain(messages: Any) -> Any:
    """Only role and content of each message (hub rows carry more fields)."""
    if not isinstance(messages, list):
        return messages
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, Mapping) else m for m in messages]


# ----------------------------------------------------------------------------- by name (configs)


READERS: dict[str, Callable[..., Conversations]] = {
    "openai": read_openai, "sharegpt": read_sharegpt, "oasst": read_oasst, "hub": read_hub}


def open_conversations(kind: str, path: str = "", **options: Any) -> Conversations:
    """A file source by kind: openai, sharegpt, oasst, hub (`options` go to its reader)."""
    if kind not in READERS:
        raise ValueError(f"unknown conversation reader {kind!r}; expected one of {sorted(READERS)}")
    return READERS[kind](path, **options)


def collect(pairs: Iterable[tuple[str, list[Message]]], *, errors: Errors = "skip") -> Conversations:
    """(key, messages) pairs as `Conversations`, each checked as a file's would be (`check_messages`)."""
    collector = _Collector(errors)
    for key, messages in pairs:
        collector.add(messages, key)
    return collector.out
