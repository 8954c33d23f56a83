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


def test_spelling_holds_out_words_balances_the_answers_and_grades_the_last_final_answer():
    import collections

    task, words = tasks.load("spelling", path=WORDS), spelling.read_words(WORDS)
    test, train = spelling.split_words(words, "test"), spelling.split_words(words, "train")
    assert test and train and not set(test) & set(train) and sorted(test + train) == sorted(words)
    held_out = task.problems("test", 400, 0)
    # Problem i asks for a count of i % 4: exactly 100 of each answer, so any constant answer is right 25% of the time.
    assert collections.Counter(p.answer for p in held_out) == {"0": 100, "1": 100, "2": 100, "3": 100}
    for p in held_out:
        *_, word, letter = p.key.split(":")
        assert word in test and p.answer == str(word.count(letter))
        question, reply = spelling.spelling_messages(word, letter)
        assert list(p.messages) == [question] and task.grade(p, reply["content"])  # the SFT reply is right
    # The SFT conversations follow the same rule, on train words only.
    found = task.conversations(40, seed=2)
    assert collections.Counter(m[1]["content"].rsplit("#### ", 1)[1] for _, m in found) == {
        "0": 10, "1": 10, "2": 10, "3": 10}
    assert not {m[0]["content"].split('"')[1] for _, m in found} & set(test)
    [p] = [q for q in held_out if q.answer == "1"][:1]
    assert task.reward(p, "So it appears 2 times. #### 2\n#### 1") == 1.0  # the last #### counts
    assert not task.grade(p, "it appears 1 time") and not task.grade(p, "#### 11") and task.grade(p, "#### 01")
    with pytest.raises(ValueError, match="13 times"):
        spelling.draw_letter(random.Random(0), ["strawberry"], 13, tries=10)


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


# ----------------------------------------------------------------------------- the SFT conversations agree with the grading


def test_each_tasks_sft_replies_are_graded_right_on_its_own_problems():
    spelling_task = tasks.load("spelling", path=WORDS)
    for key, (question, reply) in spelling_task.conversations(40, seed=2):
        letter, word = question["content"].split("'")[1], question["content"].split('"')[1]
        # The problem that asks the same question: the SFT reply is its right answer.
        problem = tasks.Problem((question,), str(word.count(letter)))
        assert key.startswith("spelling:2:") and spelling_task.grade(problem, reply["content"])
    arithmetic_task = tasks.load("arithmetic", digits=(1, 3))
    for (key, messages), problem in zip(arithmetic_task.conversations(50, seed=4), arithmetic_task.problems("train", 50, 4)):
        assert messages[:1] == list(problem.messages) and arithmetic_task.grade(problem, messages[1]["content"])
    gsm8k_task = tasks.load("gsm8k", path=GSM8K_TRAIN)
    conversations = gsm8k_task.conversations()
    assert [k for k, _ in conversations] == [f"{GSM8K_TRAIN}:{n}" for n in range(1, len(conversations) + 1)]
    for (_, messages), problem in zip(conversations, gsm8k_task.problems("train", 0, 0)):
        assert messages[0] == problem.messages[0] and gsm8k_task.grade(problem, messages[-1]["content"][-1]["text"])
    identity = tasks.load("identity", name="Orbit", creator="a test", held_out=20, seed=1)
    held_out = identity.problems("test", 0, 0)
    asked = {m[0]["content"] for _, m in identity.conversations()}
    assert len(held_out) == 20 and not asked & {p.messages[0]["content"] for p in held_out}
    assert all(identity.grade(problem, messages[-1]["content"]) for problem in held_out
               for _, messages in identity.conversations())
    assert not identity.grade(held_out[0], "I'm Tiny.") and identity.stop_strings == ("\n",)
    assert identity.problems("train", 0, 0)[0].messages[0]["content"] == identity.conversations()[0][1][0]["content"]


def test_spelling_conversations_spell_the_word_and_count_right():
    words = spelling.read_words(WORDS)
    for _, (question, answer) in tasks.load("spelling", path=WORDS).conversations(50, seed=1):
        letter, word = question["content"].split("'")[1], question["content"].split('"')[1]
        assert word in words and answer["content"].endswith(f"#### {word.count(letter)}")
        assert [x.split("(")[0] for x in answer["content"].split(".")[0].split(",")] == list(word)  # marks aside


