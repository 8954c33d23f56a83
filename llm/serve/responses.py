"""OpenAI's response and stream-chunk objects, as pure functions of what the engine returned.

Shapes follow the OpenAI API reference: `chat.completion`, `chat.completion.chunk`
(a role delta, content deltas, a last chunk with `finish_reason`, with
`stream_options.include_usage` a final chunk with empty `choices` and the usage),
`text_completion` (also its stream chunks), and the legacy completions `logprobs`
object `{tokens, token_logprobs, top_logprobs, text_offset}`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Sequence

# The engine's "context" (the model's context filled) is OpenAI's "length", as in vLLM and llama.cpp.
FINISH = {"stop": "stop", "length": "length", "context": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(kind: str, rid: str, model: str, created: int | None = None) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model}


def usage(prompts: Sequence[Sequence[int]], completion_tokens: int) -> dict:
    """Prompt tokens count once per prompt however many samples it has (OpenAI's rule for `n`)."""
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_choice(index: int, text: str, finish_reason: str) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": FINISH[finish_reason]}


def chat_chunk(head: dict, index: int, delta: dict, finish_reason: str | None = None,
               with_usage: bool = False) -> dict:
    chunk = {**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason and FINISH[finish_reason]}]}
    return {**chunk, "usage": None} if with_usage else chunk


def completion_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": FINISH[finish_reason]}


def completion_chunk(head: dict, index: int, text: str, finish_reason: str | None = None,
                     with_usage: bool = False) -> dict:
    chunk = {**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                  "finish_reason": finish_reason and FINISH[finish_reason]}]}
    return {**chunk, "usage": None} if with_usage else chunk


def usage_chunk(head: dict, usage_: dict) -> dict:
    return {**head, "choices": [], "usage": usage_}


def sse(data: dict | str) -> str:
    """One server-sent event; the stream ends with `data: [DONE]` (OpenAI's sentinel)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def logprobs_object(tokenizer, tokens: Sequence[int], values: Sequence[float | None],
                    tops: Sequence[Sequence[tuple[int, float]]] | None) -> dict:
    """The legacy completions `logprobs`: each token's text, log-probability, top alternatives and text offset.

    Offsets are in characters of the returned text (which, with `echo`, starts with the prompt's);
    `top_logprobs` is null where nothing predicts the token (the first) or when none were asked for.
    """
    strings = [tokenizer.decode([t]) for t in tokens]
    offsets, data = [], b""
    for t in tokens:
        offsets.append(len(data.decode("utf-8", errors="replace")))
        data += tokenizer.decode_bytes([t])
    top_logprobs = None if tops is None else [
        ({tokenizer.decode([i]): v for i, v in top} if top else None) for top in tops]
    return {"tokens": strings, "token_logprobs": list(values), "top_logprobs": top_logprobs, "text_offset": offsets}
