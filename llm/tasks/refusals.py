"""Knowledge-based refusals: ask the model what it knows, teach it to say "I don't know" where it does not.

Llama 3 (Dubey et al. 2024, §4.3.6, "Factuality"): take questions with gold
answers, sample the model several times per question, grade the samples, and
write fine-tuning data that answers the questions the model knows and refuses
the ones it does not, so the model learns to refuse exactly where its knowledge
ends ("know what it knows"). Here:

- `interrogate`: k samples per question at temperature > 0 (chat format, the
  system instruction of `qa.SYSTEM`), each graded by `qa.grade`.
- `classify`: *known* when the model is right in a strict majority of the k
  samples (right > k/2: a coin-flip answer is not knowledge); *unknown* when it is
  never right (0 of k); anything between is *unsure*. Llama 3 keeps only the clear
  cases; here the unsure ones are written to their own file (`side_path`), so a
  mixture may answer them too (the refusal config does: a question the model
  sometimes gets right is one it should attempt, and the goal counts accuracy).
- `conversation`: a known (or unsure) question is answered with the model's own
  right sample, cut to its shortest first sentence that still grades right
  (`own_answer`), so the answers teach when to answer and not a new style (the
  gold sentence "The answer is X." teaches a new style and costs accuracy:
  docs/experiments/refusals.md); the gold sentence when no sentence of a right sample is right on its
  own (a sample cut off mid-sentence), or with `known_target="gold"`. An unknown
  question is refused (a few phrasings of "I'm not sure; I don't know.", chosen
  by the question's key). Departure from Llama 3: there is no LLM judge; grading
  is `qa.grade`'s alias match.
- `evaluate`: greedy replies to held-out questions and to questions about
  fictional people (`fictional_people`, never trained on), measured as accuracy,
  hallucination rate (wrong and not refusing) and refusal rates.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm.generate import Engine, SamplingParams
from llm.tasks import Message, Problem
from llm.tasks import qa

KNOWN, UNKNOWN, UNSURE = "known", "unknown", "unsure"
REFUSALS = ("I'm not sure; I don't know.", "I'm not sure. I don't know the answer to that.",
            "I don't know; I'm not sure about that.", "Sorry, I'm not sure. I don't know.")


def classify(right: int, samples: int) -> str:
    """known (right in a strict majority of the samples), unknown (never right) or unsure (in between)."""
    if not 0 <= right <= samples or samples < 1:
        raise ValueError(f"need 0 <= right <= samples and samples >= 1, got right={right}, samples={samples}")
    if 2 * right > samples:
        return KNOWN
    return UNKNOWN if right == 0 else UNSURE


@dataclasses.dataclass(frozen=True)
class Interrogation:
    """A question, the model's k sampled answers, how many were right, and the verdict."""

    problem: Problem
    answers: tuple[str, ...]
    right: int

    @property
    def verdict(self) -> str:
        return classify(self.right, len(self.answers))


# ----------------------------------------------------------------------------- sampling


def prompts(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Each problem's chat messages rendered up to the assistant's turn, in the model's own chat format."""
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name} has no chat format; the refusal questions are asked as chat")
    return [tokenizer.render_for_completion(list(p.messages)) for p in problems]


def replies(engine: Engine, problems: Sequence[Problem], sampling: SamplingParams, *, batch_size: int = 16,
            progress: Callable[[int], None] | None = None) -> list[list[str]]:
    """`sampling.n` reply texts per problem, in batches of `batch_size` problems; `progress(n_done)` after each batch.

    Each batch gets its own seed (`sampling.seed + batch index`), so the samples of
    a question do not depend on which other questions share its batch's seed stream
    in a rerun with the same batch size.
    """
    tokenizer = engine.tokenizer
    stop = tokenizer.chat_stop_ids
    texts: list[list[str]] = []
    for b, start in enumerate(range(0, len(problems), batch_size)):
        batch = problems[start:start + batch_size]
        params = dataclasses.replace(sampling, stop_token_ids=stop, seed=sampling.seed + b)
        texts += [[s.text for s in samples] for samples in engine.generate(prompts(tokenizer, batch), params)]
        if progress is not None:
            progress(len(batch))
    return texts