def test_spelling_direct_fraction_answers_some_questions_without_spelling_and_keeps_the_questions():
    task = tasks.load("spelling", path=WORDS)
    spelled, mixed = task.conversations(400, seed=3), task.conversations(400, seed=3, direct_fraction=0.5)
    direct = 0
    for (_, a), (_, b) in zip(spelled, mixed):
        assert a[0] == b[0]  # the coin does not move the word and letter draws
        question, reply = b[0]["content"], b[1]["content"]
        letter, word = question.split("'")[1], question.split('"')[1]
        count = word.count(letter)
        if reply != a[1]["content"]:
            direct += 1
            assert reply == f"'{letter}' appears {count} time{'s' if count != 1 else ''}. #### {count}"
    assert 160 <= direct <= 240  # half, at random (binomial 400 x 0.5: 4 sigma either side)
    with pytest.raises(ValueError, match="direct_fraction"):
        task.conversations(4, direct_fraction=1.5)


def test_the_tasks_import_nothing_from_the_conversation_readers():
    import subprocess
    import sys

    code = ("import sys, llm.tasks as t\n"
            "for name in t.NAMES: t.options_of(name)\n"
            "assert 'llm.data.conversations' not in sys.modules, sorted(m for m in sys.modules if m.startswith('llm'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------- what the evals need


def test_every_eval_entry_loads_a_task_of_its_kind_with_its_fixed_options():
    from llm.evals import registry

    options = registry.Options(data_dir=str(FIXTURES / "evals"), limit=3, shots=1)
    for name, entry in registry.TASKS.items():
        if entry.kind == "bpb":
            continue
        task = registry.task(name, options)
        items = task.problems(task.eval_split, 0, 0)
        assert task.kind == entry.kind and 0 < len(items) <= 3, name
        assert (task.grade is None) == (task.kind == "choice"), name
    five, zero = registry.task("mmlu_5shot", options), registry.task("mmlu", options)  # options.shots is GSM8K's
    assert [i.context.count("Answer:") for i in five.problems("test", 0, 0)] == [6] * 3
    assert [i.context.count("Answer:") for i in zero.problems("test", 0, 0)] == [1] * 3
    assert gsm8k.fewshot_prefix([]) == "" and registry.task("gsm8k", options).problems("test", 0, 0)[0].text.count(
        "Question:") == 2
    with pytest.raises(ValueError, match="unknown task 'bpb'"):
        registry.task("bpb", options)


def test_file_tasks_draw_by_seed_and_name_their_splits():
    task = tasks.load("triviaqa", data_dir=str(FIXTURES / "evals"))
    everything = task.problems("validation", 0, 0)
    assert task.eval_split == "validation" and task.stop_strings == ("\n",)
    assert task.problems("validation", 2, 7) == random.Random(7).sample(everything, 2)
    with pytest.raises(ValueError, match="'triviaqa' has no split 'train'; its splits: validation"):
        task.problems("train", 1, 0)
    arc = tasks.load("arc_easy", data_dir=str(FIXTURES / "evals"), chat=True)
    assert all(item.messages and item.choices[0] == "A" for item in arc.problems("validation", 0, 0))


def test_arithmetic_problems_are_right_held_out_and_graded_by_their_final_answer():
    from llm.tasks import arithmetic

    test = arithmetic.problems(100, split="test", seed=0)
    train = arithmetic.problems(300, split="train", seed=0)
    expressions = lambda ps: {p.key.split(":")[3] for p in ps}
    assert not expressions(test) & expressions(train)
    for p in test + train:
        expression = p.key.split(":")[3]
        assert p.answer == str(eval(expression))  # the key's own arithmetic, by Python
        assert 2 <= len(expression.split()[0]) <= 4
    assert {p.key.split()[1] for p in train} == {"+", "-", "*"}
    p = next(q for q in test if q.answer.startswith("-"))
    assert arithmetic.grade(p, f"so #### {p.answer}") and not arithmetic.grade(p, p.answer)
    assert arithmetic.grade(p, "#### 1,000") == (p.answer == "1000")
