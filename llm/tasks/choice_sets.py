"""HellaSwag, ARC and MMLU as `MultipleChoice` items, in lm-evaluation-harness's prompts.

    hellaswag("../shared/data/evals/hellaswag_val.jsonl")     # or a hub id, e.g. "Rowan/hellaswag"
    arc("../shared/data/evals/arc_easy_validation.jsonl")    # or "allenai/ai2_arc" with subset="ARC-Easy"
    mmlu("mmlu_test.jsonl", shots=5, dev="mmlu_dev.jsonl")   # or "cais/mmlu"

Each reader takes a local JSONL (optionally gzipped) or parquet file in the public
format, or a Hugging Face dataset id read through `huggingface_hub` (its parquet
or JSONL files for the split; offline with nothing cached it is a ConnectionError
saying so). Prompts are the harness's (`lm_eval/tasks/{hellaswag,arc,mmlu}`):

- HellaSwag: `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`
  and each preprocessed ending after a space (WikiHow's `[title]` and bracketed
  artifacts removed). Base models only: a chat variant has no natural form.
- ARC: `"Question: {question}\\nAnswer:"` and each answer text after a space.
- MMLU: `"The following are multiple choice questions (with answers) about
  {subject}.\\n\\n"`, then `shots` solved dev examples of the subject (the first
  ones, the harness's `first_n`), then the question with its lettered choices and
  `"Answer:"`; the choices are the letters A-D after a space.

`chat=True` (ARC, MMLU) gives the question and lettered choices as a user message
asking for the letter; the choices are then the letter the assistant's reply
starts with. As tasks (`llm.tasks.load`): hellaswag, arc_easy, arc_challenge,
mmlu, each of kind "choice" (scored by log-likelihood, `llm.evals.multiple_choice`).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from llm.data.hub import hub_dataset_files
from llm.errors import DataError
from llm.tasks import MultipleChoice, Task, check_split, draw, find

LETTERS = "ABCDEFGHIJ"
CHAT_INSTRUCTION = "Answer with the letter of the correct choice only."


# ----------------------------------------------------------------------------- records


def read_records(source: str, *, split: str = "validation", subset: str = "") -> list[dict]:
    """Records of a local .jsonl / .jsonl.gz / .parquet file, or of a hub dataset id's `split` (under `subset/`)."""
    if os.path.exists(source):
        return _file_records(source)
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source}: no such file, and not a Hugging Face dataset id (owner/name)")

    def keep(name: str) -> bool:
        base = os.path.basename(name)
        return base.startswith(split) and base.endswith((".parquet", ".jsonl", ".jsonl.gz", ".json"))

    paths = hub_dataset_files(source, subset, keep, what=f"{subset or 'root'}, split {split}",
                              fallback="pass a local file in the dataset's public format")
    return [record for path in paths for record in _file_records(path)]


def _file_records(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e})") from e
    return records


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (has {sorted(record)})")
    return record[name]


# ----------------------------------------------------------------------------- HellaSwag


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup of HellaSwag text: WikiHow `[title]` becomes a sentence end, brackets go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_items(records: Iterable[dict]) -> list[MultipleChoice]:
    items = []
    for i, r in enumerate(records):
        where = f"HellaSwag record {i}"
        if "ctx_a" in r:
            ctx = r["ctx_a"] + " " + r.get("ctx_b", "").capitalize()
        else:
            ctx = _field(r, "ctx", where)
        query = hellaswag_preprocess(_field(r, "activity_label", where) + ": " + ctx)
        endings = tuple(hellaswag_preprocess(e) for e in _field(r, "endings", where))
        label = int(_field(r, "label", where))
        items.append(MultipleChoice(query + " ", endings, label, key=str(r.get("ind", i))))
    return items


def hellaswag(source: str, *, limit: int | None = None) -> list[MultipleChoice]:
    """HellaSwag validation items (`source`: JSONL in the original format, or a hub id)."""
    return hellaswag_items(read_records(source, split="validation")[:limit])


# ----------------------------------------------------------------------------- ARC


def _lettered(question: str, choices: Sequence[str]) -> str:
    return question + "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(choices))


def arc_items(records: Iterable[dict], *, chat: bool = False) -> list[MultipleChoice]:
    items = []
    for i, r in enumerate(records):
        where = f"ARC record {i} ({r.get('id', '?')})"
        question, choices = _field(r, "question", where), _field(r, "choices", where)
        texts, labels = tuple(choices["text"]), list(choices["label"])
        answer = _field(r, "answerKey", where)
        if answer not in labels:
            raise DataError(f"{where}: answerKey {answer!r} is not among the labels {labels}")
        label = labels.index(answer)
        if chat:
            messages = ({"role": "user", "content": _lettered(question, texts) + "\n\n" + CHAT_INSTRUCTION},)
            items.append(MultipleChoice("", tuple(LETTERS[:len(texts)]), label, key=r.get("id", str(i)),
                                        messages=messages))
        else:
            items.append(MultipleChoice(f"Question: {question}\nAnswer: ", texts, label, key=r.get("id", str(i))))
    return items