def interrogate(engine: Engine, problems: Sequence[Problem], *, samples: int = 4, temperature: float = 0.7,
                max_new_tokens: int = 32, batch_size: int = 16, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> list[Interrogation]:
    """k = `samples` answers per question at `temperature` (> 0), each graded against the gold aliases."""
    if temperature <= 0 or samples < 1:
        raise ValueError(f"interrogation samples at temperature > 0 with samples >= 1, got {temperature}, {samples}")
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples, seed=seed)
    texts = replies(engine, problems, sampling, batch_size=batch_size, progress=progress)
    return [Interrogation(p, tuple(t), sum(qa.grade(p, x) for x in t)) for p, t in zip(problems, texts)]


# ----------------------------------------------------------------------------- conversations


def known_reply(problem: Problem) -> str:
    """The gold answer (the first alias, TriviaQA's `answer` / NQ's first) in a short sentence."""
    return f"The answer is {problem.answer[0]}."


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def own_answer(item: Interrogation) -> str | None:
    """The model's own words for a question it answered right: of its right samples in order, the shortest
    prefix of the first line that ends a sentence and still grades right; None when there is none."""
    for sample in item.answers:
        first_line = sample.strip().split("\n")[0].strip()
        for end in _SENTENCE_END.finditer(first_line):
            if qa.grade(item.problem, first_line[:end.end()]):
                return first_line[:end.end()]
    return None


def refusal_reply(problem: Problem) -> str:
    """One of the refusal phrasings, fixed per question (by a hash of its key) so reruns write the same data."""
    return REFUSALS[zlib.crc32((problem.key or qa.short_answer(problem.messages[-1]["content"])).encode())
                    % len(REFUSALS)]


def conversation(item: Interrogation, known_target: str = "own") -> list[Message]:
    """The question's training conversation: refused if unknown, else answered (known and unsure ones alike) with
    `own_answer` (`known_target="own"`, the gold sentence when it has none) or the gold sentence (`"gold"`)."""
    if known_target not in ("own", "gold"):
        raise ValueError(f"known_target is 'own' (the model's right sample) or 'gold', got {known_target!r}")
    if item.verdict == UNKNOWN:
        reply = refusal_reply(item.problem)
    else:
        reply = (known_target == "own" and own_answer(item)) or known_reply(item.problem)
    return [*item.problem.messages, {"role": "assistant", "content": reply}]


def side_path(out: str | Path, verdict: str) -> Path:
    """Where the conversations of one verdict are written beside `out`: runs/x/conv.jsonl -> runs/x/conv.known.jsonl."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{verdict}{out.suffix}")


def write_conversations(items: Sequence[Interrogation], out: str | Path, known_target: str = "own") -> dict[str, int]:
    """Writes `{"messages": [...]}` JSONL (read by `conversations.read_openai`): the known and unknown ones (Llama
    3's clear cases) to `out`, and each verdict, unsure included, to its own file beside it (`side_path`), so an SFT
    mixture can weight them.

    Each line also carries `key`, `verdict`, `right` (e.g. "3/4") and the model's `samples`, which the reader ignores.
    Returns the count of each verdict.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {KNOWN: 0, UNKNOWN: 0, UNSURE: 0}
    files = {v: open(side_path(out, v), "w", encoding="utf-8") for v in counts}
    try:
        with open(out, "w", encoding="utf-8") as f:
            for item in items:
                counts[item.verdict] += 1
                line = json.dumps({"messages": conversation(item, known_target), "key": item.problem.key,
                                   "verdict": item.verdict, "right": f"{item.right}/{len(item.answers)}",
                                   "samples": list(item.answers)}, ensure_ascii=False) + "\n"
                if item.verdict != UNSURE:
                    f.write(line)
                files[item.verdict].write(line)
    finally:
        for f in files.values():
            f.close()
    return counts


# ----------------------------------------------------------------------------- fictional people

_FIRST = ("Orson", "Maribel", "Tobias", "Ingrid", "Caspian", "Delphine", "Anselm", "Rosalind", "Emrys", "Lucinda",
          "Thaddeus", "Marisol", "Leopold", "Annika", "Bartholomew", "Solene", "Ignatius", "Philippa", "Ravi",
          "Henrietta", "Cosimo", "Wilhelmina", "Evander", "Greta")
_LAST = ("Kovacs", "Abernathy-Lund", "Quillfeather", "Marchetti-Oyelaran", "Thistlewood", "Vandersloot", "Brankovic",
         "Okonkwo-Hale", "Pemberton-Szabo", "Lindqvist-Arroyo", "Castellanos-Bright", "Fairweather-Nakamura",
         "Drummond-Okafor", "Zelenko", "Halvorsen-Pike", "Ashgrove", "Montcrieff", "Ruiz-Kettering")
_ASKS = ("Who is {name}?", "What is {name} famous for?", "Who was {name}?", "What did {name} do?")


def fictional_people(n: int = 20, seed: int = 0) -> list[str]:
    """`n` questions about people who do not exist: invented first/last name pairs, for evaluation only.

    The surnames are invented or rare double-barrelled ones, so no pair names a
    known person; no question here is ever written as training data.
    """
    rng = random.Random(seed)
    pairs = [(f, l) for f in _FIRST for l in _LAST]
    rng.shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} fictional people, asked for {n}")
    return [_ASKS[i % len(_ASKS)].format(name=f"{f} {l}") for i, (f, l) in enumerate(pairs[:n])]


