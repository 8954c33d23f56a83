"""The evaluation tasks by name, for `launch.eval`: each one of `llm/tasks/` (a new task is one `TASKS` entry).

An entry names its `llm.tasks` task and any options fixed for it (mmlu_5shot:
five shots); `task(name, options)` loads it with the run's `data_dir` (the
public files under the names of `../shared/data/README.md` when there, else the
Hugging Face hub id), `limit`, `chat` and `shots` (GSM8K's few-shot examples for
a base model). Its evaluation set is its whole `eval_split`: a choice task's
items are scored by `llm.evals.multiple_choice`, a generative task's problems
sampled and graded by its own `grade` in `llm.evals.generative`, the rule GRPO
rewards with. The bits-per-byte entry reads `options.bpb_source` (`llm.evals.bpb`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from llm import tasks
from llm.evals import bpb, generative
from llm.evals import multiple_choice as mc
from llm.generate import engine_for


@dataclasses.dataclass(frozen=True)
class Options:
    data_dir: str = "../shared/data"
    limit: int | None = None
    chat: bool = False  # the chat variant where a task has one (ARC, MMLU, GSM8K)
    # multiple choice
    batch_rows: int = 16
    row_len: int = 256
    max_len: int | None = None
    bos: bool = False  # the model's own prompt start (`Tokenizer.prompt_start`) before every context (the harness: none)
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
class Entry:
    kind: str  # "choice", "generative" (the task's own kind) or "bpb"
    task: str = ""  # its name in llm.tasks
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # options over the run's


TASKS: dict[str, Entry] = {
    "hellaswag": Entry("choice", "hellaswag"),
    "arc_easy": Entry("choice", "arc_easy"),
    "arc_challenge": Entry("choice", "arc_challenge"),
    "mmlu": Entry("choice", "mmlu", {"shots": 0}),  # options.shots is GSM8K's
    "mmlu_5shot": Entry("choice", "mmlu", {"shots": 5}),
    "gsm8k": Entry("generative", "gsm8k"),
    "triviaqa": Entry("generative", "triviaqa"),  # closed-book: the reply's first line holds a gold alias
    "nq_open": Entry("generative", "nq_open"),
    "spelling": Entry("generative", "spelling"),  # letter counting on held-out words (GRPO's task): 200 unless limited
    "arithmetic": Entry("generative", "arithmetic"),  # held-out problems, 2 to 4 digits: 200 unless limited
    "bpb": Entry("bpb"),
}


def task(name: str, options: Options) -> tasks.Task:
    """The `llm.tasks` task of entry `name`, loaded with the run's options."""
    if name not in TASKS or TASKS[name].kind == "bpb":
        raise ValueError(f"unknown task {name!r}; choose from {sorted(n for n, e in TASKS.items() if e.task)}")
    entry = TASKS[name]
    run = {"data_dir": options.data_dir, "limit": options.limit, "chat": options.chat, "shots": options.shots}
    return tasks.load(entry.task, **(run | entry.fixed))


def run_task(name: str, cfg, params, tokenizer, options: Options, *, mesh=None, rules=None, engine=None,
             on_total: Callable[[int], None] | None = None, on_progress: Callable[[int], None] | None = None
             ) -> dict[str, Any]:
    """The task's figures (multiple choice: acc, acc_norm, items, truncated; generative: pass@k, problems, ...;
    bpb: val_loss, val_bpb)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if TASKS[name].kind == "bpb":
        if mesh is None:
            raise ValueError("bits per byte runs on a mesh: pass mesh and rules")
        figures = bpb.bits_per_byte(cfg, params, tokenizer, options.bpb_source, mesh=mesh, rules=rules,
                                    batch_size=options.batch_rows, max_batches=options.bpb_batches,
                                    val_fraction=options.bpb_val_fraction)
        if on_progress is not None:
            on_progress(1)
        return figures
    evaluated = task(name, options)
    data = evaluated.problems(evaluated.eval_split, 0, 0)
    if on_total is not None:
        on_total(len(data))
    if evaluated.kind == "choice":
        scores = mc.score(cfg, params, tokenizer, data, batch_rows=options.batch_rows, row_len=options.row_len,
                          max_len=options.max_len, prefix=tokenizer.prompt_start if options.bos else (), mesh=mesh,
                          rules=rules, on_progress=on_progress)
        return mc.summarize(scores)
    engine = engine or engine_for(cfg, params, tokenizer, tools=options.tools)
    result = generative.evaluate(
        engine, data, evaluated.grade, chat=options.chat, n=options.n, ks=options.ks, temperature=options.temperature,
        top_p=options.top_p, max_new_tokens=options.max_new_tokens,
        stop_strings=() if options.chat else evaluated.stop_strings, batch_size=options.batch_size, seed=options.seed,
        on_progress=on_progress)
    return result.summary()
