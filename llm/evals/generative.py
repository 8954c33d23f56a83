"""Generative evaluation: n sampled completions per `Problem` through the engine, graded, reported as pass@k.

    result = evaluate(engine, problems, gsm8k.grade, chat=True, n=4, ks=(1, 4), temperature=0.8)
    result.summary()   # {"pass@1": ..., "pass@4": ..., "problems": ..., "truncated": ...}

Chat: the problem's messages rendered with the model's chat format and an open
assistant turn; sampling stops at the end of the turn (or document). Tools: the
engine is built by the caller (`llm.generate.engine_for` gives one with the calculator when the
tokenizer has its tokens), so tool calls run as in chat. Base: the model's own
prompt start (`Tokenizer.prompt_start`), then the problem's plain text; sampling stops at a blank line or
the next "Question:" (`stop_strings`).

pass@k is the unbiased estimator of Chen et al. (2021) over the n samples
(`llm/evals/passk.py`). A prompt longer than the model's context minus
`max_new_tokens` keeps its last tokens (truncated from the left) and is counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from llm.evals.passk import mean_pass_at_k, pass_at_k
from llm.generate import Engine, SamplingParams
from llm.tasks import Problem


@dataclasses.dataclass(frozen=True)
class Graded:
    """One problem's completions, whether each is right, and each one's length in tokens."""

    key: str
    completions: tuple[str, ...]
    correct: tuple[bool, ...]
    truncated: bool = False  # the prompt lost its first tokens to fit the context
    lengths: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerativeResult:
    graded: tuple[Graded, ...]
    n: int
    ks: tuple[int, ...]

    def summary(self, intervals: bool = False) -> dict[str, float | int]:
        """pass@k for each k, the counts; with `intervals`, each pass@k's 95% half-interval (`pass@k_ci95`, over
        problems) and the mean completion length (`completion_len`)."""
        counts = [sum(g.correct) for g in self.graded]
        figures: dict[str, float | int] = {}
        for k in self.ks:
            figures[f"pass@{k}"] = mean_pass_at_k(counts, self.n, k)
            if intervals:
                figures[f"pass@{k}_ci95"] = _interval([pass_at_k(self.n, c, k) for c in counts])
        if intervals:
            figures["completion_len"] = float(np.mean([n for g in self.graded for n in g.lengths]))
        figures.update(problems=len(self.graded), samples=self.n, truncated=sum(g.truncated for g in self.graded))
        return figures


def _interval(values: list[float]) -> float:
    """Half-width of the normal 95% interval of the mean of per-problem scores."""
    return float(1.96 * np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def prompt_ids(tokenizer, problem: Problem, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.render_for_completion(problem.messages))
    if not problem.text:
        raise ValueError(f"problem {problem.key!r} has no plain text for a base model; evaluate it with chat=True")
    return [*tokenizer.prompt_start, *tokenizer.encode(problem.text)]


def evaluate(
    engine: Engine,
    problems: Sequence[Problem],
    grade: Callable[[Problem, str], bool],
    *,
    chat: bool = True,
    n: int = 1,
    ks: Sequence[int] = (1,),
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    batch_size: int = 8,
    seed: int = 0,
    require_stop: bool = False,
    batch_seeds: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> GenerativeResult:
    """Samples `n` completions of every problem (`batch_size` problems per engine call) and grades them; with
    `require_stop`, a completion cut at `max_new_tokens` (it did not end its turn or document) is wrong. Each
    engine call samples with `seed` plus the index of its first problem; `batch_seeds=False` gives every call
    `seed` itself (the streams GRPO's held-out figures were measured with)."""
    ks = tuple(ks)
    if any(k > n for k in ks):
        raise ValueError(f"pass@k needs k <= n samples per problem, got ks={ks} with n={n}")
    tokenizer = engine.tokenizer
    stop_ids = tokenizer.chat_stop_ids if chat else (tokenizer.eot,)
    room = engine.cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {engine.cfg.max_seq_len}")
    graded = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, p, chat) for p in chunk]
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  stop_token_ids=stop_ids, stop_strings=tuple(stop_strings), n=n,
                                  seed=seed + start if batch_seeds else seed)
        samples = engine.generate([ids[-room:] for ids in prompts], sampling)
        for problem, ids, problem_samples in zip(chunk, prompts, samples):
            correct = tuple(bool(grade(problem, s.text)) and (s.finish_reason == "stop" or not require_stop)
                            for s in problem_samples)
            graded.append(Graded(problem.key, tuple(s.text for s in problem_samples), correct, len(ids) > room,
                                 tuple(len(s.tokens) for s in problem_samples)))
        if on_progress is not None:
            on_progress(len(chunk))
    return GenerativeResult(tuple(graded), n, ks)
