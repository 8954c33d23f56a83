"""The pretraining input pipeline on grain: text chunks in, fixed-shape token batches out.

Legend: B rows per batch on this process, T = seq_len, W = T + 1 (a window holds
the inputs and, shifted by one, the targets).

Text sources (parquet, JSONL, the bundled sample, FineWeb from the hub):

  chunks (row groups) -> shuffle(seed), repeat -> this process's chunks
  -> read, drop and count empty/undecodable rows, keep this split's documents
  -> tokenize in a batch per chunk, `Tokenizer.document_start` before every document
  -> pack into windows of W -> window shuffle(seed) -> batch B -> worker processes

* Per-host slices are taken on chunks, before any reading, so each process reads
  and tokenizes only its own share; the processes' streams are disjoint and
  together hold every document of the 1-process stream.
* Worker processes (`worker_count`) slice the process's chunks again; packing and
  the window shuffle run inside each worker. As grain warns for stateful stages,
  the stream is deterministic for a given (process_count, worker_count) but
  changes when either changes; an exact resume needs the same counts.
* The iterator's state is tiny (positions, no buffers): grain replays from the
  last chunk boundary, so it checkpoints with `grain.checkpoint.CheckpointSave`.
* The train/validation split is by a hash of each document's id
  (`sources.validation_mask`), stable across reshuffles and process counts.

Packing:

* `concat` (GPT-2, llm.c): documents are concatenated and cut every W tokens;
  attention crosses document boundaries, the `<|endoftext|>` separator tells the
  model a new document began. Batches are `{"inputs", "targets"}`, int32 [B, T].
* `bos_best_fit` (nanochat's BOS-aligned best-fit): every row starts at a
  document start; each row is filled with the largest remaining document that
  fits, and when none fits the shortest is cropped to fill the row exactly (its
  rest is dropped), so there is no padding. Departure from nanochat: the
  candidates are the documents of one chunk rather than a rolling buffer, which
  keeps the checkpoint a position, at the cost of the last partial row of each
  chunk. Batches add `segment_ids` (1, 2, ... per document in the row) and
  `positions` (restarting at 0 per document), int32 [B, T], for
  `forward(..., positions_BxT=, segment_ids_BxT=)` to mask attention across
  documents.

Prepared token shards (`prepare.py`) skip reading and tokenizing: windows are
cut every T tokens (each token is a target once, as in llm.c), shuffled
globally by index, and read from memory-mapped shards.

Checkpointing, beside the train state in the same orbax step:

    it = iter(make_pipeline("sample", tok, seq_len=256, batch_size=32))
    handlers = {"data": grain.checkpoint.CheckpointHandler(), ...}
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), ...))
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it), ...))
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from llm.data import sources as sources_lib
from llm.data.sources import Chunk, Source, TokenShardSource
from llm.tokenizer import Tokenizer

Packing = Literal["concat", "bos_best_fit"]
Split = Literal["train", "validation"]
SPLITS = ("train", "validation")
DROPPED_KEY = "dropped_rows"


@dataclasses.dataclass(frozen=True)
class _TokenizeChunk(grain.transforms.Map):
    """A chunk -> this split's documents as one token stream, each preceded by `Tokenizer.document_start`."""

    source: Source
    tokenizer: Tokenizer
    split: Split
    val_fraction: float
    threads: int

    def map(self, chunk: Chunk) -> dict[str, Any]:
        rows = self.source.read(chunk)
        in_validation = sources_lib.validation_mask(rows.keys, self.val_fraction)
        texts = [t for t, v in zip(rows.texts, in_validation) if v == (self.split == "validation")]
        start = np.array(self.tokenizer.document_start, np.int32)
        docs = [
            np.concatenate([start, np.asarray(ids, np.int32)]) for ids in self.tokenizer.encode_batch(texts, self.threads)
        ]
        return {
            "tokens": np.concatenate(docs) if docs else np.zeros(0, np.int32),
            "lengths": np.fromiter(map(len, docs), np.int32, len(docs)),
            "dropped": {"empty": rows.n_empty, "undecodable": rows.n_undecodable, "unreadable": rows.n_unreadable},
        }


class _CountDropped(grain.IterDataset):
    """Sums the rows each chunk dropped into the iterator state, and passes on chunks that kept documents."""

    # In the state rather than a log line so the counts are exact across a resume and
    # reach the training loop from worker processes too (see `dropped_rows`).

    def __iter__(self) -> grain.DatasetIterator:
        return _CountDroppedIterator(self._parent.__iter__())


