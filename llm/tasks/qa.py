"""Closed-book factual questions (TriviaQA, Natural Questions open): problems, answer grading, refusals.

    problems = qa.problems("../shared/data/evals/triviaqa_validation.jsonl", limit=300)
    qa.grade(problems[0], "It is Sunset Boulevard.")   # True
    qa.is_refusal("I'm not sure; I don't know.")       # True

Readers: a local JSONL file, either TriviaQA's rows (`{question, question_id,
answer, aliases, normalized_aliases}`, as `../shared/data/evals/` holds them, or
the hub's `answer: {value, aliases, ...}`) or NQ-open's (`{question, answer:
[aliases]}`); or a Hugging Face dataset id (`mandarjoshi/trivia_qa`,
`google-research-datasets/nq_open`), read from its parquet files through
`huggingface_hub` (the cache, progress and offline error of the FineWeb source).

Grading (`grade`). Answers are normalised the standard way (SQuAD's and
TriviaQA's evaluation scripts: lowercase, punctuation to spaces, the articles a/an/
the dropped, whitespace collapsed). A completion is right when its normalised
short answer (the first non-empty line of the reply) equals a normalised gold
alias, or contains one as a run of whole words. Departure from the scripts'
exact match: a chat model answers in a sentence ("The capital of France is
Paris."), which exact match would call wrong. Whole words keep "1" from matching
"1993" and "art" from matching "martial"; an alias that the question itself
contains (TriviaQA has some) only counts by exact match, since repeating the
question is not knowing the answer. A reply that lists several candidates can
still match one of them; these short replies rarely do.

Refusals (`is_refusal`): the reply says it does not know or is not sure
(phrases in `REFUSAL_PATTERNS`); graded separately from right/wrong, so a reply
is right, a refusal, or a hallucination (wrong and not refusing).
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm.tasks import Problem, Task, check_split, draw, find

# The instruction every question is asked with (system message), before and after fine-tuning alike.
SYSTEM = "Answer the question in one short sentence."
FEW_SHOT = (("What is the capital of France?", "Paris"),
            ("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
            ("How many legs does a spider have?", "Eight"))

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# TriviaQA's rule (its normalize_answer): punctuation becomes a space, so "Campbell-Bannerman" and "Hitler's"
# keep their words apart ("campbell bannerman", "hitler s"); SQuAD's deletes it instead.
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "‘’“”–—"})


def normalize(text: str) -> str:
    """TriviaQA/SQuAD answer normalisation: lowercase, punctuation to spaces, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def short_answer(completion: str) -> str:
    """The part of a reply that is graded: its first non-empty line."""
    for line in completion.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _contains_words(haystack: str, needle: str) -> bool:
    """Whether normalised `needle` occurs in normalised `haystack` as a run of whole words."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def grade(problem: Problem, completion: str) -> bool:
    """Right when the short answer equals a gold alias or contains one as whole words (see the module docstring)."""
    answer = normalize(short_answer(completion))
    question = normalize(_question_of(problem))
    for alias in problem.answer:
        gold = normalize(alias)
        if not gold:
            continue
        if answer == gold or (not _contains_words(question, gold) and _contains_words(answer, gold)):
            return True
    return False


REFUSAL_PATTERNS = (
    r"\bi (?:do not|don ?t|dont) know\b", r"\bi (?:am|m) not (?:sure|certain|familiar|aware)\b",
    r"\bnot sure\b", r"\bi (?:do not|don ?t) have (?:any |enough |reliable )?(?:information|knowledge|data)\b",
    r"\bi (?:cannot|can ?t|can not) (?:answer|say|tell|recall)\b", r"\bno (?:information|idea)\b",
    r"\bi (?:do not|don ?t) recall\b", r"\bi (?:am|m) unable to (?:answer|say|tell|recall)\b",
    r"\bunknown to me\b", r"\bi have no (?:idea|knowledge|information)\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS))


def is_refusal(text: str) -> bool:
    """Whether a reply declines to answer for lack of knowledge ("I'm not sure; I don't know.")."""
    flat = " ".join(text.lower().replace("’", "'").replace("'", " ").split())
    return bool(_REFUSAL.search(flat))


# ----------------------------------------------------------------------------- problems


def make_problem(question: str, aliases: Sequence[str], key: str = "") -> Problem:
    """A question as a chat prompt (system instruction + user question) and as few-shot text for a base model."""
    if not question.strip() or not aliases:
        raise ValueError(f"{key or question!r}: a question needs text and at least one gold answer")
    question = question.strip()
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT)
    return Problem(messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": question}),
                   answer=tuple(dict.fromkeys(a for a in aliases if isinstance(a, str) and a.strip())),
                   text=f"{shots}Question: {question}\nAnswer:", key=key)


def _question_of(problem: Problem) -> str:
    return next((m["content"] for m in problem.messages if m.get("role") == "user"), "")


def _from_record(record: Mapping[str, Any], where: str) -> Problem:
    """A TriviaQA row (flat, or the hub's nested `answer`) or an NQ-open row as a Problem."""
    question, answer = record.get("question"), record.get("answer")
    if isinstance(answer, Mapping):  # the hub's TriviaQA: {"value", "aliases", "normalized_aliases", ...}
        aliases = [answer.get("value"), *(answer.get("aliases") or [])]
    elif isinstance(answer, str):  # ../shared's TriviaQA: answer plus aliases beside it
        aliases = [answer, *(record.get("aliases") or [])]
    elif isinstance(answer, list):  # NQ-open: every acceptable answer
        aliases = list(answer)
    else:
        raise ValueError(f"{where}: no answer field (expected TriviaQA's or NQ-open's row format)")
    if not isinstance(question, str):
        raise ValueError(f"{where}: no question text")
    key = str(record.get("question_id") or where)
    try:
        return make_problem(question, [a for a in aliases if isinstance(a, str)], key)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def read_jsonl(path: str | Path, *, skip: int = 0, limit: int | None = None) -> list[Problem]:
    """Problems from a TriviaQA or NQ-open JSONL file: lines skip..skip+limit; a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no question file at {path}")
    found = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if number <= skip:
                continue
            if limit is not None and len(found) >= limit:
                break
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a JSON {type(record).__name__}, not an object")
            found.append(_from_record(record, where))
    return found


def read_hub(repo_id: str, split: str = "validation", *, config: str = "", skip: int = 0, limit: int | None = None,
             cache_dir: str | None = None) -> list[Problem]:
    """Problems from a hub dataset's parquet files of `split` (under the `config` folder, e.g. `rc.nocontext`)."""
    import pyarrow.parquet as pq

    from llm.data.hub import hub_dataset_files

    def keep(name: str) -> bool:
        return name.endswith(".parquet") and Path(name).name.startswith(f"{split}-")

    paths = hub_dataset_files(repo_id, config, keep, cache_dir=cache_dir, what=f"split {split}",
                              fallback="pass a local JSONL file (../shared/data/evals/triviaqa_validation.jsonl)")
    rows = (({**row}, f"{path}:row {i}") for path in paths for i, row in enumerate(pq.read_table(path).to_pylist()))
    found = []
    for n, (row, where) in enumerate(rows):
        if n < skip:
            continue
        if limit is not None and len(found) >= limit:
            break
        found.append(_from_record(row, where))
    return found


def problems(source: str, *, skip: int = 0, limit: int | None = None, split: str = "validation",
             config: str = "") -> list[Problem]:
    """Problems from a local JSONL file, or from a hub dataset id (`owner/name`) when no such file exists."""
    if not Path(source).exists() and source.count("/") == 1 and not source.startswith("."):
        return read_hub(source, split, config=config, skip=skip, limit=limit)
    return read_jsonl(source, skip=skip, limit=limit)


def _load(name: str, local: str, hub_id: str, config: str, path: str, data_dir: str, limit: int | None) -> Task:
    source = path or find(data_dir, local, hub_id)
    read = functools.cache(lambda: problems(source, limit=limit, config=config))

    def sample(split: str, count: int | None = 0, seed: int = 0) -> list[Problem]:
        check_split(name, split, ("validation",))
        return draw(read(), count, seed)

    # The reply's first line is graded, so a base model's answer ends with its line.
    return Task(name, "generative", sample, grade, ("\n",), eval_split="validation")


def load_triviaqa(path: str = "", data_dir: str = "", limit: int | None = None) -> Task:
    """TriviaQA (rc.nocontext) validation questions from `path`, else `data_dir`'s file, else the hub; first `limit`."""
    return _load("triviaqa", "evals/triviaqa_validation.jsonl", "mandarjoshi/trivia_qa", "rc.nocontext", path,
                 data_dir, limit)


def load_nq_open(path: str = "", data_dir: str = "", limit: int | None = None) -> Task:
    """Natural Questions (open) validation questions from `path`, else `data_dir`'s file, else the hub."""
    return _load("nq_open", "evals/nq_open_validation.jsonl", "google-research-datasets/nq_open", "nq_open", path,
                 data_dir, limit)
