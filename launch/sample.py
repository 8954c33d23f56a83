"""Continue a document with a base model.

    python -m launch.sample --checkpoint runs/tiny/release --prompt "The history of" [--n 3 --temperature 0.8 ...]

The prompt is encoded as ordinary text after the tokenizer's document start
(`<|endoftext|>`, the boundary the model was trained with); sampling stops at
its document end.
"""

import argparse

from launch import sampling_flags
from llm.generate import Engine


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Continue a document with a base model.")
    sampling_flags.add_arguments(parser, max_new_tokens=128)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--n", type=int, default=1, help="samples of the prompt")
    args = parser.parse_args(argv)
    cfg, params, tokenizer = sampling_flags.load(args)
    engine = Engine(cfg, params, tokenizer)
    prompt = [*tokenizer.document_start, *tokenizer.encode(args.prompt)]
    sampling = sampling_flags.sampling_params(args, stop_token_ids=(tokenizer.eot,), n=args.n)
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
    main()
