"""Generative evaluation: n sampled completions per `Problem` through the engine, graded, reported as pass@k.

    result = evaluate(engine, problems, gsm8k.grade, chat=True, n=4, ks=(1, 4), temperature=0.8)
    result.summary()   # {"pass@1": ..., "pass@4": ..., "problems": ..., "truncated": ...}

Chat: the problem's messages rendered with the model's chat format and an open
assistant turn; sampling stops at the end of the turn (or document). Tools: the
engine is built by the caller (`engine_for` gives one with the calculator when the
tokenizer has its tokens), so tool calls run as in chat. Base: the tokenizer's
document start, then the problem's plain text; sampling stops at a blank line or
the next "Question:" (`stop_strings`).

pass@k is the unbiased estimator of Chen et al. (2021) over the n samples
(`llm/evals/passk.py`). A prompt longer than the model's context minus
`max_new_tokens` keeps its last tokens (truncated from the left) and is counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from llm.evals.passk import mean_pass_at_k
from llm.generate import Engine, SamplingParams
from llm.tasks import Problem
from llm.tools import Calculator


@dataclasses.dataclass(frozen=True)
class Graded:
    """One problem's completions and whether each is right."""

    key: str
    completions: tuple[str, ...]
    correct: tuple[bool, ...]
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class GenerativeResult:
    graded: tuple[Graded, ...]
    n: int
    ks: tuple[int, ...]

    def summary(self) -> dict[str, float | int]:
        counts = [sum(g.correct) for g in self.graded]
        figures: dict[str, float | int] = {f"pass@{k}": mean_pass_at_k(counts, self.n, k) for k in self.ks}
        figures.update(problems=len(self.graded), samples=self.n, truncated=sum(g.truncated for g in self.graded))
        return figures


def engine_for(cfg, params, tokenizer, tools: bool = True) -> Engine:
    """An engine over the model with the calculator tool when asked and the tokenizer has its tokens."""
    use = tools and tokenizer.has_tool("python")
    return Engine(cfg, params, tokenizer, tools={"python": Calculator()} if use else None)


def prompt_ids(tokenizer, problem: Problem, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.render_for_completion(problem.messages))
    if not problem.text:
        raise ValueError(f"problem {problem.key!r} has no plain text for a base model; evaluate it with chat=True")
    return [*tokenizer.document_start, *tokenizer.encode(problem.text)]


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
    on_progress: Callable[[int], None] | None = None,
) -> GenerativeResult:
    """Samples `n` completions of every problem (`batch_size` problems per engine call) and grades them."""
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
                                  stop_token_ids=stop_ids, stop_strings=tuple(stop_strings), n=n, seed=seed + start)
        samples = engine.generate([ids[-room:] for ids in prompts], sampling)
        for problem, ids, problem_samples in zip(chunk, prompts, samples):
            texts = tuple(s.text for s in problem_samples)
            graded.append(Graded(problem.key, texts, tuple(bool(grade(problem, t)) for t in texts), len(ids) > room))
        if on_progress is not None:
            on_progress(len(chunk))
    return GenerativeResult(tuple(graded), n, ks)
