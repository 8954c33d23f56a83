"""Look at tokens, train our BPE, measure compression.

  python -m launch.tokenize --encoding o200k_base --text "Hello, world!"
  python -m launch.tokenize --encoding gpt2 --file notes.txt --html tokens.html
  python -m launch.tokenize --train ../shared/data/pretrain/wikipedia_en.jsonl.gz \
      --vocab-size 32768 --out runs/tokenizer/wiki32k.tiktoken
  python -m launch.tokenize --stats ../shared/data/pretrain/wikinews_en.jsonl.gz \
      --encoding gpt2 --encoding runs/tokenizer/wiki32k.tiktoken

`--encoding` takes a name (gpt2, cl100k_base, o200k_base) or a saved .tiktoken
file. Corpora are .jsonl(.gz) files with a "text" field, or plain .txt(.gz).
Run it with `python -m`: as a script its folder would shadow the stdlib `tokenize`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from launch import cli
from llm.bpe import compression, read_texts, train_bpe
from llm.tokenizer import Tokenizer
from llm.tokenizer_viz import to_ansi, to_html


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.tokenize", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--text", help="visualize the tokens of this text")
    mode.add_argument("--file", type=Path, help="visualize the tokens of this file")
    mode.add_argument("--train", type=Path, metavar="CORPUS", help="train our BPE on a corpus and save it to --out")
    mode.add_argument("--stats", type=Path, metavar="CORPUS", help="bytes per token of each --encoding on a corpus")
    parser.add_argument(
        "--encoding", action="append", help="name or .tiktoken file; repeat for --stats (default o200k_base)"
    )
    parser.add_argument("--html", type=Path, help="write the visualization as HTML here instead of printing it")
    parser.add_argument(
        "--vocab-size", type=int, default=32768, help="--train: vocabulary size, control tokens included"
    )
    parser.add_argument(
        "--out", type=Path, help="--train: where to save the .tiktoken file (a .json sidecar goes beside it)"
    )
    parser.add_argument("--limit", type=int, help="use at most this many documents of the corpus")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    encodings = args.encoding or ["o200k_base"]
    if args.train:
        if args.out is None:
            raise cli.UserError("--train needs --out PATH.tiktoken")
        start = time.perf_counter()
        tok = train_bpe(read_texts(args.train, args.limit), args.vocab_size, name=args.out.stem)
        tok.save(args.out)
        print(f"trained {tok} in {time.perf_counter() - start:.1f}s, saved to {args.out}")
    elif args.stats:
        for spec in encodings:
            stats = compression(Tokenizer.load(spec), read_texts(args.stats, args.limit))
            print(
                f"{spec}: {stats.bytes_per_token:.3f} bytes/token "
                f"({stats.n_bytes:,} bytes, {stats.n_tokens:,} tokens, {stats.n_documents:,} documents)"
            )
    else:
        tok = Tokenizer.load(encodings[0])
        ids = tok.encode(args.text if args.text is not None else args.file.read_text(encoding="utf-8"))
        if args.html:
            args.html.write_text(to_html(tok, ids), encoding="utf-8")
            print(f"wrote {len(ids)} tokens to {args.html}")
        else:
            print(to_ansi(tok, ids))
    return 0


if __name__ == "__main__":
    cli.main(main)
