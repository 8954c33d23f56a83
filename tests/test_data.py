"""The FineWeb grain pipeline: batches, packing, exact resume in a new process, per-host slices, bad input.

Runs on the bundled sample and on files written to tmp_path; never needs ../shared/data.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data import DataError, make_pipeline, open_source
from llm.data.pipeline import best_fit_rows, dropped_rows
from llm.data.prepare import prepare
from llm.data.sources import (
    FINEWEB_COLUMNS,
    SAMPLE_DIR,
    JsonlSource,
    ParquetSource,
    read_token_shard,
    validation_mask,
)
from llm.tokenizer import Tokenizer

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load("gpt2")


def _batches(ds, n: int | None = None) -> list[dict[str, np.ndarray]]:
    it = iter(ds)
    out = [b for _, b in zip(range(n), it)] if n else list(it)
    return out


def _windows(batches: list[dict[str, np.ndarray]]) -> list[tuple[int, ...]]:
    """Each row's full window of T + 1 tokens."""
    return [tuple(np.append(b["inputs"][i], b["targets"][i, -1])) for b in batches for i in range(len(b["inputs"]))]


def _fineweb_table(texts: list, extra: dict | None = None) -> pa.Table:
    """Rows in FineWeb's exact schema, plus `extra` columns."""
    n = len(texts)
    columns = dict(
        text=pa.array(texts, pa.string()) if not isinstance(texts, pa.Array) else texts,
        id=[f"<urn:uuid:{uuid.UUID(int=i)}>" for i in range(n)],
        dump=["CC-MAIN-2013-20"] * n,
        url=[f"https://example.org/{i}" for i in range(n)],
        date=["2013-05-18T07:24:47Z"] * n,
        file_path=["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
        language=["en"] * n,
        language_score=[0.9] * n,
        token_count=[0] * n,
        **(extra or {}),
    )
    return pa.table(columns)


def _write_exact_groups(path: Path, tok: Tokenizer, width: int, groups: int, windows_per_group: int) -> list[str]:
    """A parquet file whose every row group tokenizes to exactly `windows_per_group` windows; returns its documents."""
    rng = random.Random(0)
    texts, sizes = [], []
    for g in range(groups):
        target, total, k = windows_per_group * width, 0, 0
        while True:
            head = f"Document {k} of group {g}."
            n_head = 1 + len(tok.encode(head))  # <|endoftext|> + text
            pad = rng.randrange(0, 2 * width)
            if total + n_head + pad + 12 >= target:  # the last document fills the group exactly
                pad = target - total - n_head
                texts.append(head + _letters(rng, pad))
                break
            texts.append(head + _letters(rng, pad))
            total += n_head + pad
            k += 1
        sizes.append(len(texts) - sum(sizes))
    assert sum(1 + len(ids) for ids in tok.encode_batch(texts)) == groups * windows_per_group * width
    table = _fineweb_table(texts)
    with pq.ParquetWriter(path, table.schema) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size))  # one row group per write
            start += size
    return texts


