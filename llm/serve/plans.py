"""From a request to what the worker runs: the prompts as token ids, checked, and the engine's controls.

Prompt rules follow the OpenAI API reference (four prompt shapes for completions; a
prompt must leave room in the context) and the project's own: text prompts start
under the model's BOS rule as `launch.sample.prompt_tokens` does, user text is never
encoded into control tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llm.generate import Sample, SamplingParams
from llm.serve.protocol import APIError
from llm.serve.stream import final_text, tool_display
from llm.serve.worker import Job


@dataclasses.dataclass
class Served:
    """What the worker loaded: the model, its tokenizer, the engine, and the tools the engine runs."""

    name: str
    cfg: Any
    params: Any
    tokenizer: Any
    engine: Any
    tools: tuple[str, ...]


@dataclasses.dataclass
class Plan:
    """One generation request, ready for the worker: prompts, controls, how its text is shown."""

    prompts: list[list[int]]
    sampling: SamplingParams | None  # None: nothing to generate (max_tokens=0)
    hide: frozenset[int]
    shown: dict[int, str]
    n: int = 1
    seeded: bool = True

    def job(self, loop) -> Job:
        return Job(loop, self.prompts, self.sampling, seeded=self.seeded)

    def text(self, tokenizer, sample: Sample) -> str:
        return final_text(tokenizer, sample.tokens, self.sampling.stop_strings if self.sampling else (),
                          self.hide, self.shown)


def make_plan(s: Served, body, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...],
              max_rows: int) -> Plan:
    """The engine's controls from a request; a control the engine refuses is a 400."""
    hide = frozenset(stop_ids)
    shown = tool_display(s.tokenizer, s.tools)
    stops = body.stop_strings()
    if body.n > max_rows:  # a request of many prompts runs as one batch of its own instead
        raise APIError(400, f"n={body.n} is more than the {max_rows} samples this server runs at once (--max-slots)",
                       "n")
    if max_new_tokens == 0:
        return Plan(prompts, None, hide, shown, body.n)
    try:
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, stop_token_ids=stop_ids, stop_strings=stops, n=body.n,
            seed=body.seed or 0)
    except ValueError as error:
        raise APIError(400, str(error)) from None
    return Plan(prompts, sampling, hide, shown, body.n, seeded=body.seed is not None)


def completion_prompts(s: Served, prompt) -> list[list[int]]:
    """OpenAI's four prompt shapes as token-id lists; text starts under the model's own rule, as `launch.sample`."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    ids = [[*s.tokenizer.prompt_start, *s.tokenizer.encode(p)] if isinstance(p, str) else list(p) for p in prompt]
    for p in ids:
        if not p:
            raise APIError(400, "a prompt is empty (this model starts prompts with no token)", "prompt")
        check_ids(s, p, "prompt")
    return ids


def check_ids(s: Served, ids, param: str) -> None:
    limit = min(s.cfg.vocab_size, s.tokenizer.n_vocab)
    bad = [t for t in ids if not 0 <= t < limit]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {limit} ids", param)


def check_prompt(s: Served, prompt: list[int], param: str, scoring_only: bool = False) -> None:
    """A prompt must leave room for one new token (or, only scored, fit the context)."""
    room = s.cfg.max_seq_len + (1 if scoring_only else 0)
    if len(prompt) >= room:
        raise APIError(400, f"the prompt has {len(prompt)} tokens but the model's context is {s.cfg.max_seq_len}",
                       param, "context_length_exceeded")


def tokenize_text(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Ordinary text; a prompt that is exactly one special token is that token (how lm-eval finds the EOS id)."""
    if text in tokenizer.encoding.special_tokens_set:
        return [tokenizer.token_id(text)]
    return [*(tokenizer.prompt_start if add_special_tokens else []), *tokenizer.encode(text)]
