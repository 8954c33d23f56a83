"""Tokenizer benchmark: our rustbpe-trained BPE and tiktoken against Hugging Face `tokenizers`.

  nice -n 10 python -m bench.bench_tokenizer [--data-dir ../shared/data] [--save runs/tokenizer/wiki32k.tiktoken]

One run, side by side on the same text:
1. BPE training time at the same vocabulary size on English Wikipedia: rustbpe
   against `tokenizers`' BpeTrainer, both byte-level with GPT-4's split pattern,
   the same number of merges, and all cores.
2. Compression (bytes per token) on held-out English Wikinews: both trained BPEs,
   gpt2, cl100k_base and o200k_base. Our BPE should be within 5% of gpt2 or better.
3. Encode throughput (MB/s of UTF-8) at 1 and 2 threads, GPT-2's vocabulary,
   after checking that both libraries give the same ids: our `Tokenizer.encode_batch`
   (tiktoken in chunks per thread), tiktoken's own `encode_ordinary_batch` (one
   task per text) and `tokenizers`' `encode_batch_fast`. `tokenizers` sizes its
   thread pool once per process, so each of its runs happens in a fresh process
   with RAYON_NUM_THREADS set.

Reads `pretrain/` of the shared data folder, which a fresh clone lacks: then it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from llm.bpe import compression, read_texts, train_bpe
from llm.encodings import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, load_rank_file
from llm.tokenizer import Tokenizer

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as in its encoder.py."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge made `token`: BPE over its bytes using only lower ranks stops at two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def hf_gpt2(rank_file: Path) -> tokenizers.Tokenizer:
    """GPT-2 in `tokenizers`, configured as Hugging Face's gpt2 tokenizer.json (byte-level BPE), from tiktoken's ranks."""
    ranks = load_rank_file(rank_file)
    char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    ordered = sorted(ranks, key=ranks.get)
    merges = [tuple(map(text, _merge_parts(ranks, token))) for token in ordered if len(token) > 1]
    tok = tokenizers.Tokenizer(models.BPE({text(t): ranks[t] for t in ordered}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own split regex
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_train_bpe(texts: Sequence[str], n_merged: int) -> tokenizers.Tokenizer:
    """The `tokenizers` counterpart of train_bpe: byte-level, GPT-4 split, `n_merged` tokens in all."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_merged, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _hf_encode_worker(tokenizer_json: str, texts: list[str], threads: int) -> float:
    """Runs in a fresh process: `tokenizers` sizes its thread pool from RAYON_NUM_THREADS on first use."""
    os.environ.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    tok.encode_batch_fast(texts[:100])  # warm up: the first call starts the thread pool
    return _seconds(functools.partial(tok.encode_batch_fast, texts))


