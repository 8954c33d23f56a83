"""Where pretraining text comes from: FineWeb on the hub, local parquet or JSONL, the bundled sample, token shards.

A source is a list of `Chunk`s (a parquet row group, or a block of JSONL lines)
and a `read(chunk) -> Rows` function. Chunks are the unit the pipeline shuffles
and splits across processes and workers, so reading one must be cheap and
independent of the others. Bad input fails when the source is opened, with an
error naming the file (missing `text` column, not parquet, wrong type); rows
that cannot be used (empty, not UTF-8, not JSON) are dropped and counted when
they are read, so a bad row never stops an epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm.data.hub import hub_dataset_files
from llm.errors import DataError

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).parents[1] / "assets" / "fineweb_sample"
# HuggingFaceFW/fineweb's columns; fineweb-edu adds `score` and `int_score`.
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")
HUB_ALIASES = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
JSONL_BLOCK_ROWS = 1024
LARGE_ROW_GROUP_ROWS = 100_000  # beyond this one row group is a poor shuffle and memory unit


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One unit of reading: parquet row group `index` of `path`, or block `index` of a JSONL file's lines."""

    path: str
    index: int
    num_rows: int


@dataclasses.dataclass
class Rows:
    """The usable documents of a chunk, a stable key per document (for the split), and what was dropped."""

    texts: list[str]
    keys: list[str]
    n_empty: int = 0
    n_undecodable: int = 0
    n_unreadable: int = 0  # rows of a chunk whose bytes could not be read at all


def validation_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """True for documents in the validation split: a CRC32 of the document's key below `fraction` of 2**32."""
    # A hash of the document, not its position, so the split survives reordering,
    # resharding and a different number of processes or workers.
    threshold = int(fraction * 2**32)
    return np.fromiter((zlib.crc32(k.encode("utf-8", "surrogatepass")) < threshold for k in keys), bool, len(keys))


def training_texts(source: Source, val_fraction: float) -> Iterator[str]:
    """The texts of the training split, in file order (for training a tokenizer)."""
    for chunk in source.chunks():
        rows = source.read(chunk)
        for text, held_out in zip(rows.texts, validation_mask(rows.keys, val_fraction)):
            if not held_out:
                yield text


def _decode(values: list[bytes | None]) -> tuple[list[str], list[int], int, int]:
    """Texts and their row numbers, dropping empty and non-UTF-8 values; returns the two drop counts too."""
    texts, rows, n_empty, n_undecodable = [], [], 0, 0
    for row, value in enumerate(values):
        if value is None or not value.strip():
            n_empty += 1
            continue
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            n_undecodable += 1
            continue
        rows.append(row)
    return texts, rows, n_empty, n_undecodable


# ----------------------------------------------------------------------------- parquet


@dataclasses.dataclass(frozen=True)
class ParquetSource:
    """Parquet files with a string `text` column (FineWeb's schema or any superset of `text`)."""

    paths: tuple[str, ...]
    text_column: str = "text"
    key_column: str = "id"  # FineWeb's document id; files without it are keyed by file, row group and row

    def chunks(self) -> list[Chunk]:
        """Every row group of every file, checking each file's schema first."""
        return [chunk for path in self.paths for chunk in _parquet_chunks(path, self.text_column)]

    def read(self, chunk: Chunk) -> Rows:
        """The documents of one row group; a row group that fails to read is logged and counted, not raised."""
        try:
            parquet = pq.ParquetFile(chunk.path)
            columns = [c for c in (self.text_column, self.key_column) if c in parquet.schema_arrow.names]
            table = parquet.read_row_group(chunk.index, columns=columns)
            # Read as bytes: a parquet writer that did not validate UTF-8 must not crash us.
            values = table.column(self.text_column).cast(pa.binary()).to_pylist()
        except (OSError, pa.ArrowException) as e:
            log.warning("skipping row group %d of %s (%d rows): %s", chunk.index, chunk.path, chunk.num_rows, e)
            return Rows([], [], n_unreadable=chunk.num_rows)
        texts, rows, n_empty, n_undecodable = _decode(values)
        if self.key_column in table.column_names:
            ids = table.column(self.key_column).to_pylist()
            keys = [ids[r] or f"{Path(chunk.path).name}:{chunk.index}:{r}" for r in rows]
        else:
            keys = [f"{Path(chunk.path).name}:{chunk.index}:{r}" for r in rows]
        if n_empty or n_undecodable:
            log.info(
                "%s row group %d: dropped %d empty, %d non-UTF-8 rows", chunk.path, chunk.index, n_empty, n_undecodable
            )
        return Rows(texts, keys, n_empty, n_undecodable)


