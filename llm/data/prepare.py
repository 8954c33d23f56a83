"""Pre-tokenize a text source into llm.c-format token shards that `make_pipeline` reads directly.

For runs where tokenizing on the fly would cost more CPU than the hosts have:
documents are tokenized once, in the source's order, each preceded by
`Tokenizer.document_start`, split into train and validation by the same document hash as
the on-the-fly pipeline, and written as shards of about `shard_tokens` tokens.
The manifest is written last, so a folder with a manifest is complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llm.data import sources as sources_lib
from llm.data.sources import MANIFEST, Chunk, Source
from llm.tokenizer import Tokenizer


def _tokenize_chunk(source: Source, tokenizer: Tokenizer, chunk: Chunk, val_fraction: float):
    """A chunk -> (train tokens, validation tokens, counts), documents preceded by `Tokenizer.document_start`."""
    rows = source.read(chunk)
    in_validation = sources_lib.validation_mask(rows.keys, val_fraction)
    streams = {}
    for split, wanted in (("train", False), ("validation", True)):
        texts = [t for t, v in zip(rows.texts, in_validation) if v == wanted]
        ids = [[*tokenizer.document_start, *doc] for doc in tokenizer.encode_batch(texts, num_threads=1)]
        streams[split] = np.fromiter((i for doc in ids for i in doc), np.int32)
    counts = collections.Counter(
        documents=len(rows.texts), empty=rows.n_empty, undecodable=rows.n_undecodable, unreadable=rows.n_unreadable
    )
    return streams, counts


def prepare(
    source: str | Source,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 100_000_000,
    val_fraction: float = 0.01,
    threads: int = os.cpu_count() or 1,
    progress: bool = True,
) -> dict:
    """Tokenizes `source` into `out_dir/{train,validation}_NNNNNN.bin` and a manifest; returns the manifest."""
    source = sources_lib.open_source(source)
    if isinstance(source, sources_lib.TokenShardSource):
        raise ValueError(f"{source.directory} is already tokenized")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = source.chunks()
    buffers = {"train": [], "validation": []}
    shards = {"train": [], "validation": []}
    counts = collections.Counter()

    def flush(split: str, final: bool = False) -> None:
        if not buffers[split] or (not final and sum(map(len, buffers[split])) < shard_tokens):
            return
        name = f"{split}_{len(shards[split]):06d}.bin"
        sources_lib.write_token_shard(out_dir / name, np.concatenate(buffers[split]))
        shards[split].append(name)
        buffers[split] = []

    bar = tqdm(
        total=sum(c.num_rows for c in chunks), unit=" docs", desc=f"prepare {out_dir.name}", disable=not progress
    )
    # Threads tokenize chunks concurrently (tiktoken releases the GIL); map keeps the source's order.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for chunk, (streams, chunk_counts) in zip(
            chunks, pool.map(lambda c: _tokenize_chunk(source, tokenizer, c, val_fraction), chunks)
        ):
            counts.update(chunk_counts)
            for split, tokens in streams.items():
                buffers[split].append(tokens)
                counts[f"{split}_tokens"] += len(tokens)
                flush(split)
            bar.update(chunk.num_rows)
            bar.set_postfix(tokens=f"{counts['train_tokens'] + counts['validation_tokens']:,}")
    bar.close()
    for split in buffers:
        flush(split, final=True)
    manifest = {
        "tokenizer": tokenizer.name,
        "source": str(source),
        "val_fraction": val_fraction,
        "splits": shards,
        "counts": dict(counts),
    }
    tmp = out_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out_dir / MANIFEST)
    return manifest
