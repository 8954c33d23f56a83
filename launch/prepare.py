"""Pre-tokenize a dataset into token shards for `make_pipeline` (the llm.c way).

  python -m launch.prepare --source sample --out runs/data/sample_gpt2
  python -m launch.prepare --source fineweb-edu:sample-10BT --max-files 2 --out runs/data/edu10bt_gpt2
  python -m launch.prepare --source 'data/*.parquet' --encoding o200k_base --out runs/data/mine

`--source` takes 'sample' (the bundled FineWeb-schema sample), 'fineweb[-edu][:SUBSET]'
or 'hf:REPO[:SUBSET]' (downloaded from the hub), or local parquet/JSONL files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from launch import cli
from llm.data.prepare import prepare
from llm.tokenizer import Tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="sample, fineweb-edu:sample-10BT, a parquet glob, .jsonl")
    parser.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--encoding", default="gpt2", help="tokenizer name or .tiktoken file (default gpt2)")
    parser.add_argument("--max-files", type=int, help="use at most this many files of the source")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="tokenizer threads")
    args = parser.parse_args(argv)
    cli.writable_dir(args.out, "--out")
    from llm.data.sources import open_source

    manifest = prepare(
        open_source(args.source, max_files=args.max_files),
        Tokenizer.load(args.encoding),
        args.out,
        shard_tokens=args.shard_tokens,
        val_fraction=args.val_fraction,
        threads=args.threads,
    )
    print(json.dumps(manifest["counts"], indent=2))
    return 0


if __name__ == "__main__":
    cli.main(main)
