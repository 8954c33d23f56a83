"""Where conversations come from, each normalised to messages the tokenizer renders.

A conversation is a list of `{"role": "system" | "user" | "assistant" | "tool", "content": ...}`
(the format of `Tokenizer.render_conversation`; assistant content may be a list of
parts ending in a tool call, answered by the next `tool` message). Sources:

    read_openai(path)          {"messages": [...]} JSONL (OpenAI's fine-tuning format)
    read_sharegpt(path)        {"conversations": [{"from": "human" | "gpt" | ..., "value": ...}]} JSONL
    read_oasst(path)           OpenAssistant message trees (oasst1/oasst2 rows): the best-ranked path
                               per tree, or every ranked path (`all_paths=True`)
    read_hub(repo_id, split)   a Hugging Face dataset by id (parquet, any of the three shapes above)
    gsm8k(path)                GSM8K with a calculator call for every `<<expression=result>>`
    identity(IdentitySpec)     who the assistant is, in many paraphrases; some held out for evaluation
    spelling(words)            spell a word, count a letter (0, 1, 2 or 3 times, equally often), answer
                               (or a share answered at once, without spelling: `direct_fraction`)

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
import io
import json
import logging
import random
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from llm.data.sources import DataError, hub_dataset_files
from llm.tokenizer import ROLES, TOOLS
from llm.tools import Calculator

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
    (`sources.hub_dataset_files`). The shape is read from the columns: `messages`
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


# ----------------------------------------------------------------------------- GSM8K with the calculator

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def gsm8k_messages(question: str, answer: str, calculator: Callable[[str], str] = Calculator()) -> list[Message]:
    """A GSM8K problem as a conversation whose assistant calls the calculator at each `<<expression=result>>`.

    The call's output is what the engine's `Calculator` returns (so training shows
    exactly what sampling will force back); the text after the annotation stays,
    as nanochat renders it. An annotation the calculator cannot evaluate stays text.
    """
    messages: list[Message] = [{"role": "user", "content": question}]
    text, cursor = "", 0
    for match in _ANNOTATION.finditer(answer):
        text += answer[cursor:match.start()]
        cursor = match.end()
        expression = match.group(1)
        output = calculator(expression)
        if output.startswith("Error"):
            text += f"{expression}={match.group(2)}"
            continue
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text},
                                                          {"type": "python", "text": expression}]})
        messages.append({"role": "tool", "name": "python", "content": output})
        text = ""
    messages.append({"role": "assistant", "content": [{"type": "text", "text": text + answer[cursor:]}]})
    # Drop empty leading text parts; the renderer needs none of them.
    for m in messages:
        if m["role"] == "assistant":
            m["content"] = [p for p in m["content"] if p["type"] != "text" or p["text"]] or [{"type": "text", "text": ""}]
    return messages


def gsm8k(path: str | Path, *, errors: Errors = "skip") -> Conversations:
    """GSM8K `{"question", "answer"}` lines as calculator-using conversations."""
    collector = _Collector(errors)
    for where, record in _jsonl_records(path, collector):
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            collector.bad(where, "not a GSM8K record", "expected string 'question' and 'answer' fields")
            continue
        collector.add(gsm8k_messages(question, answer), where)
    return collector.out


# ----------------------------------------------------------------------------- identity


@dataclasses.dataclass(frozen=True)
class IdentitySpec:
    """Who the assistant is; every field is plain text put into templates."""

    name: str = "Tiny"
    creator: str = "the llm project"
    can: str = "answer questions, chat, and do arithmetic with a calculator"
    cannot: str = "browse the internet, remember past conversations, or see images"


_ASKS = ("What is your name?", "Who are you?", "What should I call you?", "Do you have a name?",
         "Tell me your name.", "Please introduce yourself.", "What's your name?", "Who am I talking to?",
         "Introduce yourself, please.", "May I know your name?", "Hi! Who are you?", "What are you called?",
         "Could you tell me who you are?", "Hello, what is your name?", "Are you a person or a program?",
         "Who made you?", "Who built you?", "Who created you?", "What are you?", "Which assistant is this?")
_STYLES = ("{q}", "hey, {lq}", "{q} Just curious.", "Quick question: {lq}", "{q} Thanks!", "hello there. {q}")
_ANSWERS = ("I'm {name}, an AI assistant built by {creator}.",
            "My name is {name}. I was built by {creator}.",
            "I am {name}, a small language model assistant made by {creator}. I can {can}.",
            "You can call me {name}. I'm an AI assistant created by {creator}; I cannot {cannot}.")
_CAPABILITY = (("What can you do?", "I'm {name}. I can {can}."),
               ("What can't you do?", "I'm {name}, and I cannot {cannot}."),
               ("Can you browse the web?", "No. I'm {name}, and I cannot {cannot}."),
               ("How can you help me?", "I'm {name}, an assistant by {creator}. I can {can}."))


def identity_questions() -> list[str]:
    """Every paraphrase of "who are you", in a fixed order (120 = 20 asks x 6 styles)."""
    return [style.format(q=q, lq=q[0].lower() + q[1:]) for style in _STYLES for q in _ASKS]


def identity(spec: IdentitySpec = IdentitySpec(), *, held_out: int = 20, seed: int = 0
             ) -> tuple[Conversations, list[str]]:
    """(training conversations, held-out questions) about who the assistant is.

    The paraphrases are shuffled once with `seed`; the last `held_out` are never
    trained on and serve to measure whether the model names itself.
    """
    fields = dataclasses.asdict(spec)
    questions = identity_questions()
    random.Random(seed).shuffle(questions)
    train, test = questions[:-held_out] if held_out else questions, questions[-held_out:] if held_out else []
    items = []
    for i, question in enumerate(train):
        answer = _ANSWERS[i % len(_ANSWERS)].format(**fields)
        items.append(Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                  f"identity:{i}"))
    for j, (question, answer) in enumerate(_CAPABILITY):
        items.append(Conversation([{"role": "user", "content": question},
                                   {"role": "assistant", "content": answer.format(**fields)}], f"identity:cap{j}"))
    return Conversations(items), test


# ----------------------------------------------------------------------------- spelling and counting


def read_words(path: str | Path, *, min_len: int = 3, max_len: int = 12) -> list[str]:
    """Lowercase words of a word list (`.txt`, or the `.zip` holding one, as `words_alpha.zip`)."""
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            [name] = [n for n in z.namelist() if n.endswith(".txt")]
            text = io.TextIOWrapper(z.open(name), encoding="utf-8").read()
    else:
        text = path.read_text(encoding="utf-8")
    return [w for w in (line.strip().lower() for line in text.splitlines())
            if min_len <= len(w) <= max_len and w.isalpha() and w.isascii()]


def spelling_messages(word: str, letter: str, *, spell: bool = True) -> list[Message]:
    """How many times does `letter` appear in `word`: spell it, marking each `letter` with the count so far, answer.

    "c(1),o,l,p,i,n,d,a,c(2),h. So 'c' appears 2 times. #### 2": the running
    count sits on the letter it counts, so each step looks back one mark (a
    tiny model cannot count positions or occurrences across the word); the
    answer is the last mark, or 0 without one. `spell=False` answers at once
    ("'c' appears 2 times. #### 2"): the same question without the thinking.
    """
    count, marked = 0, []
    for c in word:
        if c == letter:
            count += 1
            marked.append(f"{c}({count})")
        else:
            marked.append(c)
    answer = f"'{letter}' appears {count} time{'s' if count != 1 else ''}. #### {count}"
    reply = f"{','.join(marked)}. So {answer}" if spell else answer
    return [{"role": "user", "content": f"How many times does the letter '{letter}' appear in the word \"{word}\"?"},
            {"role": "assistant", "content": reply}]


SPELLING_COUNTS = (0, 1, 2, 3)  # the answers letter-counting problems draw, each as often
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def split_words(words: Sequence[str], split: str, test_fraction: float = 0.1) -> list[str]:
    """The words of one split ("train" or "test"), chosen by a CRC-32 of the word: the same on every machine and run."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    in_test = [zlib.crc32(w.encode()) % 1000 < test_fraction * 1000 for w in words]
    return [w for w, t in zip(words, in_test) if t == (split == "test")]


