"""Command-line flags shared by `launch.sample` and `launch.chat`: the model to load and the sampling controls."""

from __future__ import annotations

import argparse
import sys

from llm.generate import SamplingParams
from llm.release import load_release
from llm.serve.stream import TextDeltas


def add_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a release directory, a Hugging Face GPT-2/Llama one, a .gguf file or a GGUF hub id")
    parser.add_argument("--tokenizer", help="an encoding overriding the checkpoint's own (gpt2, o200k_base, x.tiktoken)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)


def load(args: argparse.Namespace):
    """(cfg, params, tokenizer) for --checkpoint."""
    return load_release(args.checkpoint, tokenizer=args.tokenizer)


def sampling_params(args: argparse.Namespace, stop_token_ids: tuple[int, ...], n: int = 1) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop_token_ids=stop_token_ids, stop_strings=tuple(args.stop),
        n=n, seed=args.seed,
    )


class Printer:
    """Streams one sample's text to the terminal as its tokens arrive; `finish` writes what it held back.

    The text is the server's stream (`llm.serve.stream.TextDeltas`): whole characters only,
    no stop tokens, and nothing from a stop string on (text that may begin one waits until
    the sample goes on or ends).
    """

    def __init__(self, tokenizer, hide: tuple[int, ...] = (), stop_strings: tuple[str, ...] = ()):
        self.deltas = TextDeltas(tokenizer, stop_strings, frozenset(hide))

    def __call__(self, prompt_index: int, sample_index: int, token: int) -> None:
        self._write(self.deltas.push(token))

    def finish(self, text: str) -> None:
        """Writes the rest of the sample's final text (`Sample.text`, which the shown text begins)."""
        self._write(self.deltas.finish(text))

    @staticmethod
    def _write(delta: str) -> None:
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
