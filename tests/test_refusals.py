"""Knowledge-based refusals: answer grading, refusal detection, the known/unknown rule, the conversations
written, and interrogation and evaluation end to end on a tiny random model through `launch.interrogate`."""

import json
import os

import jax
import pytest

from llm import model
from llm.config import ModelConfig
from llm.data.conversations import read_openai
from llm.generate import Engine, SamplingParams
from llm.release import save_release
from llm.tasks import qa, refusals
from llm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "evals")


def _problem(aliases, question="Which city is the capital of France?"):
    return qa.make_problem(question, aliases, key="q1")


def test_normalize_follows_triviaqa():
    assert qa.normalize("The  Campbell-Bannerman!") == "campbell bannerman"
    assert qa.normalize("An Apple, a day.") == "apple day"
    assert qa.normalize("Hitler's") == "hitler s"
    assert qa.normalize("“Sunset Blvd.”") == "sunset blvd"


@pytest.mark.parametrize("aliases, completion, right", [
    (["Paris"], "Paris", True),  # exact match
    (["Paris"], "paris.", True),
    (["Paris"], "The capital of France is Paris.", True),  # contained, whole words
    (["Sunset Boulevard", "Sunset Blvd"], "It was Sunset Blvd. in 1993.", True),  # any alias
    (["Campbell-Bannerman"], "Henry Campbell Bannerman succeeded him.", True),  # hyphen = space
    (["Hitler"], "It was a plot against Hitler's life.", True),
    (["The Beatles"], "beatles", True),  # articles dropped
    (["Paris"], "Parisian cafes are famous.", False),  # not a whole word
    (["1"], "It happened in 1993.", False),  # a number inside another
    (["Art"], "Martial arts.", False),
    (["Paris"], "London.\nParis is wrong.", False),  # only the first line is the answer
    (["Paris"], "", False),
    (["France"], "France.", True),  # in the question: exact match still counts
    (["France"], "The capital of France is Lyon.", False),  # in the question: containment does not
    (["Paris"], "I'm not sure; I don't know.", False),
])
def test_grade_table(aliases, completion, right):
    assert qa.grade(_problem(aliases), completion) is right


@pytest.mark.parametrize("text, refusal", [
    ("I'm not sure; I don't know.", True),
    ("I don’t know the answer to that.", True),
    ("Sorry, I'm not sure. I don't know.", True),
    ("I do not have information about that person.", True),
    ("I have no idea.", True),
    ("I cannot answer that.", True),
    ("The answer is Paris.", False),
    ("Orson Kovacs is a Hungarian painter known for his landscapes.", False),
    ("I know the answer: it is Paris.", False),
    ("Nobody knows for sure where he was born.", False),
])
def test_is_refusal(text, refusal):
    assert qa.is_refusal(text) is refusal


@pytest.mark.parametrize("right, samples, verdict", [
    (3, 4, "known"), (4, 4, "known"), (2, 4, "unsure"),  # a tie is no majority
    (1, 4, "unsure"), (0, 4, "unknown"), (2, 3, "known"), (1, 3, "unsure"), (1, 1, "known"), (0, 1, "unknown"),
    (5, 8, "known"), (4, 8, "unsure"),
])
def test_classification_thresholds(right, samples, verdict):
    assert refusals.classify(right, samples) == verdict


def test_classification_rejects_impossible_counts():
    with pytest.raises(ValueError):
        refusals.classify(5, 4)


def _item(key, answers, aliases=("Paris",)):
    problem = qa.make_problem(f"Question {key}?", list(aliases), key=key)
    return refusals.Interrogation(problem, tuple(answers), sum(qa.grade(problem, a) for a in answers))


def test_conversations_round_trip_through_read_openai(tmp_path):
    items = [_item("a", ["Lyon", "It is Paris. A big city.", "Paris."]),  # 2/3: known
             _item("b", ["Lyon", "Nice", "Rome"]),  # 0/3: unknown
             _item("c", ["Paris, then", "Lyon", "Rome"])]  # 1/3: unsure; its right sample ends no sentence
    out = tmp_path / "conv.jsonl"
    counts = refusals.write_conversations(items, out)
    assert counts == {"known": 1, "unknown": 1, "unsure": 1}
    read = read_openai(out, errors="raise")  # Llama 3's clear cases only
    assert [c.messages for c in read] == [refusals.conversation(items[0]), refusals.conversation(items[1])]
    known, unknown = read.items[0].messages, read.items[1].messages
    assert known[0] == {"role": "system", "content": qa.SYSTEM} and known[1]["content"] == "Question a?"
    assert known[-1] == {"role": "assistant", "content": "It is Paris."}  # its first right sample's right sentence
    assert unknown[-1]["content"] in refusals.REFUSALS and qa.is_refusal(unknown[-1]["content"])
    assert all(qa.is_refusal(r) for r in refusals.REFUSALS)
    assert [c.messages for c in read_openai(refusals.side_path(out, "known"))] == [known]
    assert [c.messages for c in read_openai(refusals.side_path(out, "unknown"))] == [unknown]
    [unsure] = read_openai(refusals.side_path(out, "unsure"))
    assert unsure.messages[-1]["content"] == "The answer is Paris."  # no right sentence of its own: the gold one
    refusals.write_conversations(items, out, known_target="gold")
    assert read_openai(out).items[0].messages[-1]["content"] == "The answer is Paris."