def draw_letter(rng: random.Random, words: Sequence[str], count: int, tries: int = 100_000) -> tuple[str, str]:
    """A word and a letter it holds exactly `count` times: words by rejection until one has such a letter, then
    one of those letters uniformly (for 0: any letter the word lacks).

    Problem sets ask for the counts in turn (`SPELLING_COUNTS[i % 4]`), so the
    answers are balanced exactly and a constant answer scores 25%; the word's
    length still correlates with the count (a 3 needs a longer word), which a
    constant answer cannot use.
    """
    if not words:
        raise ValueError("draw_letter needs words")
    for _ in range(tries):
        word = rng.choice(words)
        letters = [c for c in _ALPHABET if word.count(c) == count]
        if letters:
            return word, rng.choice(letters)
    raise ValueError(f"no word among {len(words)} has a letter {count} times (after {tries} draws)")


def spelling(words: Sequence[str], n: int, *, seed: int = 0, split: str = "train",
             counts: Sequence[int] = SPELLING_COUNTS, direct_fraction: float = 0.0) -> Conversations:
    """`n` letter-counting conversations over the `split` words (`split_words`; "" for all), asking for
    the `counts` in turn (`draw_letter`): the SFT mixture trains on the words GRPO trains on, never the held-out ones.

    A `direct_fraction` of them answer without spelling the word out
    (`spell=False`), at random: the fine-tuned model then chooses between
    thinking and guessing on its own, and GRPO can learn which pays.
    """
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"direct_fraction must be in [0, 1], got {direct_fraction}")
    pool = split_words(words, split) if split else list(words)
    rng, coin = random.Random(seed), random.Random(f"direct:{seed}")
    items = []
    for i in range(n):
        word, letter = draw_letter(rng, pool, counts[i % len(counts)])
        spell = direct_fraction == 0.0 or coin.random() >= direct_fraction
        items.append(Conversation(spelling_messages(word, letter, spell=spell), f"spelling:{seed}:{i}"))
    return Conversations(items)


# ----------------------------------------------------------------------------- by name (configs)


def open_conversations(kind: str, path: str = "", **options: Any) -> Conversations:
    """A source by kind: openai, sharegpt, oasst, hub, gsm8k, identity, spelling (`options` go to its reader)."""
    readers: dict[str, Callable[..., Conversations]] = {
        "openai": lambda: read_openai(path, **options),
        "sharegpt": lambda: read_sharegpt(path, **options),
        "oasst": lambda: read_oasst(path, **options),
        "hub": lambda: read_hub(path, **options),
        "gsm8k": lambda: gsm8k(path, **options),
        "identity": lambda: identity(IdentitySpec(**options))[0],
        "spelling": lambda: spelling(read_words(path), **options),
    }
    if kind not in readers:
        raise ValueError(f"unknown conversation source kind {kind!r}; expected one of {sorted(readers)}")
    return readers[kind]()
