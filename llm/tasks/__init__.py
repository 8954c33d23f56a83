"""Tasks: one object per task, shared by SFT, the evals, GRPO and RLHF (nanochat's `tasks/` pattern).

    task = load("gsm8k", data_dir="../shared/data")
    task.problems("test", 200, 0)          # held-out Problems (MultipleChoice items for kind "choice")
    task.grade(problem, completion)        # the evals' rule; RL's reward is task.reward(problem, completion)
    task.conversations()                   # what the task contributes to SFT, as (key, messages) pairs

A `Task` gives its problems by split (`problems(split, count, seed)`: `count`
problems drawn with `seed`; a count of 0 or None gives the whole split in its
order, which for a generated task is its standard set), the grading rule, the
strings where a base model's answer ends, and the SFT conversations it
contributes, so fine-tuning, evaluation and RL all see the same prompts and
grade the same way. `eval_split` is the split the evals score (HellaSwag, ARC,
TriviaQA and NQ keep their public answers in "validation").

Tasks by name (`load`): spelling, arithmetic, gsm8k, identity (who the assistant
is: conversations and a check that it names itself), triviaqa, nq_open,
hellaswag, arc_easy, arc_challenge, mmlu. Options a task does not take are an
error, except the generic ones of `GENERIC` (a config's shared fields, e.g.
GRPO's `path` and `digits`), which a task that does not use them ignores.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One prompt with a gold answer.

    `messages` is the conversation up to the assistant's turn (rendered with the
    model's chat format); `text` is the same problem as plain text for a base
    model (few-shot prefix included), completed after it.
    """

    messages: tuple[Message, ...]
    answer: Any
    text: str = ""
    key: str = ""


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """A context and its candidate continuations; `label` indexes the right one.

    A choice continues the context directly: the delimiter (lm-evaluation-harness's
    `target_delimiter`, usually a space) ends the context. `messages`, when given,
    is a conversation rendered before the context with an open assistant turn
    (the chat variant: the choices are the start of the assistant's reply).
    """

    context: str
    choices: tuple[str, ...]
    label: int
    key: str = ""
    messages: tuple[Message, ...] = ()


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: its problems by split, grading, base-model stops and SFT conversations (see the module docstring)."""

    name: str
    kind: str  # "generative" (sampled, graded) or "choice" (scored by log-likelihood)
    problems: Callable[[str, int, int], list]  # (split, count, seed) -> Problems or MultipleChoice items
    grade: Callable[[Problem, str], bool] | None = None
    stop_strings: tuple[str, ...] = ()  # where a base model's answer ends
    conversations: Callable[..., list] | None = None  # (options) -> [(key, messages)]: what SFT trains on
    eval_split: str = "test"

    def reward(self, problem: Problem, completion: str) -> float:
        """RL's reward: `float(grade(...))` (no task adds format terms)."""
        if self.grade is None:
            raise ValueError(f"task {self.name!r} has no grade, so no reward")
        return float(self.grade(problem, completion))


# The module and function that load each task (imported on use: the task modules import this one).
_LOADERS = {
    "spelling": ("spelling", "load"),
    "arithmetic": ("arithmetic", "load"),
    "gsm8k": ("gsm8k", "load"),
    "identity": ("identity", "load"),
    "triviaqa": ("qa", "load_triviaqa"),
    "nq_open": ("qa", "load_nq_open"),
    "hellaswag": ("choice_sets", "load_hellaswag"),
    "arc_easy": ("choice_sets", "load_arc_easy"),
    "arc_challenge": ("choice_sets", "load_arc_challenge"),
    "mmlu": ("choice_sets", "load_mmlu"),
}
NAMES = tuple(_LOADERS)
# Options any task accepts and ignores when it does not use them: configs share these fields across tasks.
GENERIC = ("path", "eval_path", "digits", "data_dir", "chat", "shots", "limit")


def _loader(name: str) -> Callable[..., Task]:
    if name not in _LOADERS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(NAMES)}")
    module, function = _LOADERS[name]
    return getattr(importlib.import_module(f"llm.tasks.{module}"), function)


def options_of(name: str, /) -> tuple[str, ...]:
    """The options task `name` takes (its `load`'s keywords)."""
    return tuple(inspect.signature(_loader(name)).parameters)


def load(name: str, /, **options: Any) -> Task:
    """The task `name` with the options its loader documents; its problems are read on first use, once."""
    takes = options_of(name)
    unknown = [k for k in options if k not in takes and k not in GENERIC]
    if unknown:
        raise ValueError(f"task {name!r} takes no option(s) {unknown}; its options: {', '.join(takes) or 'none'}")
    return _loader(name)(**{k: v for k, v in options.items() if k in takes})


# ----------------------------------------------------------------------------- helpers for the task modules


def draw(items: Sequence, count: int | None, seed: int) -> list:
    """All `items` in order for a count of 0 or None, else `count` of them (at most all) sampled with `seed`."""
    if not count or count <= 0:
        return list(items)
    return random.Random(seed).sample(list(items), min(count, len(items)))


def check_split(task: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"task {task!r} has no split {split!r}; its splits: {', '.join(splits)}")


def find(data_dir: str, local: str, hub_id: str) -> str:
    """`data_dir/local` when it exists, else the Hugging Face hub id."""
    path = os.path.join(data_dir, local)
    return path if data_dir and os.path.exists(path) else hub_id
