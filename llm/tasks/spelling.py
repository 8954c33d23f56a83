"""Letter counting ("How many times does the letter 'r' appear in the word "strawberry"?"): problems and grading.

    problems(read_words("../shared/data/words/words_alpha.zip"), 200, split="test")
    grade(problem, "Spelling strawberry: s,t,r,... #### 3")  -> True

The prompt is word for word the SFT mixture's (`conversations.spelling_messages`),
so a model fine-tuned on that mixture answers in its format from the first
rollout. Words are split into train and test by a hash of the word
(`split_words`), so the held-out problems never share a word with the ones RL
trains on, whatever seeds draw them; the SFT mixture draws its few hundred words
from the train split too, so no held-out word was seen in fine-tuning.

Answers are balanced: problem i asks for a letter the word holds
`SPELLING_COUNTS[i % 4]` = 0, 1, 2 or 3 times (`conversations.draw_letter`:
words by rejection, then one such letter), so each answer is exactly a quarter
of a set of 4k problems and a constant answer scores 25%: it cannot pass for
counting (when the letter was in the word two times out of three, 54% of the
answers were 1, and a GRPO policy that always said 1 beat the SFT model). The
same rule draws the SFT data.

The answer is the last `#### N` of the completion (the SFT format's final line);
a completion without one is wrong, even if the right count appears in its
spelling-out: a count that was never concluded is not an answer. Reward:
`float(grade(...))`, no format terms.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence

from llm.data import conversations as conv
from llm.data.conversations import SPELLING_COUNTS, draw_letter, read_words, spelling_messages, split_words
from llm.tasks import Problem, Task, check_split
from llm.tasks.gsm8k import STOP_STRINGS

__all__ = ["problems", "grade", "reward", "extract_answer", "split_words", "read_words", "SPELLING_COUNTS", "load"]

SPLITS = ("train", "test")
STANDARD_COUNT = 200  # problems in a split's standard set (a count of 0): the evals' held-out letter counting

_FINAL = re.compile(r"####\s*(-?\d+)")


def problems(words: Sequence[str], n: int, *, split: str = "test", seed: int = 0, test_fraction: float = 0.1
             ) -> list[Problem]:
    """`n` letter-counting problems over the split's words, drawn with `seed`, the answers 0, 1, 2, 3 in turn."""
    pool = split_words(words, split, test_fraction)
    if not pool:
        raise ValueError(f"no {split} words among the {len(words)} given (test_fraction={test_fraction})")
    rng = random.Random(f"{split}:{seed}")
    out = []
    for i in range(n):
        word, letter = draw_letter(rng, pool, SPELLING_COUNTS[i % len(SPELLING_COUNTS)])
        question = spelling_messages(word, letter)[0]
        out.append(Problem(messages=(question,), answer=str(word.count(letter)),
                           text=f"Question: {question['content']}\nAnswer:", key=f"{split}:{seed}:{i}:{word}:{letter}"))
    return out


def extract_answer(completion: str) -> str | None:
    """The number after the last `#### `, as written without leading zeros; None without one."""
    found = _FINAL.findall(completion)
    return str(int(found[-1])) if found else None


def grade(problem: Problem, completion: str) -> bool:
    return extract_answer(completion) == problem.answer


def reward(problem: Problem, completion: str) -> float:
    return float(grade(problem, completion))


def words_file(data_dir: str) -> str:
    """The word list under `data_dir/words/` (words_alpha.zip, or its .txt)."""
    candidates = [os.path.join(data_dir, "words", f) for f in ("words_alpha.zip", "words_alpha.txt")]
    return next((p for p in candidates if os.path.exists(p)), candidates[0])


def load(path: str = "", data_dir: str = "", limit: int | None = None, test_fraction: float = 0.1) -> Task:
    """Letter counting over the word list `path` (or the one under `data_dir`), read now.

    A count of 0 gives `limit` problems (200 without one), drawn with the seed.
    """
    if not path and not data_dir:
        raise ValueError("task 'spelling' needs a word list: path, or data_dir holding words/words_alpha.zip")
    words = read_words(path or words_file(data_dir))

    def draw(split: str, count: int | None = 0, seed: int = 0) -> list[Problem]:
        check_split("spelling", split, SPLITS)
        n = count if count and count > 0 else (limit or STANDARD_COUNT)
        return problems(words, n, split=split, seed=seed, test_fraction=test_fraction)

    def sft(n: int, *, seed: int = 0, split: str = "train", counts=SPELLING_COUNTS, direct_fraction: float = 0.0
            ) -> list[tuple[str, list]]:
        found = conv.spelling(words, n, seed=seed, split=split, counts=counts, direct_fraction=direct_fraction)
        return [(c.key, c.messages) for c in found]

    return Task("spelling", "generative", draw, grade, STOP_STRINGS, sft)
