"""The evaluation tasks by name, for `launch.eval`: a new task is one `TASKS` entry.

A bits-per-byte entry reads `options.bpb_source` (`llm.evals.bpb`). A multiple-choice entry gives `items(options) -> list[MultipleChoice]`, scored by
`llm.evals.multiple_choice`; a generative entry gives `problems(options) ->
list[Problem]` and `grade`, sampled and graded by `llm.evals.generative`. Data
come from `options.data_dir` (the public files under the names of
`../shared/data/README.md`) when there, else from the Hugging Face hub id.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from llm.evals import bpb, generative
from llm.evals import multiple_choice as mc
from llm.tasks import choice_sets, gsm8k, qa, spelling


@dataclasses.dataclass(frozen=True)
class Options:
    data_dir: str = "../shared/data"
    limit: int | None = None
    chat: bool = False  # the chat variant where a task has one (ARC, MMLU, GSM8K)
    # multiple choice
    batch_rows: int = 16
    row_len: int = 256
    max_len: int | None = None
    bos: bool = False  # the tokenizer's document start before every context (the harness puts none)
    # generative
    n: int = 1
    ks: tuple[int, ...] = (1,)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    shots: int = 5  # GSM8K few-shot examples for a base model (from the train split)
    tools: bool = True
    batch_size: int = 8
    seed: int = 0
    # bits per byte
    bpb_source: str = "sample"  # any text source open_source reads: 'sample', files, 'fineweb-edu', ...
    bpb_val_fraction: float = 0.01  # its documents in the validation split (by hash, as in pretraining); 1: all
    bpb_batches: int = 16


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # "choice", "generative" or "bpb"
    load: Callable[[Options], list] | None = None
    grade: Callable[[Any, str], bool] | None = None
    stop_strings: tuple[str, ...] = ()  # base-model generation stops (generative tasks)


def source(options: Options, local: str, hub_id: str) -> str:
    """`data_dir/local` when it exists, else the hub id."""
    path = os.path.join(options.data_dir, local)
    return path if os.path.exists(path) else hub_id


def _gsm8k(o: Options) -> list:
    shots = []
    if not o.chat and o.shots:
        shots = choice_sets.read_records(source(o, "gsm8k/train.jsonl", "openai/gsm8k"), split="train",
                                         subset="main")[:o.shots]
    return gsm8k.problems(source(o, "gsm8k/test.jsonl", "openai/gsm8k"), fewshot=shots, limit=o.limit)


TASKS: dict[str, Task] = {
    "hellaswag": Task("choice", lambda o: choice_sets.hellaswag(
        source(o, "evals/hellaswag_val.jsonl", "Rowan/hellaswag"), limit=o.limit)),
    "arc_easy": Task("choice", lambda o: choice_sets.arc(
        source(o, "evals/arc_easy_validation.jsonl", "allenai/ai2_arc"), subset="ARC-Easy", chat=o.chat,
        limit=o.limit)),
    "arc_challenge": Task("choice", lambda o: choice_sets.arc(
        source(o, "evals/arc_challenge_validation.jsonl", "allenai/ai2_arc"), subset="ARC-Challenge", chat=o.chat,
        limit=o.limit)),
    "mmlu": Task("choice", lambda o: choice_sets.mmlu(
        source(o, "evals/mmlu_test.jsonl", "cais/mmlu"), chat=o.chat, limit=o.limit)),
    "mmlu_5shot": Task("choice", lambda o: choice_sets.mmlu(
        source(o, "evals/mmlu_test.jsonl", "cais/mmlu"), dev=source(o, "evals/mmlu_dev.jsonl", "cais/mmlu"),
        shots=5, chat=o.chat, limit=o.limit)),
    "gsm8k": Task("generative", _gsm8k, grade=gsm8k.grade, stop_strings=gsm8k.STOP_STRINGS),
    # Closed-book QA: right when the reply's first line is, or contains as whole words, a gold alias (`qa.grade`).
    "triviaqa": Task("generative", lambda o: qa.problems(
        source(o, "evals/triviaqa_validation.jsonl", "mandarjoshi/trivia_qa"), limit=o.limit, config="rc.nocontext"),
        grade=qa.grade, stop_strings=("\n",)),
    "nq_open": Task("generative", lambda o: qa.problems(
        source(o, "evals/nq_open_validation.jsonl", "google-research-datasets/nq_open"), limit=o.limit,
        config="nq_open"),
        grade=qa.grade, stop_strings=("\n",)),
    # Letter counting on held-out words (the GRPO task): 200 problems unless limited.
    "spelling": Task("generative", lambda o: spelling.problems(spelling.read_words(next(
        (p for p in (os.path.join(o.data_dir, "words", f) for f in ("words_alpha.zip", "words_alpha.txt"))
         if os.path.exists(p)), os.path.join(o.data_dir, "words/words_alpha.zip"))), o.limit or 200),
        grade=spelling.grade, stop_strings=gsm8k.STOP_STRINGS),
    "bpb": Task("bpb"),
}


def run_task(name: str, cfg, params, tokenizer, options: Options, *, mesh=None, rules=None, engine=None,
             on_total: Callable[[int], None] | None = None, on_progress: Callable[[int], None] | None = None
             ) -> dict[str, Any]:
    """The task's figures (multiple choice: acc, acc_norm, items, truncated; generative: pass@k, problems, ...;
    bpb: val_loss, val_bpb)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    task = TASKS[name]
    if task.kind == "bpb":
        if mesh is None:
            raise ValueError("bits per byte runs on a mesh: pass mesh and rules")
        figures = bpb.bits_per_byte(cfg, params, tokenizer, options.bpb_source, mesh=mesh, rules=rules,
                                    batch_size=options.batch_rows, max_batches=options.bpb_batches,
                                    val_fraction=options.bpb_val_fraction)
        if on_progress is not None:
            on_progress(1)
        return figures
    data = task.load(options)
    if on_total is not None:
        on_total(len(data))
    if task.kind == "choice":
        scores = mc.score(cfg, params, tokenizer, data, batch_rows=options.batch_rows, row_len=options.row_len,
                          max_len=options.max_len, prefix=tokenizer.document_start if options.bos else (), mesh=mesh,
                          rules=rules, on_progress=on_progress)
        return mc.summarize(scores)
    engine = engine or generative.engine_for(cfg, params, tokenizer, tools=options.tools)
    result = generative.evaluate(
        engine, data, task.grade, chat=options.chat, n=options.n, ks=options.ks, temperature=options.temperature,
        top_p=options.top_p, max_new_tokens=options.max_new_tokens,
        stop_strings=() if options.chat else task.stop_strings, batch_size=options.batch_size, seed=options.seed,
        on_progress=on_progress)
    return result.summary()