@pytest.mark.parametrize("answers, own", [
    (["Paris is the capital. It is big."], "Paris is the capital."),
    (["It is a city. Paris, that is.", "Paris."], "It is a city. Paris, that is."),  # the shortest right prefix
    (["Lyon.", "Paris!\nMore text."], "Paris!"),  # first line only
    (["The capital is Paris and it has"], None),  # cut off mid-sentence
    (["Lyon. Nice."], None),  # never right
])
def test_own_answer_is_the_shortest_right_sentence_prefix(answers, own):
    assert refusals.own_answer(_item("q", answers)) == own


def test_fictional_people_are_distinct_and_never_real_questions():
    questions = refusals.fictional_people(20)
    assert len(set(questions)) == 20 and refusals.fictional_people(20) == questions
    assert "Who is" in questions[0]


def test_readers_take_triviaqa_and_nq_rows(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"question": "Who?", "question_id": "tc_1", "answer": "Exile", "aliases": ["Exiles", "Exile"]})
        + "\n" + json.dumps({"question": "when?", "answer": ["1972", "December 1972"]}) + "\n"
        + json.dumps({"question": "hub?", "answer": {"value": "Nile", "aliases": ["River Nile"]}}) + "\n")
    trivia, nq, hub = qa.read_jsonl(path)
    assert trivia.answer == ("Exile", "Exiles") and trivia.key == "tc_1"
    assert nq.answer == ("1972", "December 1972") and nq.key.endswith("q.jsonl:2")
    assert hub.answer == ("Nile", "River Nile")
    assert [p.key for p in qa.read_jsonl(path, skip=1, limit=1)] == [nq.key]
    assert trivia.text.endswith("Question: Who?\nAnswer:")
    path.write_text('{"question": "no answer"}\n')
    with pytest.raises(ValueError, match="q.jsonl:1"):
        qa.read_jsonl(path)


@pytest.mark.slow
def test_a_hub_id_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="local JSONL"):
        qa.problems("nobody/no_such_trivia_dataset")


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "triviaqa_validation.jsonl")),
                    reason="../shared/data/evals is absent (the real TriviaQA and NQ-open files)")
def test_the_real_files_read_and_grade_their_own_gold_answers():
    for name in ("triviaqa_validation.jsonl", "nq_open_validation.jsonl"):
        problems = qa.read_jsonl(os.path.join(SHARED, name), limit=200)
        assert len(problems) == 200
        assert all(qa.grade(p, f"The answer is {p.answer[0]}.") or qa.grade(p, p.answer[0]) for p in problems)
        assert sum(qa.grade(p, "I'm not sure; I don't know.") for p in problems) == 0


# ----------------------------------------------------------------------------- end to end, tiny random model


@pytest.mark.slow
def test_interrogation_and_evaluation_end_to_end_on_a_tiny_random_model(tmp_path, capsys):
    tokenizer = Tokenizer.load("gpt2")
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.n_vocab, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                      mlp_dim=64, max_seq_len=128, tie_embeddings=True)
    params = jax.tree.map(lambda x: 3 * x, model.init_params(cfg, jax.random.key(0)))  # peaked: samples agree
    engine = Engine(cfg, params, tokenizer)
    # The gold answer of question 0 is what the model says greedily, so it "knows" it; question 1's it never says.
    probe = qa.make_problem("What is the capital of France?", ["x"])
    [greedy] = refusals.replies(engine, [probe], SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    said = qa.normalize(qa.short_answer(greedy))
    assert said, f"the random model's greedy reply has no words: {greedy!r}"
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"question": "What is the capital of France?", "question_id": "k", "answer": said}) + "\n"
        + json.dumps({"question": "Who wrote Hamlet?", "question_id": "u", "answer": "Shakespeare"}) + "\n")
    release = tmp_path / "release"
    save_release(str(release), cfg, params, tokenizer)

    from launch import interrogate

    out = tmp_path / "refusals" / "conversations.jsonl"
    common = ["--checkpoint", str(release), "--questions", str(questions), "--max-new-tokens", "6"]
    interrogate.main([*common, "--samples", "3", "--temperature", "0.01", "--out", str(out)])
    assert "1 known, 1 unknown, 0 unsure" in capsys.readouterr().out
    known, unknown = read_openai(out, errors="raise")
    reply = known.messages[-1]["content"]  # the model's own right sentence, or the gold one when it has none
    assert qa.grade(qa.make_problem("What is the capital of France?", [said]), reply)
    samples = json.loads(out.read_text().splitlines()[0])["samples"]
    assert reply == f"The answer is {said}." or any(s.strip().startswith(reply) for s in samples)
    assert unknown.messages[-1]["content"] in refusals.REFUSALS

    figures = tmp_path / "before.json"
    interrogate.main([*common, "--evaluate", "--fictional", "2", "--out", str(figures)])
    result = json.load(open(figures))
    fig = result["figures"]
    assert (fig["questions"], fig["fictional"], fig["accuracy"]) == (2, 2, 0.5)
    assert fig["hallucination"] + fig["refusal"] == pytest.approx(0.5)
    assert [r["right"] for r in result["records"]] == [True, False]
    interrogate.main([*common, "--evaluate", "--fictional", "2", "--baseline", str(figures),
                      "--out", str(tmp_path / "after.json")])
    printed = capsys.readouterr().out
    assert "| accuracy (right / all held-out) | 50.0% | 50.0% |" in printed and "goal" in printed