def _letters(rng: random.Random, n: int) -> str:
    """n random one-token words, so that no two windows are alike."""
    return "".join(" " + rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _documents(batches: list[dict[str, np.ndarray]], tok: Tokenizer) -> list[str]:
    """The documents of an unshuffled stream: its windows joined and cut at `<|endoftext|>`."""
    stream = np.concatenate([np.array(w) for w in _windows(batches)]) if batches else np.array([], np.int32)
    cuts = np.flatnonzero(stream == tok.eot)
    return [tok.decode(stream[a + 1 : b]) for a, b in zip(cuts, [*cuts[1:], len(stream)])]


# ----------------------------------------------------------------------------- the sample and sources


def test_bundled_sample_has_fineweb_schema():
    paths = sorted(SAMPLE_DIR.glob("*.parquet"))
    assert paths and (SAMPLE_DIR / "LICENSE").is_file()
    assert sum(p.stat().st_size for p in paths) < 8e6
    for path in paths:
        schema = pq.read_schema(path)
        assert tuple(schema.names) == FINEWEB_COLUMNS
        assert schema.field("language_score").type == pa.float64() and schema.field("token_count").type == pa.int64()
    assert isinstance(open_source("sample"), ParquetSource)


def test_validation_split_is_a_stable_hash():
    keys = [f"<urn:uuid:{uuid.UUID(int=i)}>" for i in range(20_000)]
    mask = validation_mask(keys, 0.05)
    assert 0.04 < mask.mean() < 0.06
    assert (validation_mask(keys[::-1], 0.05) == mask[::-1]).all()  # per document, not per position
    assert not validation_mask(keys, 0.0).any()


# ----------------------------------------------------------------------------- batches and packing


def test_concat_batches_shift_targets_and_separate_documents(tok):
    ds = make_pipeline("sample", tok, seq_len=64, batch_size=8, process_index=0, process_count=1, shuffle_window=32)
    batches = _batches(ds, 5)
    for b in batches:
        assert set(b) == {"inputs", "targets"}
        assert b["inputs"].shape == b["targets"].shape == (8, 64) and b["inputs"].dtype == np.int32
        assert (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()
    assert sum((b["inputs"] == tok.eot).sum() for b in batches) > 0
    assert _windows(batches) == _windows(_batches(ds, 5))  # seeded: the same every time
    other = make_pipeline("sample", tok, seq_len=64, batch_size=8, seed=1, process_index=0, process_count=1)
    assert _windows(batches) != _windows(_batches(other, 5))


def test_best_fit_rows_fill_exactly_and_use_each_document_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    rows = best_fit_rows(lengths, 129)
    assert rows and all(sum(n for _, n in row) == 129 for row in rows)
    used = [d for row in rows for d, _ in row]
    assert len(used) == len(set(used))
    assert all(n <= lengths[d] for row in rows for d, n in row)
    cropped = sum(1 for row in rows for d, n in row if n < lengths[d])
    assert cropped <= len(rows)  # at most one crop per row: the one that fills it


def test_bos_best_fit_rows_start_documents_and_carry_segments(tok):
    ds = make_pipeline(
        "sample",
        tok,
        seq_len=128,
        batch_size=4,
        process_index=0,
        process_count=1,
        packing="bos_best_fit",
        shuffle_window=16,
    )
    for b in _batches(ds, 4):
        assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
        assert (b["inputs"][:, 0] == tok.eot).all() and (b["positions"][:, 0] == 0).all()
        starts = b["positions"] == 0
        assert (b["inputs"][starts] == tok.eot).all()  # every document begins with the separator
        assert (np.diff(b["segment_ids"], axis=1) == starts[:, 1:]).all()
        assert (b["positions"][:, 1:][~starts[:, 1:]] == b["positions"][:, :-1][~starts[:, 1:]] + 1).all()


def test_validation_split_is_finite_unshuffled_and_disjoint_from_train(tok, tmp_path):
    path = tmp_path / "docs.parquet"
    texts = [f"Validation probe number {i}: " + "words " * (i % 40) for i in range(600)]
    pq.write_table(_fineweb_table(texts), path, row_group_size=100)
    kw = dict(seq_len=15, batch_size=2, process_index=0, process_count=1, val_fraction=0.2, num_epochs=1)
    val = _batches(make_pipeline(str(path), tok, split="validation", **kw))
    assert val and _windows(val) == _windows(_batches(make_pipeline(str(path), tok, split="validation", **kw)))
    train_docs = set(_documents(_batches(make_pipeline(str(path), tok, shuffle=False, **kw)), tok))
    val_docs = set(_documents(val, tok))
    full = {d for d in train_docs | val_docs if d in texts}
    assert len(full) > 400 and not (train_docs & val_docs & set(texts))


# ----------------------------------------------------------------------------- per-host slices


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_split_the_stream_disjointly_and_completely(tok, tmp_path, shuffle):
    seq_len, groups, per_group = 31, 8, 4
    path = tmp_path / "exact.parquet"
    texts = _write_exact_groups(path, tok, seq_len + 1, groups, per_group)
    kw = dict(seq_len=seq_len, batch_size=4, num_epochs=1, val_fraction=0.0, shuffle=shuffle, shuffle_window=8)
    single = _batches(make_pipeline(str(path), tok, process_index=0, process_count=1, **kw))
    hosts = [_batches(make_pipeline(str(path), tok, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert all(b["inputs"].shape == (2, seq_len) for h in hosts for b in h)
    w0, w1, w = _windows(hosts[0]), _windows(hosts[1]), _windows(single)
    assert len(w) == groups * per_group and len(w0) == len(w1) == len(w) // 2
    assert not set(w0) & set(w1)
    assert Counter(w0 + w1) == Counter(w)  # same tokens, no window lost or doubled
    if not shuffle:  # documents can be read back in order: none lost, none doubled
        d0, d1 = _documents(hosts[0], tok), _documents(hosts[1], tok)
        assert not set(d0) & set(d1)
        assert sorted(d0 + d1) == sorted(_documents(single, tok)) == sorted(texts)


# ----------------------------------------------------------------------------- resume in a new process

PIPELINE_ARGS = dict(seq_len=64, batch_size=4, seed=3, process_index=0, process_count=1, shuffle_window=64)


def _child(mode: str, packing: str, workers: int, ckpt: str, out: str, k: int = 5, n: int = 4) -> None:
    """Runs in a fresh interpreter: `run` saves the iterator after k batches then records n more; `resume` restores and records n."""
    import grain
    import orbax.checkpoint as ocp

    ds = make_pipeline("sample", Tokenizer.load("gpt2"), packing=packing, worker_count=workers, **PIPELINE_ARGS)
    it = iter(ds)
    manager = ocp.CheckpointManager(ckpt, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    if mode == "run":
        for _ in range(k):
            next(it)
        manager.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    else:
        manager.restore(manager.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    batches = [next(it) for _ in range(n)]
    np.savez(out, **{f"{i}_{key}": v for i, b in enumerate(batches) for key, v in b.items()})
    if workers:
        it.close()


@pytest.mark.slow
@pytest.mark.parametrize("packing,workers", [("concat", 0), ("bos_best_fit", 1)])
def test_resume_in_a_new_process_continues_the_stream_exactly(tmp_path, packing, workers):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    results = {}
    for mode in ("run", "resume"):
        out = tmp_path / f"{mode}.npz"
        args = [sys.executable, __file__, mode, packing, str(workers), str(tmp_path / "ckpt"), str(out)]
        proc = subprocess.run(args, env=env, check=False, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = dict(np.load(out))
    assert results["run"].keys() == results["resume"].keys() and len(results["run"]) >= 8
    for key, value in results["run"].items():
        np.testing.assert_array_equal(results["resume"][key], value, err_msg=key)


# ----------------------------------------------------------------------------- bad input


def test_extra_columns_empty_and_non_utf8_rows_are_dropped_and_counted(tok, tmp_path):
    good = [f"Good document {i} with several words in it." for i in range(40)]
    values = [t.encode() for t in good[:20]] + [b"", b"  \n", b"bad \xff\xfe bytes"] + [t.encode() for t in good[20:]]
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    # A string column holding invalid UTF-8, as a writer that skips validation leaves it.
    text = pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )
    path = tmp_path / "edu.parquet"
    pq.write_table(
        _fineweb_table(text, {"score": [3.1] * len(values), "int_score": [3] * len(values)}), path, row_group_size=16
    )
    source = open_source(str(path))
    rows = [source.read(c) for c in source.chunks()]
    assert sum(r.n_empty for r in rows) == 2 and sum(r.n_undecodable for r in rows) == 1
    assert [t for r in rows for t in r.texts] == good
    it = iter(
        make_pipeline(
            str(path),
            tok,
            seq_len=7,
            batch_size=2,
            num_epochs=1,
            shuffle=False,
            val_fraction=0.0,
            process_index=0,
            process_count=1,
        )
    )
    batches = list(it)  # the epoch runs to its end
    documents = _documents(batches, tok)
    assert len(documents) > 30 and documents[:-1] == good[: len(documents) - 1]
    assert dropped_rows(it) == {"empty": 2, "undecodable": 1, "unreadable": 0}


def test_missing_text_column_names_the_file(tok, tmp_path):
    path = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["hello"], "id": ["a"]}), path)
    with pytest.raises(DataError, match=r"no_text\.parquet.*no 'text' column.*content"):
        make_pipeline(str(path), tok, seq_len=8, batch_size=1, process_index=0, process_count=1)


def test_file_that_is_not_parquet_names_the_file(tok, tmp_path):
    good = tmp_path / "000.parquet"
    pq.write_table(_fineweb_table(["some text"] * 10), good)
    (tmp_path / "001.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated download
    with pytest.raises(DataError, match=r"001\.parquet: not a readable parquet file"):
        make_pipeline(str(tmp_path / "*.parquet"), tok, seq_len=8, batch_size=1, process_index=0, process_count=1)


def test_corrupt_row_group_is_skipped_and_counted_not_raised(tok, tmp_path):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(50)) for _ in range(200)]
    path = tmp_path / "damaged.parquet"
    pq.write_table(_fineweb_table(texts), path, row_group_size=100, compression="zstd", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset + 40 : column.data_page_offset + 2040] = b"Z" * 2000  # the footer stays intact
    path.write_bytes(data)
    source = open_source(str(path))
    rows = [source.read(c) for c in source.chunks()]
    assert rows[0].n_unreadable == 100 and rows[1].texts == texts[100:]
    it = iter(
        make_pipeline(
            str(path), tok, seq_len=32, batch_size=2, num_epochs=1, val_fraction=0.0, process_index=0, process_count=1
        )
    )
    assert len(list(it)) > 10
    assert dropped_rows(it)["unreadable"] == 100


def test_jsonl_bad_lines_are_dropped_and_counted(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "first document"}).encode(),
        b'{"text": ""}',
        b"{not json",
        b'{"body": "no text"}',
        b'{"text": "caf\xe9 in latin-1"}',
        json.dumps({"text": "last document"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = open_source(str(path))
    assert isinstance(source, JsonlSource)
    (rows,) = [source.read(c) for c in source.chunks()]
    assert rows.texts == ["first document", "last document"]
    assert rows.n_empty == 1 and rows.n_undecodable == 3


def test_hub_offline_fails_with_a_clear_message(tmp_path):
    code = "from llm.data import open_source\nopen_source('fineweb-edu:sample-10BT', max_files=1)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "ConnectionError: cannot fetch HuggingFaceFW/fineweb-edu (sample-10BT" in proc.stderr
    assert "bundled" in proc.stderr


# ----------------------------------------------------------------------------- prepared token shards


def test_prepare_writes_shards_the_pipeline_reads(tok, tmp_path):
    texts = [f"Prepared document {i}. " + "more words " * (i % 30) for i in range(300)]
    path = tmp_path / "docs.parquet"
    pq.write_table(_fineweb_table(texts), path, row_group_size=64)
    manifest = prepare(str(path), tok, tmp_path / "shards", shard_tokens=2000, val_fraction=0.1, progress=False)
    assert len(manifest["splits"]["train"]) > 1 and manifest["counts"]["documents"] == 300
    stream = np.concatenate([read_token_shard(str(tmp_path / "shards" / n)) for n in manifest["splits"]["train"]])
    in_val = validation_mask([f"<urn:uuid:{uuid.UUID(int=i)}>" for i in range(300)], 0.1)
    expected = [t for t, v in zip(texts, in_val) if not v]
    assert [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.eot))[1:]] == [
        tok.decode([tok.eot]) + t for t in expected
    ]
    ds = make_pipeline(
        str(tmp_path / "shards"),
        tok,
        seq_len=16,
        batch_size=2,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    first = next(iter(ds))
    np.testing.assert_array_equal(first["inputs"][0], stream[:16])
    np.testing.assert_array_equal(first["inputs"][1], stream[16:32])  # windows advance by T: each token a target once
    shuffled = make_pipeline(
        str(tmp_path / "shards"), tok, seq_len=16, batch_size=2, num_epochs=1, process_index=0, process_count=1
    )
    assert Counter(_windows(_batches(shuffled))) == Counter(_windows(_batches(ds)))


def test_prepare_command_line(tmp_path, capsys):
    from launch.prepare import main

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Line document {i}."}) + "\n" for i in range(50)))
    assert main(["--source", str(path), "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 50
    assert open_source(str(tmp_path / "out")).shards("train")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
