"""Builds llm/assets/fineweb_sample/: Wikipedia and Wikinews text in FineWeb's exact parquet schema.

  python scripts/build_fineweb_sample.py --data ../shared/data/pretrain

The bundled sample lets the main job and the tests run offline with the same
reader that serves `HuggingFaceFW/fineweb`. Columns and types are FineWeb's
(`text, id, dump, url, date, file_path, language, language_score, token_count`);
fields the source lacks are filled honestly: `id` is a UUID5 of the URL in
FineWeb's `<urn:uuid:…>` form, `dump` names the wiki, `date` and
`language_score` are null (not measured), `token_count` is GPT-2's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llm.tokenizer import Tokenizer

FINEWEB_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("id", pa.string()),
        ("dump", pa.string()),
        ("url", pa.string()),
        ("date", pa.string()),
        ("file_path", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        ("token_count", pa.int64()),
    ]
)
# (corpus file, dump name, megabytes of text to take)
CORPORA = (("wikipedia_en.jsonl.gz", "wikipedia-en", 6.0), ("wikinews_en.jsonl.gz", "wikinews-en", 3.0))
ROW_GROUP_ROWS = 256  # small row groups: the sample still splits into many shuffle units


def read_records(path: Path, megabytes: float) -> list[dict]:
    """The first non-empty records of a corpus, up to `megabytes` of UTF-8 text."""
    records, size = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if not record["text"].strip():
                continue
            records.append(record)
            size += len(record["text"].encode("utf-8", errors="surrogatepass"))
            if size >= megabytes * 1e6:
                break
    return records


def to_table(records: list[dict], dump: str, file_path: str, tok: Tokenizer) -> pa.Table:
    """FineWeb-schema rows for one corpus."""
    texts = [r["text"].encode("utf-8", errors="replace").decode("utf-8") for r in records]  # no lone surrogates
    rows = dict(
        text=texts,
        id=[f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, r['url'])}>" for r in records],
        dump=[dump] * len(records),
        url=[r["url"] for r in records],
        date=[None] * len(records),
        file_path=[file_path] * len(records),
        language=["en"] * len(records),
        language_score=[None] * len(records),
        token_count=[len(ids) for ids in tok.encode_batch(texts, num_threads=2)],
    )
    return pa.Table.from_pydict(rows, schema=FINEWEB_SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/pretrain"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "llm/assets/fineweb_sample")
    args = parser.parse_args()
    tok = Tokenizer.load("gpt2")
    rng = random.Random(0)
    args.out.mkdir(parents=True, exist_ok=True)
    for shard, (name, dump, megabytes) in enumerate(CORPORA):
        records = read_records(args.data / name, megabytes)
        rng.shuffle(records)  # FineWeb shards are not sorted by topic either
        table = to_table(records, dump, name, tok)
        path = args.out / f"{shard:03d}_00000.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        print(f"{path}: {table.num_rows} documents, {sum(table['token_count'].to_pylist()):,} GPT-2 tokens")


if __name__ == "__main__":
    main()
