"""Letter counting ("How many times does the letter 'r' appear in the word "strawberry"?"): problems, grading, SFT data.

    task = load("spelling", path="../shared/data/words/words_alpha.zip")   # llm.tasks.load
    task.problems("test", 200, 0); task.grade(problem, "s,t,r(1),... So 'r' appears 3 times. #### 3")  -> True
    task.conversations(400, direct_fraction=0.5)   # the SFT source: (key, messages) pairs

The problems ask word for word what the SFT conversations ask
(`spelling_messages`), so a model fine-tuned on them answers in its format from
the first rollout. Words are split into train and test by a hash of the word
(`split_words`), so the held-out problems never share a word with the ones RL
trains on, whatever seeds draw them; the SFT conversations draw their words from
the train split too, so no held-out word is seen in fine-tuning.

Answers are balanced: problem i asks for a letter the word holds
`SPELLING_COUNTS[i % 4]` = 0, 1, 2 or 3 times (`draw_letter`:
words by rejection, then one such letter), so each answer is exactly a quarter
of a set of 4k problems and a constant answer scores 25%: it cannot pass for
counting (with skewed answers, a policy that always gives the majority answer
beats the SFT model: docs/experiments/grpo_letter_counting.md). The same rule
draws the SFT data.

The answer is the last `#### N` of the completion (the SFT format's final line);
a completion without one is wrong, even if the right count appears in its
spelling-out: a count that was never concluded is not an answer. Reward:
`float(grade(...))`, no format terms.
"""

from __future__ import annotations

import io
import os
import random
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from llm.tasks import Message, Problem, Task, check_split
from llm.tasks.gsm8k import STOP_STRINGS

SPLITS = ("train", "test")
STANDARD_COUNT = 200  # problems in a split's standard set (a count of 0): the evals' held-out letter counting

_FINAL = re.compile(r"####\s*(-?\d+)")


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


def conversations(words: Sequence[str], n: int, *, seed: int = 0, split: str = "train",
                  counts: Sequence[int] = SPELLING_COUNTS, direct_fraction: float = 0.0, test_fraction: float = 0.1
                  ) -> list[tuple[str, list[Message]]]:
    """`n` letter-counting conversations, (key, messages), over the `split` words (`split_words`; "" for all), asking for
    the `counts` in turn (`draw_letter`): the SFT mixture trains on the words GRPO trains on, never the held-out ones.

    A `direct_fraction` of them answer without spelling the word out
    (`spell=False`), at random: the fine-tuned model then chooses between
    thinking and guessing on its own, and GRPO can learn which pays.
    """
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"direct_fraction must be in [0, 1], got {direct_fraction}")
    pool = split_words(words, split, test_fraction) if split else list(words)
    rng, coin = random.Random(seed), random.Random(f"direct:{seed}")
    items = []
    for i in range(n):
        word, letter = draw_letter(rng, pool, counts[i % len(counts)])
        spell = direct_fraction == 0.0 or coin.random() >= direct_fraction
        items.append((f"spelling:{seed}:{i}", spelling_messages(word, letter, spell=spell)))
    return items


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

    def sft(n: int, *, seed: int = 0, split: str = "train", counts: Sequence[int] = SPELLING_COUNTS,
            direct_fraction: float = 0.0) -> list[tuple[str, list[Message]]]:
        return conversations(words, n, seed=seed, split=split, counts=counts, direct_fraction=direct_fraction,
                             test_fraction=test_fraction)

    return Task("spelling", "generative", draw, grade, STOP_STRINGS, sft)