def hf_encode_seconds(tokenizer_json: str, texts: list[str], threads: int) -> float:
    """Time of `tokenizers`' batch encode on `threads` threads."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_hf_encode_worker, tokenizer_json, texts, threads).result()


def _take_mb(texts: Iterable[str], megabytes: float) -> list[str]:
    """The first documents that add up to `megabytes` of UTF-8."""
    out, size = [], 0
    for text in texts:
        if size >= megabytes * 1e6:
            break
        out.append(text)
        size += len(text.encode())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--train-docs", type=int, help="train on the first N Wikipedia articles (default all)")
    parser.add_argument("--encode-mb", type=float, default=10.0, help="MB of Wikinews for the throughput runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--save", type=Path, help="save our trained BPE here (.tiktoken)")
    args = parser.parse_args(argv)

    wikipedia, wikinews = (
        args.data_dir / "pretrain" / "wikipedia_en.jsonl.gz",
        args.data_dir / "pretrain" / "wikinews_en.jsonl.gz",
    )
    if not (wikipedia.is_file() and wikinews.is_file()):
        print(f"SKIP: the shared data ({wikipedia} and {wikinews}) is absent; pass --data-dir.")
        return 0
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}"
    )

    train_texts = list(read_texts(wikipedia, args.train_docs))
    held_out = list(read_texts(wikinews))
    train_mb = sum(len(t.encode()) for t in train_texts) / 1e6
    n_merged = args.vocab_size - len(SPECIAL_TOKENS)

    print(f"\n## BPE training: {len(train_texts):,} Wikipedia articles, {train_mb:.1f} MB, vocab {args.vocab_size:,}")
    start = time.perf_counter()
    ours = train_bpe(train_texts, args.vocab_size, name="wiki32k", progress=False)
    rustbpe_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = hf_train_bpe(train_texts, n_merged)
    hf_train_s = time.perf_counter() - start
    print("| trainer | seconds | tokens learned (excl. control) |\n|---|---|---|")
    print(f"| rustbpe (ours) | {rustbpe_s:.1f} | {n_merged:,} |")
    print(f"| tokenizers BpeTrainer | {hf_train_s:.1f} | {theirs.get_vocab_size():,} |")
    if args.save:
        ours.save(args.save)
        print(f"saved ours to {args.save}")

    held_mb = sum(len(t.encode()) for t in held_out) / 1e6
    print(f"\n## Compression on held-out Wikinews: {len(held_out):,} articles, {held_mb:.1f} MB")
    named = {name: Tokenizer.load(name) for name in ("gpt2", "cl100k_base", "o200k_base")}
    rows = {"ours (rustbpe, 32k, Wikipedia)": compression(ours, held_out).bytes_per_token}
    n_hf = sum(len(e.ids) for e in theirs.encode_batch_fast(held_out))
    rows["tokenizers BpeTrainer (32k, Wikipedia)"] = held_mb * 1e6 / n_hf
    rows |= {name: compression(tok, held_out).bytes_per_token for name, tok in named.items()}
    print("| encoding | learned tokens | bytes/token |\n|---|---|---|")
    learned = [len(tok.encoding._mergeable_ranks) for tok in (ours, *named.values())]
    for (name, bpt), vocab in zip(rows.items(), [learned[0], theirs.get_vocab_size(), *learned[1:]]):
        print(f"| {name} | {vocab:,} | {bpt:.3f} |")
    ratio = rows["ours (rustbpe, 32k, Wikipedia)"] / rows["gpt2"]
    print(f"ours / gpt2 = {ratio:.3f} ({'within 5% or better' if ratio >= 0.95 else 'MORE THAN 5% WORSE'})")

    texts = _take_mb(held_out, args.encode_mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(
        f"\n## Encode throughput, GPT-2 vocabulary: {len(texts):,} Wikinews articles, {mb:.1f} MB, best of {args.repeats} interleaved rounds"
    )
    gpt2 = named["gpt2"]
    hf = hf_gpt2(Path(__file__).resolve().parents[1] / "llm" / "assets" / "tiktoken" / "r50k_base.tiktoken")
    mismatches = sum(a != e.ids for a, e in zip(gpt2.encode_batch(texts), hf.encode_batch_fast(texts)))
    if mismatches:
        print(f"WARNING: tiktoken and tokenizers disagree on {mismatches} of {len(texts)} documents")
    # Rounds interleave every library and thread count, and each keeps its fastest round:
    # on a shared machine that compares them under the same, least disturbed, conditions.
    best: dict[tuple[str, int], float] = collections.defaultdict(lambda: float("inf"))
    hf_json = hf.to_str()
    for _ in range(args.repeats):
        for threads in (1, 2):
            for name, encode_batch in (("ours", gpt2.encode_batch), ("tiktoken", gpt2.encoding.encode_ordinary_batch)):
                seconds = _seconds(functools.partial(encode_batch, texts, num_threads=threads))
                best[name, threads] = min(best[name, threads], seconds)
            best["tokenizers", threads] = min(best["tokenizers", threads], hf_encode_seconds(hf_json, texts, threads))
    print(
        "| threads | ours: Tokenizer.encode_batch (tiktoken) | tiktoken encode_ordinary_batch | tokenizers encode_batch_fast |"
    )
    print("|---|---|---|---|")
    for threads in (1, 2):
        print(
            f"| {threads} | "
            + " | ".join(f"{mb / best[name, threads]:.2f} MB/s" for name in ("ours", "tiktoken", "tokenizers"))
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
