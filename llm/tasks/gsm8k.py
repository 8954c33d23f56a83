"""GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): problems, grading, SFT data.

    task = load("gsm8k", data_dir="../shared/data", shots=5)    # llm.tasks.load
    task.problems("test", 0, 0); task.grade(problem, "... so she makes $18 a day.\\n#### 18")  -> True
    task.conversations()          # the train split with a calculator call at every <<expression=result>>

A `Problem` holds the question as a user message (chat models) and as plain text
after few-shot solved examples, `"Question: ...\\nAnswer: ...\\n\\n"`, the
calculator annotations `<<...>>` removed (base models, completed after
`"Answer:"`; a sampler stops at a blank line or the next `"Question:"`). The gold
answer is the number after `#### ` in the dataset's answer, normalised.

`extract_answer` reads the model's final answer only: the last `#### N`, else the
last `\\boxed{N}`, else the last "answer is N" / "Answer: N" sentence. A number is
read with its sign, commas, a leading `$`, decimals and any trailing unit or
punctuation ("$1,234.50 dollars." -> 1234.5). A completion that never states a
final answer gets None (wrong), even if the right number appears in its
reasoning: taking the last number of the text (a common fallback) would credit
reasoning that never concluded.
"""

from __future__ import annotations

import functools
import decimal
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from llm.errors import DataError
from llm.tasks import Message, Problem, Task, check_split, draw, find
from llm.tasks.choice_sets import read_records
from llm.tools import Calculator

STOP_STRINGS = ("\n\nQuestion:", "Question:", "\n\n")  # where a base model's answer ends
HUB_ID = "openai/gsm8k"
SPLITS = ("train", "test")

_NUMBER = r"(-?\s*\$?\s*-?\d[\d,]*(?:\.\d+)?|-?\s*\$?\s*-?\.\d+)"
_FINAL = [
    re.compile(r"####\s*" + _NUMBER),
    re.compile(r"\\boxed\{\s*" + _NUMBER + r"\s*\}"),
    re.compile(r"answer\s*(?:is|=|:)\s*[:*\s]*" + _NUMBER, re.IGNORECASE),
]
_ANNOTATION = re.compile(r"<<[^<>]*>>")


def normalize_number(text: str) -> str | None:
    """A number as written ("-$1,234.50") as its canonical decimal string ("-1234.5"); None if not a number."""
    cleaned = re.sub(r"[\s$,]", "", text).rstrip(".")
    negative = cleaned.count("-") % 2 == 1
    cleaned = cleaned.replace("-", "")
    try:
        value = decimal.Decimal(cleaned)
    except decimal.InvalidOperation:
        return None
    value = -value if negative else value
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(completion: str) -> str | None:
    """The completion's final numeric answer, normalised; None when it states none (see the module docstring)."""
    for pattern in _FINAL:
        found = pattern.findall(completion)
        if found:
            return normalize_number(found[-1])
    return None


def gold_answer(answer_field: str) -> str:
    """The normalised number after `#### ` in a GSM8K answer."""
    match = _FINAL[0].search(answer_field)
    if not match:
        raise ValueError(f"GSM8K answer has no '#### <number>': {answer_field[-80:]!r}")
    return normalize_number(match.group(1))


def grade(problem: Problem, completion: str) -> bool:
    """Whether the completion's final answer equals the gold one (as numbers)."""
    return extract_answer(completion) == problem.answer


def solution_text(answer_field: str) -> str:
    """A GSM8K solution as plain text: calculator annotations removed, `#### N` kept."""
    return _ANNOTATION.sub("", answer_field)


def fewshot_prefix(examples: Sequence[dict]) -> str:
    return "".join(f"Question: {e['question']}\nAnswer: {solution_text(e['answer'])}\n\n" for e in examples)