def _parquet_chunks(path: str, text_column: str) -> list[Chunk]:
    """The row groups of one file, or a DataError naming the file."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise DataError(f"{path}: no {text_column!r} column; its columns are {schema.names}")
    kind = schema.field(text_column).type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise DataError(f"{path}: column {text_column!r} holds {kind}, not text")
    meta = parquet.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if sizes and max(sizes) > LARGE_ROW_GROUP_ROWS:
        log.warning(
            "%s has row groups of up to %d rows: each is read whole; rewrite it with smaller row groups "
            "or pre-tokenize it with `python -m launch.prepare`",
            path,
            max(sizes),
        )
    return [Chunk(path, i, n) for i, n in enumerate(sizes) if n]


# ----------------------------------------------------------------------------- JSONL


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """`.jsonl` or `.jsonl.gz` files, one JSON object with a text `field` per line; each process holds them in memory."""

    paths: tuple[str, ...]
    field: str = "text"
    block_rows: int = JSONL_BLOCK_ROWS

    def chunks(self) -> list[Chunk]:
        """Blocks of `block_rows` lines."""
        chunks = []
        for path in self.paths:
            n = len(_jsonl_lines(path))
            chunks += [
                Chunk(path, i, min(self.block_rows, n - start)) for i, start in enumerate(range(0, n, self.block_rows))
            ]
        return chunks

    def read(self, chunk: Chunk) -> Rows:
        """The documents of one block of lines; lines that are not JSON objects with a text field count as undecodable."""
        start = chunk.index * self.block_rows
        lines = _jsonl_lines(chunk.path)[start : start + chunk.num_rows]
        values: list[bytes | None] = []
        numbers = []  # line number of each value, the document's key
        n_bad = 0
        for number, line in enumerate(lines, start + 1):
            try:
                text = json.loads(line)[self.field]
                if not isinstance(text, str):
                    raise TypeError(f"{self.field!r} is {type(text).__name__}")
                # JSON may escape lone surrogates, which are not text either.
                values.append(text.encode("utf-8"))
                numbers.append(number)
            except (ValueError, KeyError, TypeError) as e:  # UnicodeError is a ValueError
                log.info(
                    "%s:%d: dropped, not a JSON object with a text %r field (%s)", chunk.path, number, self.field, e
                )
                n_bad += 1
        texts, rows, n_empty, n_undecodable = _decode(values)
        keys = [f"{Path(chunk.path).name}:{numbers[r]}" for r in rows]
        return Rows(texts, keys, n_empty, n_undecodable + n_bad)


@functools.lru_cache(maxsize=4)
def _jsonl_lines(path: str) -> list[bytes]:
    """The non-blank lines of a JSONL file, as bytes (decoding is per line, so one bad line costs one row)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return [line for line in f.read().splitlines() if line.strip()]
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read it as {'gzipped ' if path.endswith('.gz') else ''}JSONL ({e})") from e


# ----------------------------------------------------------------------------- the hub


def hub_subset_dir(subset: str) -> str:
    """The folder of a named FineWeb subset in the repo: `sample-10BT` -> `sample/10BT`, `CC-MAIN-2024-10` -> `data/CC-MAIN-2024-10`."""
    if subset.startswith("sample-"):
        return f"sample/{subset.removeprefix('sample-')}"
    if subset.startswith("CC-MAIN-"):
        return f"data/{subset}"
    if subset in ("default", "data"):
        return "data"
    raise ValueError(f"unknown FineWeb subset {subset!r}: expected sample-10BT/100BT/350BT, CC-MAIN-YYYY-WW or default")