def arc(source: str, *, subset: str = "ARC-Easy", split: str = "validation", chat: bool = False,
        limit: int | None = None) -> list[MultipleChoice]:
    """ARC-Easy or ARC-Challenge items (`source`: JSONL `{id, question, choices, answerKey}`, or allenai/ai2_arc)."""
    return arc_items(read_records(source, split=split, subset=subset)[:limit], chat=chat)


# ----------------------------------------------------------------------------- MMLU


def _mmlu_question(r: dict) -> str:
    choices = r["choices"]
    if len(choices) != 4:
        raise DataError(f"MMLU record {r.get('question', '')[:40]!r}: {len(choices)} choices, expected 4")
    return _lettered(r["question"].strip(), choices) + "\nAnswer:"


def mmlu_items(records: Sequence[dict], *, dev: Sequence[dict] = (), shots: int = 0, chat: bool = False
               ) -> list[MultipleChoice]:
    """`shots` solved dev examples of the same subject before each question (their first ones)."""
    by_subject: dict[str, list[dict]] = {}
    for r in dev:
        by_subject.setdefault(r["subject"], []).append(r)
    items = []
    for i, r in enumerate(records):
        where = f"MMLU record {i}"
        subject = _field(r, "subject", where)
        examples = by_subject.get(subject, [])[:shots]
        if len(examples) < shots:
            raise DataError(f"{where}: {shots}-shot needs {shots} dev examples of {subject!r}, found {len(examples)}")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        solved = "".join(f"{_mmlu_question(e)} {LETTERS[int(e['answer'])]}\n\n" for e in examples)
        label = int(_field(r, "answer", where))
        if chat:
            content = header + solved + _mmlu_question(r).removesuffix("\nAnswer:") + "\n\n" + CHAT_INSTRUCTION
            items.append(MultipleChoice("", tuple(LETTERS[:4]), label, key=f"{subject}/{i}",
                                        messages=({"role": "user", "content": content},)))
        else:
            items.append(MultipleChoice(header + solved + _mmlu_question(r) + " ", tuple(LETTERS[:4]), label,
                                        key=f"{subject}/{i}"))
    return items


def mmlu(source: str, *, dev: str = "", shots: int = 0, chat: bool = False, limit: int | None = None
         ) -> list[MultipleChoice]:
    """MMLU test items (`source`: JSONL `{question, subject, choices, answer}`, or cais/mmlu); `dev` for shots.

    `limit` takes evenly spaced items, so a few cover many subjects (the file is sorted by subject).
    """
    records = read_records(source, split="test", subset="all")
    if limit:
        records = records[:: max(1, len(records) // limit)]
    dev_records = read_records(dev or source, split="dev", subset="all") if shots else []
    return mmlu_items(records[:limit], dev=dev_records, shots=shots, chat=chat)


# ----------------------------------------------------------------------------- as tasks


def _task(name: str, split: str, read: Callable[[], list[MultipleChoice]]) -> Task:
    read = functools.cache(read)

    def sample(split_: str, count: int | None = 0, seed: int = 0) -> list[MultipleChoice]:
        check_split(name, split_, (split,))
        return draw(read(), count, seed)

    return Task(name, "choice", sample, eval_split=split)


def load_hellaswag(path: str = "", data_dir: str = "", limit: int | None = None) -> Task:
    """HellaSwag validation items from `path`, else `data_dir`'s file, else the hub; the first `limit`."""
    source = path or find(data_dir, "evals/hellaswag_val.jsonl", "Rowan/hellaswag")
    return _task("hellaswag", "validation", lambda: hellaswag(source, limit=limit))


def _load_arc(name: str, subset: str, path: str, data_dir: str, chat: bool, limit: int | None) -> Task:
    source = path or find(data_dir, f"evals/{name}_validation.jsonl", "allenai/ai2_arc")
    return _task(name, "validation", lambda: arc(source, subset=subset, chat=chat, limit=limit))


def load_arc_easy(path: str = "", data_dir: str = "", chat: bool = False, limit: int | None = None) -> Task:
    """ARC-Easy validation items (`chat`: the lettered variant)."""
    return _load_arc("arc_easy", "ARC-Easy", path, data_dir, chat, limit)


def load_arc_challenge(path: str = "", data_dir: str = "", chat: bool = False, limit: int | None = None) -> Task:
    """ARC-Challenge validation items (`chat`: the lettered variant)."""
    return _load_arc("arc_challenge", "ARC-Challenge", path, data_dir, chat, limit)


def load_mmlu(path: str = "", dev_path: str = "", data_dir: str = "", shots: int = 0, chat: bool = False,
              limit: int | None = None) -> Task:
    """MMLU test items with `shots` solved dev examples of the subject (`dev_path`, else `data_dir`'s, else the hub)."""
    source = path or find(data_dir, "evals/mmlu_test.jsonl", "cais/mmlu")
    dev = dev_path or find(data_dir, "evals/mmlu_dev.jsonl", "cais/mmlu")
    return _task("mmlu", "test", lambda: mmlu(source, dev=dev, shots=shots, chat=chat, limit=limit))