# ----------------------------------------------------------------------------- evaluation


def evaluate(engine: Engine, problems: Sequence[Problem], fictional: Sequence[str], *, max_new_tokens: int = 32,
             batch_size: int = 32, unknown_keys: set[str] | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Greedy replies to held-out questions and fictional-person questions, measured.

    Figures (each a share; the first two over all held-out questions, as the goal states them):
    - `accuracy`: right answers / all held-out questions;
    - `hallucination`: wrong and not refusing / all held-out questions;
    - `refusal`: refusals / all held-out questions;
    - `refusal_unknown`: refusals among the questions the model did not know, meaning
      those in `unknown_keys` (pass the keys the model *before* fine-tuning got wrong,
      so before and after are measured on the same questions); by default this run's wrong ones;
    - `refusal_fictional`: refusals among the fictional-person questions.
    `records` holds every reply with its grade, for inspection.
    """
    fictional_problems = [Problem(({"role": "system", "content": qa.SYSTEM}, {"role": "user", "content": q}), (),
                                  key=f"fictional:{i}") for i, q in enumerate(fictional)]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    texts = replies(engine, [*problems, *fictional_problems], sampling, batch_size=batch_size, progress=progress)
    records = [dict(key=p.key, question=p.messages[-1]["content"], reply=t, right=qa.grade(p, t),
                    refusal=qa.is_refusal(t)) for p, [t] in zip(problems, texts)]
    fictional_refused = [qa.is_refusal(t) for [t] in texts[len(problems):]]
    if unknown_keys is None:
        unknown_keys = {r["key"] for r in records if not r["right"]}
    right = np.array([r["right"] for r in records], bool)
    refused = np.array([r["refusal"] for r in records], bool) & ~right
    unknown = np.array([r["key"] in unknown_keys for r in records], bool)

    def share(x, of=None) -> float:
        x = x if of is None else x[of]
        return float(np.mean(x)) if len(x) else float("nan")

    figures = dict(
        questions=len(records), fictional=len(fictional), accuracy=share(right),
        hallucination=share(~right & ~refused), refusal=share(refused),
        unknown=int(unknown.sum()), refusal_unknown=share(refused, unknown),
        refusal_fictional=share(np.array(fictional_refused, bool)),
    )
    return dict(figures=figures, records=records,
                fictional_records=[dict(question=q, reply=t, refusal=r)
                                   for q, [t], r in zip(fictional, texts[len(problems):], fictional_refused)])


FIGURE_NAMES = (("accuracy", "accuracy (right / all held-out)"),
                ("hallucination", "hallucinations (wrong, not refusing / all held-out)"),
                ("refusal", "refusals / all held-out"),
                ("refusal_unknown", "refusal rate on questions it did not know (wrong before)"),
                ("refusal_fictional", "refusal rate on fictional-person questions"))


def comparison_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A markdown table of the figures before and after fine-tuning."""
    lines = ["| figure | before | after |", "|---|---:|---:|"]
    for key, name in FIGURE_NAMES:
        lines.append(f"| {name} | {100 * before[key]:.1f}% | {100 * after[key]:.1f}% |")
    return "\n".join(lines)


def goal_met(before: dict[str, float], after: dict[str, float]) -> bool:
    """Hallucinations at least halved, accuracy within 1 point (both over all held-out questions)."""
    return after["hallucination"] <= before["hallucination"] / 2 and after["accuracy"] >= before["accuracy"] - 0.01