class _CountDroppedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._dropped = {"empty": 0, "undecodable": 0, "unreadable": 0}

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            element = next(self._parent)
            for reason, n in element["dropped"].items():
                self._dropped[reason] += n
            if len(element["lengths"]):
                return {"tokens": element["tokens"], "lengths": element["lengths"]}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), DROPPED_KEY: dict(self._dropped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._dropped = dict(state[DROPPED_KEY])


def dropped_rows(iterator: grain.DatasetIterator | dict[str, Any]) -> dict[str, int]:
    """Rows dropped so far (empty, undecodable, unreadable) by an iterator's reads, summed over its worker processes.

    In-process stages are read live. With worker processes, or given a saved state,
    the counts are those of the state grain would replay from: the packer and the
    window shuffle record their parent at their last restart point, so the figure
    can trail the rows already read by up to a shuffle window.
    """
    totals = {"empty": 0, "undecodable": 0, "unreadable": 0}
    live, stack = [], [iterator]
    while stack:  # the in-process iterator tree
        node = stack.pop()
        if isinstance(node, _CountDroppedIterator):
            live.append(node)
        stack.extend(getattr(node, "_parents", ()))
    if live:
        for counter in live:
            for reason, n in counter._dropped.items():
                totals[reason] += n
        return totals

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == DROPPED_KEY:
                    for reason, n in value.items():
                        totals[reason] += n
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(iterator.get_state() if isinstance(iterator, grain.DatasetIterator) else iterator)
    return totals


def _tokens_only(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the stream: concat packing ignores document lengths."""
    return {"tokens": element["tokens"]}


def _window_to_batch_row(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed window of W tokens -> inputs and targets of T tokens."""
    tokens_W = window["tokens"]
    return {"inputs": tokens_W[:-1], "targets": tokens_W[1:]}


def _is_full(window: dict[str, np.ndarray]) -> bool:
    """False for the zero-padded last window of a finite stream."""
    return bool(window["tokens_segment_ids"][-1])


def best_fit_rows(lengths: Sequence[int], width: int, *, crop: bool = True) -> list[list[tuple[int, int]]]:
    """nanochat's BOS-aligned best fit: per row, (document, tokens taken from its start) pairs.

    Each row takes the longest remaining document that fits the space left. When
    none fits, `crop=True` (pretraining) crops the shortest remaining one to fill
    the row exactly, and drops the last row if the documents run out before it is
    full; `crop=False` (conversations, never split) closes the row short, to be
    padded, and every document lands whole in exactly one row.
    """
    # (length, document) sorted, so "longest that fits" and "shortest" are bisections.
    remaining = sorted((int(n), i) for i, n in enumerate(lengths))
    if not crop and remaining and remaining[-1][0] > width:
        n, doc = remaining[-1]
        raise ValueError(f"document {doc} has {n} tokens, more than a row of {width}")
    rows = []
    while remaining:
        row, space = [], width
        while space and remaining:
            k = bisect.bisect_right(remaining, (space, len(lengths))) - 1
            if k >= 0:
                n, doc = remaining.pop(k)
                row.append((doc, n))
                space -= n
            elif crop:
                _, doc = remaining.pop(0)
                row.append((doc, space))
                space = 0
            else:
                break
        if space == 0 or not crop:
            rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class _BestFitPack(grain.experimental.FlatMapTransform):
    """A chunk's token stream -> BOS-aligned rows with segment ids and positions."""

    width: int
    max_fan_out: int = 1 << 20  # checked only by MapDataset.flat_map; rows per chunk are unbounded here

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        starts = np.concatenate([[0], np.cumsum(element["lengths"])[:-1]])
        out = []
        for row in best_fit_rows(element["lengths"], self.width):
            tokens_W = np.concatenate([element["tokens"][starts[d] : starts[d] + n] for d, n in row])
            segments_W = np.repeat(np.arange(1, len(row) + 1, dtype=np.int32), [n for _, n in row])
            positions_W = np.concatenate([np.arange(n, dtype=np.int32) for _, n in row])
            out.append(
                {
                    "inputs": tokens_W[:-1],
                    "targets": tokens_W[1:],
                    "segment_ids": segments_W[:-1],
                    "positions": positions_W[:-1],
                }
            )
        return out


class _JsonSafeCtsState(grain.IterDataset):
    """ConcatThenSplit whose state survives a JSON round trip (orbax saves iterator states as JSON)."""

    # grain 0.2.18 compares remainder slices with the tuple (-1, -1); JSON gives back
    # the list [-1, -1], and a restored iterator then resumes at the wrong element.

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafeCtsStateIterator(self._parent.__iter__())


class _JsonSafeCtsStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


def _parse_absl_flags() -> None:
    """Gives absl flags their defaults when no absl app parsed them."""
    # grain 0.2.18's mp_prefetch reads one of its absl flags directly and raises
    # UnparsedFlagAccessError outside `absl.app.run` (a notebook, pytest, argparse CLIs).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["llm"], known_only=True)


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process, from JAX's runtime unless given (tests simulate hosts this way)."""
    if process_index is None or process_count is None:
        import jax  # only here: the pipeline itself runs in worker processes that need no JAX

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def make_pipeline(
    source: str | Source,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    split: Split = "train",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    packing: Packing = "concat",
    shuffle: bool | None = None,
    shuffle_window: int = 1024,
    val_fraction: float = 0.01,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 2,
    tokenizer_threads: int = 1,
) -> grain.IterDataset:
    """Batches of this process's share of `source`: dicts of int32 [batch_size // process_count, seq_len] arrays.

    `batch_size` is global; `num_epochs=None` repeats forever (the default for
    training; validation defaults to one pass, unshuffled). `iter(...)` gives a
    checkpointable grain iterator. A finite pass can give processes different
    numbers of batches (their chunks differ), so multi-host evaluation should run
    a fixed number of batches rather than to the end.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if packing not in ("concat", "bos_best_fit"):
        raise ValueError(f"unknown packing {packing!r}; expected 'concat' or 'bos_best_fit'")
    index, count = _process_slice(process_index, process_count)
    if batch_size % count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the {count} processes")
    if split == "validation":
        num_epochs = 1 if num_epochs is None else num_epochs
    shuffle = split == "train" if shuffle is None else shuffle
    source = sources_lib.open_source(source)
    width = seq_len + 1
    if isinstance(source, TokenShardSource):
        if packing != "concat":
            raise ValueError("prepared token shards hold no document boundaries for bos_best_fit; use packing='concat'")
        ds = _shard_windows(source, split, seq_len, tokenizer)
        ds = (ds.shuffle(seed) if shuffle else ds).repeat(num_epochs)[index::count]
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size))
    else:
        chunks = source.chunks()
        if not chunks:
            raise sources_lib.DataError(f"{source}: no rows to read")
        ds = grain.MapDataset.source(chunks)
        ds = (ds.shuffle(seed) if shuffle else ds).repeat(num_epochs)[index::count]
        ds = ds.map(_TokenizeChunk(source, tokenizer, split, val_fraction, tokenizer_threads))
        # Threads overlap reading and tokenizing of chunks; tiktoken releases the GIL.
        ds = _CountDropped(
            ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_threads + 1))
        )
        if packing == "concat":
            ds = ds.map(_tokens_only)
            ds = _JsonSafeCtsState(grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": width}))
            ds = ds.filter(_is_full).map(_window_to_batch_row)
        else:
            ds = grain.experimental.FlatMapIterDataset(ds, _BestFitPack(width))
        if shuffle:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
    ds = ds.batch(batch_size // count, drop_remainder=True)
    if worker_count:
        _parse_absl_flags()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return ds


# ----------------------------------------------------------------------------- prepared token shards


@dataclasses.dataclass(frozen=True)
class _ShardWindow(grain.transforms.Map):
    """A global window index -> inputs and targets read from a memory-mapped shard."""

    shards: tuple[str, ...]
    cumulative_windows: tuple[int, ...]  # windows before each shard, and the total last
    seq_len: int

    @functools.cached_property
    def _tokens(self) -> list[np.ndarray]:
        return [sources_lib.read_token_shard(path) for path in self.shards]

    def map(self, i: int) -> dict[str, np.ndarray]:
        shard = bisect.bisect_right(self.cumulative_windows, i) - 1
        start = (i - self.cumulative_windows[shard]) * self.seq_len
        tokens_W = np.asarray(self._tokens[shard][start : start + self.seq_len + 1], np.int32)
        return {"inputs": tokens_W[:-1], "targets": tokens_W[1:]}


def _shard_windows(source: TokenShardSource, split: Split, seq_len: int, tokenizer: Tokenizer) -> grain.MapDataset:
    """All windows of a split's shards as a random-access dataset of window indices."""
    if source.manifest["tokenizer"] != tokenizer.name:
        raise sources_lib.DataError(
            f"{source.directory} was tokenized with {source.manifest['tokenizer']!r}, not {tokenizer.name!r}"
        )
    shards = source.shards(split)
    counts = [max(0, (len(sources_lib.read_token_shard(p)) - 1) // seq_len) for p in shards]
    cumulative = tuple(int(c) for c in np.concatenate([[0], np.cumsum(counts)]))
    if cumulative[-1] == 0:
        raise sources_lib.DataError(f"{source.directory}: the {split} shards hold no window of {seq_len + 1} tokens")
    return grain.MapDataset.range(cumulative[-1]).map(_ShardWindow(tuple(shards), cumulative, seq_len))


def batch_spec(seq_len: int, local_batch: int, packing: Packing = "concat") -> dict[str, Any]:
    """Shapes and dtypes of one batch, for jit and checkpoint code that needs them before the first batch."""
    keys = ("inputs", "targets") + (("segment_ids", "positions") if packing == "bos_best_fit" else ())
    return {k: np.zeros((local_batch, seq_len), np.int32) for k in keys}
