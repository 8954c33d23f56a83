"""Tasks: one object per task gives the problems, the grading, the SFT conversations and what the evals need."""

import random
from pathlib import Path

import pytest

from llm import tasks
from llm.tasks import arithmetic, gsm8k, spelling

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = str(FIXTURES / "chat" / "words_alpha_slice.txt")
GSM8K_TRAIN, GSM8K_TEST = str(FIXTURES / "evals" / "gsm8k" / "train.jsonl"), str(FIXTURES / "evals" / "gsm8k" / "test.jsonl")


# ----------------------------------------------------------------------------- the streams GRPO draws


def test_spelling_streams_are_the_module_functions_draws():
    task = tasks.load("spelling", path=WORDS)
    words = spelling.read_words(WORDS)
    for seed in range(3):
        assert task.problems("train", 8, seed) == spelling.problems(words, 8, split="train", seed=seed)
        assert task.problems("test", 8, seed) == spelling.problems(words, 8, split="test", seed=seed)
    assert task.problems("test", 0, 0) == spelling.problems(words, 200, split="test")  # the standard held-out set
    assert tasks.load("spelling", path=WORDS, limit=5).problems("test", None, 0) == task.problems("test", 5, 0)


def test_arithmetic_streams_are_the_module_functions_draws_with_the_digits():
    task = tasks.load("arithmetic", digits=[1, 3])
    for seed in range(3):
        assert task.problems("train", 8, seed) == arithmetic.problems(8, split="train", seed=seed, digits=(1, 3))
        assert task.problems("test", 8, seed) == arithmetic.problems(8, split="test", seed=seed, digits=(1, 3))


def test_gsm8k_streams_sample_the_files_read_once():
    train, test = gsm8k.problems(GSM8K_TRAIN, split="train"), gsm8k.problems(GSM8K_TEST, split="test")
    task = tasks.load("gsm8k", path=GSM8K_TRAIN, eval_path=GSM8K_TEST)
    for seed in range(3):
        assert task.problems("train", 2, seed) == random.Random(seed).sample(train, 2)
        assert task.problems("test", 3, seed) == random.Random(seed).sample(test, min(3, len(test)))
    assert task.problems("test", 100, 0) == random.Random(0).sample(test, len(test))  # at most all
    assert task.problems("test", 0, 0) == test  # all, in order
    # Without eval_path the test problems come from path, as GRPO's data.eval_path="" means.
    assert tasks.load("gsm8k", path=GSM8K_TRAIN).problems("test", 0, 0) == gsm8k.problems(GSM8K_TRAIN)


# ----------------------------------------------------------------------------- grading and loading


def test_reward_is_the_grade_as_a_number():
    task = tasks.load("arithmetic")
    [problem] = task.problems("test", 1, 0)
    assert task.reward(problem, f"#### {problem.answer}") == 1.0 and task.reward(problem, problem.answer) == 0.0
    with pytest.raises(ValueError, match="no grade"):
        tasks.Task("prompts", "generative", lambda split, count, seed: []).reward(problem, "")


def test_load_names_the_choices_and_the_options():
    with pytest.raises(ValueError, match="unknown task 'spellling'; choose from spelling, arithmetic, gsm8k"):
        tasks.load("spellling")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['digit'\]; its options: digits"):
        tasks.load("arithmetic", digit=(1, 2))
    # GRPO's shared config fields go to every task; the ones it does not use are ignored.
    task = tasks.load("arithmetic", path="unused.zip", eval_path="", digits=(2, 2))
    assert all(len(p.key.split(":")[3].split()[0]) == 2 for p in task.problems("train", 20, 0))
    with pytest.raises(ValueError, match="no split 'validation'; its splits: train, test"):
        task.problems("validation", 1, 0)
    with pytest.raises(ValueError, match="needs a word list"):
        tasks.load("spelling")