def fetch_hub(
    repo_id: str,
    subset: str = "sample-10BT",
    *,
    max_files: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ParquetSource:
    """The first `max_files` parquet shards of a FineWeb subset, downloaded into the hub cache (resumable, with progress bars)."""
    repo_id = HUB_ALIASES.get(repo_id, repo_id)
    folder = hub_subset_dir(subset)
    paths = hub_dataset_files(
        repo_id, folder, lambda name: name.endswith(".parquet"), max_files=max_files, cache_dir=cache_dir,
        what=f"{subset}, folder {folder}/",
        fallback="train on the bundled sample (source 'sample') or local files (a parquet path or glob, or .jsonl)",
    )
    return ParquetSource(tuple(paths))


# ----------------------------------------------------------------------------- token shards (prepared)

# llm.c's .bin format: a 256 x int32 header (magic, version, token count), then the tokens.
SHARD_MAGIC = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}
HEADER_INTS = 256
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class TokenShardSource:
    """Shards written by `prepare`: documents already tokenized, each preceded by `Tokenizer.document_start`."""

    directory: str

    @functools.cached_property
    def manifest(self) -> dict:
        path = Path(self.directory) / MANIFEST
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a token-shard manifest written by prepare ({e})") from e

    def shards(self, split: str) -> list[str]:
        """Paths of the shards of `split` ('train' or 'validation')."""
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.directory}: no {split!r} split; it has {sorted(self.manifest['splits'])}")
        return [str(Path(self.directory) / name) for name in self.manifest["splits"][split]]


def read_token_shard(path: str) -> np.ndarray:
    """The tokens of one llm.c-format shard, memory-mapped."""
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
        magic, version, n_tokens = (int(x) for x in header[:3])
        dtype = next(d for d, mv in SHARD_MAGIC.items() if mv == (magic, version))
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))
    except (OSError, ValueError, StopIteration) as e:
        raise DataError(f"{path}: not an llm.c token shard (bad header or truncated: {e!r})") from e
    return tokens


def write_token_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Writes tokens in llm.c's format: uint16 when every id fits, uint32 otherwise."""
    dtype = np.dtype(np.uint16 if tokens.size == 0 or tokens.max() < 2**16 else np.uint32)
    magic, version = SHARD_MAGIC[dtype]
    header = np.zeros(HEADER_INTS, np.int32)
    header[:3] = magic, version, tokens.size
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    tmp.replace(path)  # a killed prepare never leaves a truncated shard under the final name


# ----------------------------------------------------------------------------- opening a source by name

Source = ParquetSource | JsonlSource | TokenShardSource


def open_source(spec: str | os.PathLike | Source, *, max_files: int | None = None) -> Source:
    """A source from a name: 'sample', 'fineweb[-edu][:SUBSET]', 'hf:REPO[:SUBSET]', a prepared folder, or files.

    Files are a path, a folder or a glob of `.parquet` files, or `.jsonl`/`.jsonl.gz`
    files. The hub is contacted only for the hub names.
    """
    if isinstance(spec, (ParquetSource, JsonlSource, TokenShardSource)):
        return spec
    spec = str(spec)
    if spec == "sample":
        return ParquetSource(tuple(sorted(str(p) for p in SAMPLE_DIR.glob("*.parquet"))))
    name, _, subset = spec.removeprefix("hf:").partition(":")
    if spec.startswith("hf:") or name in HUB_ALIASES:
        return fetch_hub(name, subset or "sample-10BT", max_files=max_files)
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, MANIFEST)):
            return TokenShardSource(spec)
        spec = os.path.join(spec, "*.parquet")
    paths = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"no data files at {spec!r} (expected parquet or .jsonl files, a folder, or 'sample')")
    paths = paths[:max_files]
    if all(p.endswith((".jsonl", ".jsonl.gz")) for p in paths):
        return JsonlSource(tuple(paths))
    if all(p.endswith(".parquet") for p in paths):
        return ParquetSource(tuple(paths))
    raise DataError(
        f"{spec!r}: mixed or unknown file types {sorted({Path(p).suffix for p in paths})}; "
        f"use .parquet or .jsonl(.gz) files"
    )
