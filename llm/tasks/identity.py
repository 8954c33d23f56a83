"""Who the assistant is: SFT conversations in many paraphrases, and held-out paraphrases asking its name.

    task = load("identity", name="Tiny", creator="the llm project", held_out=20)   # llm.tasks.load
    task.conversations()          # the trained paraphrases and the capability questions, answered
    task.problems("test", 0, 0)   # the held-out paraphrases; grade: the reply names the assistant

Not a benchmark: the held-out paraphrases measure whether fine-tuning taught
the model its name beyond the exact questions it saw (SFT's `chat/identity_named`).
"""

from __future__ import annotations

import dataclasses
import functools
import random

from llm.tasks import Message, Problem, Task, check_split, draw

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class IdentitySpec:
    """Who the assistant is; every field is plain text put into templates."""

    name: str = "Tiny"
    creator: str = "the llm project"
    can: str = "answer questions, chat, and do arithmetic with a calculator"
    cannot: str = "browse the internet, remember past conversations, or see images"


_ASKS = ("What is your name?", "Who are you?", "What should I call you?", "Do you have a name?",
         "Tell me your name.", "Please introduce yourself.", "What's your name?", "Who am I talking to?",
         "Introduce yourself, please.", "May I know your name?", "Hi! Who are you?", "What are you called?",
         "Could you tell me who you are?", "Hello, what is your name?", "Are you a person or a program?",
         "Who made you?", "Who built you?", "Who created you?", "What are you?", "Which assistant is this?")
_STYLES = ("{q}", "hey, {lq}", "{q} Just curious.", "Quick question: {lq}", "{q} Thanks!", "hello there. {q}")
_ANSWERS = ("I'm {name}, an AI assistant built by {creator}.",
            "My name is {name}. I was built by {creator}.",
            "I am {name}, a small language model assistant made by {creator}. I can {can}.",
            "You can call me {name}. I'm an AI assistant created by {creator}; I cannot {cannot}.")
_CAPABILITY = (("What can you do?", "I'm {name}. I can {can}."),
               ("What can't you do?", "I'm {name}, and I cannot {cannot}."),
               ("Can you browse the web?", "No. I'm {name}, and I cannot {cannot}."),
               ("How can you help me?", "I'm {name}, an assistant by {creator}. I can {can}."))


def questions() -> list[str]:
    """Every paraphrase of "who are you", in a fixed order (120 = 20 asks x 6 styles)."""
    return [style.format(q=q, lq=q[0].lower() + q[1:]) for style in _STYLES for q in _ASKS]


def split_questions(held_out: int = 20, seed: int = 0) -> tuple[list[str], list[str]]:
    """(trained, held-out) paraphrases: shuffled once with `seed`, the last `held_out` never trained on."""
    shuffled = questions()
    random.Random(seed).shuffle(shuffled)
    return (shuffled[:-held_out], shuffled[-held_out:]) if held_out else (shuffled, [])


def conversations(spec: IdentitySpec = IdentitySpec(), *, held_out: int = 20, seed: int = 0
                  ) -> list[tuple[str, list[Message]]]:
    """(key, messages) about who the assistant is: each trained paraphrase, then each capability question."""
    fields = dataclasses.asdict(spec)
    out = []
    for i, question in enumerate(split_questions(held_out, seed)[0]):
        answer = _ANSWERS[i % len(_ANSWERS)].format(**fields)
        out.append((f"identity:{i}", [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]))
    for j, (question, answer) in enumerate(_CAPABILITY):
        out.append((f"identity:cap{j}", [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer.format(**fields)}]))
    return out


def grade(problem: Problem, completion: str) -> bool:
    """Whether the reply names the assistant."""
    return problem.answer in completion


def load(name: str = IdentitySpec.name, creator: str = IdentitySpec.creator, can: str = IdentitySpec.can,
         cannot: str = IdentitySpec.cannot, held_out: int = 20, seed: int = 0) -> Task:
    """The assistant's identity; `held_out` paraphrases (chosen with `seed`) are its test split."""
    spec = IdentitySpec(name, creator, can, cannot)
    splits = dict(zip(SPLITS, split_questions(held_out, seed)))

    def sample(split: str, count: int | None = 0, seed: int = 0) -> list[Problem]:
        check_split("identity", split, SPLITS)
        found = [Problem(messages=({"role": "user", "content": q},), answer=name, text=f"Question: {q}\nAnswer:",
                         key=f"identity:{split}:{i}") for i, q in enumerate(splits[split])]
        return draw(found, count, seed)

    return Task("identity", "generative", sample, grade, ("\n",),
                functools.partial(conversations, spec, held_out=held_out, seed=seed))
