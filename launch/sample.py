"""Continue a document with a base model.

    python -m launch.sample --checkpoint runs/tiny/release --prompt "The history of" [--n 3 --temperature 0.8 ...]

The prompt is encoded as ordinary text after what the model's own rule puts
first (`Tokenizer.prompt_start`: `<|endoftext|>` for ours, the boundary it was
trained with; nothing for SmolLM2, whose files add no BOS); sampling stops at its
document end.
"""

import argparse

from launch import cli, sampling_flags
from llm.generate import Engine
from llm.tokenizer import Tokenizer


def prompt_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a base-model prompt: the model's own start (`Tokenizer.prompt_start`), then `text` as ordinary text."""
    return [*tokenizer.prompt_start, *tokenizer.encode(text)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Continue a document with a base model.")
    sampling_flags.add_arguments(parser, max_new_tokens=128)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--n", type=int, default=1, help="samples of the prompt")
    args = parser.parse_args(argv)
    cfg, params, tokenizer = sampling_flags.load(args)
    prompt = prompt_tokens(tokenizer, args.prompt)
    if not prompt:
        parser.error(f"{tokenizer.name} starts prompts with no token (its model adds no BOS): give a non-empty --prompt")
    if len(prompt) >= cfg.max_seq_len:
        raise cli.UserError(f"--prompt is {len(prompt)} tokens and the model's context {cfg.max_seq_len}: shorten it")
    with cli.user_input():  # only checks the sampling flags
        sampling = sampling_flags.sampling_params(args, stop_token_ids=(tokenizer.eot,), n=args.n)
    engine = Engine(cfg, params, tokenizer)
    stream = None
    if args.n == 1:
        stream = sampling_flags.Printer(tokenizer, hide=sampling.stop_token_ids, stop_strings=sampling.stop_strings)
        print(args.prompt, end="", flush=True)
    [samples] = engine.generate([prompt], sampling, on_token=stream)
    for i, sample in enumerate(samples):
        if stream:
            stream.finish(sample.text)
        else:
            print(f"--- sample {i + 1}/{len(samples)}\n{args.prompt}{sample.text}", end="")
        print(f"\n[{sample.finish_reason}, {len(sample.tokens)} tokens]")


if __name__ == "__main__":
    cli.main(main)