def problems(source: str, *, fewshot: Sequence[dict] = (), limit: int | None = None, split: str = "test"
             ) -> list[Problem]:
    """GSM8K problems of a JSONL file `{question, answer}` or a hub id (openai/gsm8k, subset main)."""
    records = read_records(source, split=split, subset="" if source.endswith(".jsonl") else "main")[:limit]
    prefix = fewshot_prefix(fewshot)
    out = []
    for i, r in enumerate(records):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise ValueError(f"{source} record {i}: expected string 'question' and 'answer' fields")
        out.append(Problem(
            messages=({"role": "user", "content": r["question"]},),
            answer=gold_answer(r["answer"]),
            text=f"{prefix}Question: {r['question']}\nAnswer:",
            key=str(i),
        ))
    return out


def load(path: str = "", eval_path: str = "", data_dir: str = "", shots: int = 0, chat: bool = False,
         limit: int | None = None) -> Task:
    """GSM8K: train problems from `path`, test ones from `eval_path` (else `path`), each else `data_dir`'s
    gsm8k/{train,test}.jsonl or the hub's openai/gsm8k; the problems of each split are read on first
    use, once (SFT's conversations, which a mixture asks for once, read their file when asked).

    A base model's text starts with the first `shots` solved train records (none
    with `chat`); `limit` keeps the first records of each split. A count draws
    that many problems with the seed (`llm.tasks.draw`); 0 gives the split in order.
    """
    if not (path or eval_path or data_dir):
        raise ValueError("task 'gsm8k' needs path (train JSONL), eval_path (test JSONL) or data_dir")
    sources = {"train": path or (find(data_dir, "gsm8k/train.jsonl", HUB_ID) if data_dir else ""),
               "test": eval_path or path or find(data_dir, "gsm8k/test.jsonl", HUB_ID)}

    def source(split: str) -> str:
        check_split("gsm8k", split, SPLITS)
        if not sources[split]:
            raise ValueError(f"task 'gsm8k' was given no {split} file (path, or data_dir)")
        return sources[split]

    fewshot = functools.cache(lambda: read_records(source("train"), split="train", subset="main")[:shots]
                              if shots and not chat else [])
    read = {split: functools.cache(lambda split=split: problems(source(split), fewshot=fewshot(), limit=limit,
                                                                split=split))
            for split in SPLITS}

    def sample(split: str, count: int | None = 0, seed: int = 0) -> list[Problem]:
        check_split("gsm8k", split, SPLITS)
        return draw(read[split](), count, seed)

    def sft(split: str = "train") -> list[tuple[str, list[Message]]]:
        return conversations(source(split), split=split)

    return Task("gsm8k", "generative", sample, grade, STOP_STRINGS, sft)


# ----------------------------------------------------------------------------- SFT: solutions with the calculator

CALL = re.compile(r"<<([^<>=]*)=([^<>]*)>>")  # a solution's calculator annotation: <<expression=result>>


def gsm8k_messages(question: str, answer: str, calculator: Callable[[str], str] = Calculator()) -> list[Message]:
    """A GSM8K problem as a conversation whose assistant calls the calculator at each `<<expression=result>>`.

    The call's output is what the engine's `Calculator` returns (so training shows
    exactly what sampling will force back); the text after the annotation stays,
    as nanochat renders it. An annotation the calculator cannot evaluate stays text.
    """
    messages: list[Message] = [{"role": "user", "content": question}]
    text, cursor = "", 0
    for match in CALL.finditer(answer):
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


def _numbered_records(source: str, split: str) -> Iterable[tuple[str, dict]]:
    """(file:line, record) of a local JSONL file (optionally gzipped), else (id:index, record) of a hub dataset."""
    if not os.path.isfile(source) or source.endswith(".parquet"):
        yield from ((f"{source}:{i}", r) for i, r in enumerate(read_records(source, split=split, subset="main")))
        return
    path = Path(source)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{number}: not a JSON line ({e})") from e


def conversations(source: str, *, split: str = "train") -> list[tuple[str, list[Message]]]:
    """GSM8K `{question, answer}` records as calculator-using conversations, keyed by file and line."""
    out = []
    for where, record in _numbered_records(source, split):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
            raise DataError(f"{where}: expected string 'question' and 'answer' fields")
        out.append((where, gsm8k_messages(record["question"], record["answer"])))
    return out
