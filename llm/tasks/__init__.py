"""Tasks: problems with a checkable answer, graded the same way by the evals and by RL.

A generative task module gives `problems(...) -> list[Problem]` and
`grade(problem, completion) -> bool` (the RL reward is `float(grade(...))`, plus
any documented format terms); the evals (`llm/evals/`) sample completions for
the problems and report pass@k, GRPO (`llm/stages/grpo.py`) rewards its
rollouts with the same `grade` (nanochat's `tasks/` pattern: one grading rule
for both). Multiple-choice tasks give `MultipleChoice` items instead.
"""

from __future__ import annotations

import dataclasses
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
