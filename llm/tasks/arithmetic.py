"""Multi-digit arithmetic ("What is 4821 + 377?"): generated problems, grading, SFT data.

    task = load("arithmetic", digits=(2, 4))      # llm.tasks.load
    task.problems("test", 200, 0); task.grade(problem, "4821 + 377 = 5198. #### 5198")  -> True
    task.conversations(1000)                      # train problems answered in that format

Operands have between `digits[0]` and `digits[1]` digits (multiplication: the
second operand at most 2 digits, so answers stay short); the operation is +, -
or x with equal odds. Train and test problems come from disjoint halves of the
operand pairs (by a CRC-32 of "a op b"), so a held-out problem is never trained
on. The answer is the last `#### N` of the completion, as in GSM8K's format
(`llm.tasks.gsm8k.extract_answer` reads more forms; this task asks for this one).
Reward: `float(grade(...))`.
"""

from __future__ import annotations

import random
import re
import zlib

from llm.tasks import Message, Problem, Task, check_split
from llm.tasks.gsm8k import STOP_STRINGS

SPLITS = ("train", "test")
OPERATIONS = ("+", "-", "*")
_FINAL = re.compile(r"####\s*(-?[\d,]+)")
STANDARD_COUNT = 200  # problems in a split's standard set (a count of 0)


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    n = rng.randint(*digits)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)


def problems(n: int, *, split: str = "test", seed: int = 0, digits: tuple[int, int] = (2, 4),
             test_fraction: float = 0.1) -> list[Problem]:
    """`n` problems of the split, drawn with `seed` (rejection sampling into the split by hash)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= digits[0] <= digits[1]:
        raise ValueError(f"digits must be (low, high) with 1 <= low <= high, got {digits}")
    rng = random.Random(f"{split}:{seed}")
    out = []
    while len(out) < n:
        op = rng.choice(OPERATIONS)
        a = _operand(rng, digits)
        b = _operand(rng, (1, min(2, digits[1])) if op == "*" else digits)
        expression = f"{a} {op} {b}"
        if (zlib.crc32(expression.encode()) % 1000 < test_fraction * 1000) != (split == "test"):
            continue
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"What is {expression.replace('*', 'x')}? End with '#### ' and the number."
        out.append(Problem(messages=({"role": "user", "content": question},), answer=str(value),
                           text=f"Question: {question}\nAnswer:", key=f"{split}:{seed}:{len(out)}:{expression}"))
    return out


def extract_answer(completion: str) -> str | None:
    found = _FINAL.findall(completion)
    if not found:
        return None
    digits = found[-1].replace(",", "")
    return str(int(digits)) if digits.lstrip("-") else None


def grade(problem: Problem, completion: str) -> bool:
    return extract_answer(completion) == problem.answer



def conversations(n: int, *, seed: int = 0, split: str = "train", digits: tuple[int, int] = (2, 4),
                  test_fraction: float = 0.1) -> list[tuple[str, list[Message]]]:
    """`n` problems of the split as (key, messages), answered in the format `grade` reads ("a + b = c. #### c")."""
    out = []
    for p in problems(n, split=split, seed=seed, digits=digits, test_fraction=test_fraction):
        expression = p.key.split(":")[3].replace("*", "x")
        reply = f"{expression} = {p.answer}. #### {p.answer}"
        out.append((f"arithmetic:{p.key}", [*p.messages, {"role": "assistant", "content": reply}]))
    return out


def load(digits: tuple[int, int] = (2, 4), limit: int | None = None, test_fraction: float = 0.1) -> Task:
    """Arithmetic with operands of `digits` digits; a count of 0 gives `limit` problems (200 without one)."""
    digits = tuple(digits)

    def draw(split: str, count: int | None = 0, seed: int = 0) -> list[Problem]:
        check_split("arithmetic", split, SPLITS)
        n = count if count and count > 0 else (limit or STANDARD_COUNT)
        return problems(n, split=split, seed=seed, digits=digits, test_fraction=test_fraction)

    def sft(n: int, *, seed: int = 0, split: str = "train") -> list[tuple[str, list[Message]]]:
        return conversations(n, seed=seed, split=split, digits=digits, test_fraction=test_fraction)

    return Task("arithmetic", "generative", draw, grade, STOP_STRINGS, sft)
