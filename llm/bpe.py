"""Our BPE: training it with rustbpe, reading the corpora it is trained on, and measuring compression.

    tok = train_bpe(read_texts("wiki.jsonl.gz"), 32768)
    tok.save("runs/tokenizer/wiki32k.tiktoken")           # a rank file + JSON sidecar; loading needs tiktoken only
    compression(tok, read_texts("wikinews.jsonl.gz")).bytes_per_token

The trained merges become a tiktoken rank file, so our BPE encodes with the
same code as OpenAI's encodings; the control tokens take the last ids.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from llm.encodings import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, build_encoding
from llm.tokenizer import Tokenizer


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    name: str = "bpe",
    pattern: str = GPT4_SPLIT_PATTERN,
    progress: bool = True,
) -> Tokenizer:
    """Trains a byte-level BPE with rustbpe; `vocab_size` includes the control tokens, which take the last ids."""
    import rustbpe  # only training needs it: loading a trained tokenizer needs tiktoken alone

    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks <= 256:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no merges: it must exceed 256 bytes + {len(SPECIAL_TOKENS)} control tokens"
        )
    bpe = rustbpe.Tokenizer()
    texts = tqdm(texts, desc=f"bpe {name}: reading", unit=" docs", disable=not progress)
    bpe.train_from_iterator(texts, vocab_size=n_ranks, pattern=pattern)
    if bpe.vocab_size < n_ranks:  # rustbpe stops quietly when no pair repeats
        raise ValueError(
            f"the corpus supports only {bpe.vocab_size - 256} merges, {n_ranks - 256} asked: give more text or a smaller vocab_size"
        )
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    return Tokenizer(build_encoding(name, bpe.get_pattern(), ranks, {}))


# ----------------------------------------------------------------------------- corpora and compression


def read_texts(path: str | os.PathLike, limit: int | None = None, field: str = "text") -> Iterator[str]:
    """Documents of a corpus: `field` of each `.jsonl`/`.jsonl.gz` record, or a whole `.txt`/`.txt.gz` file as one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path}")
    kind = path.with_suffix("").suffix if path.suffix == ".gz" else path.suffix
    if kind not in (".jsonl", ".txt"):
        raise ValueError(f"{path}: expected a .jsonl, .jsonl.gz, .txt or .txt.gz corpus")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        documents = (f.read(),) if kind == ".txt" else (json.loads(line)[field] for line in f)
        yield from itertools.islice(documents, limit)


@dataclasses.dataclass(frozen=True)
class Compression:
    """How many UTF-8 bytes of a corpus one token carries."""

    n_documents: int
    n_bytes: int
    n_tokens: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)


def compression(tok: Tokenizer, texts: Iterable[str], *, num_threads: int = 8, batch_size: int = 1024) -> Compression:
    """Bytes per token of `tok` over a corpus, streamed in batches."""
    n_documents = n_bytes = n_tokens = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        n_documents += len(batch)
        # JSON can escape lone surrogates; tiktoken reads each as U+FFFD, also three bytes.
        n_bytes += sum(len(text.encode("utf-8", errors="surrogatepass")) for text in batch)
        n_tokens += sum(map(len, tok.encode_batch(batch, num_threads=num_threads)))
    return Compression(n_documents, n_bytes, n_tokens)
