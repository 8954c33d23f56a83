"""FineWeb's refinement recipe (Penedo et al. 2024) on datatrove: raw WARC -> FineWeb-schema parquet.

    python -m launch.refine --config configs/refine_fineweb.py --workdir runs/refine [--config.input.paths=GLOB ...]

Offline by default: py3langid for language ID (set `language.fasttext_model` to a local
`lid.176.bin` for FineWeb's own fastText), the URL blocklist bundled in datatrove's wheel, the
project's GPT-2 tokenizer for `token_count`. The output folder is a data source for `launch.train`
and `launch.prepare` (`--config.data.source=runs/refine/output`). SLURM or Ray:
`--config.executor.kind=slurm --config.executor.slurm.partition=...`.
"""

import ml_collections

SAMPLE = "../shared/data/pretrain/common_crawl_sample/*.warc.gz"


def get_config():
    config = ml_collections.ConfigDict()
    # WARC files by path, folder or glob, local or an fsspec URL (s3://commoncrawl/crawl-data/...).
    config.input = ml_collections.ConfigDict(dict(paths=SAMPLE, dump="", limit=-1))
    config.executor = ml_collections.ConfigDict(dict(
        kind="local", tasks=2, workers=-1,  # workers -1: one per core
        slurm=dict(partition="", time="10:00:00", cpus_per_task=1, mem_per_cpu_gb=2, venv_path=""),
        ray=dict(cpus_per_task=1),
    ))
    config.url_filter = ml_collections.ConfigDict(dict(extra_domains=""))  # comma-separated, beside the bundled list
    config.trafilatura_timeout = 1.0  # seconds per page, datatrove's default (FineWeb's)
    config.language = ml_collections.ConfigDict(dict(
        languages=["en"],
        threshold=0.65,  # FineWeb's, for fastText lid.176 scores
        # py3langid's normalised probabilities crowd near 1, so FineWeb's 0.65 keeps mixed pages fastText
        # drops: 0.99 agrees with fastText-at-0.65 on 83% of keep decisions (0.65: 75%) on the sample and
        # its English/French mixtures; 0.999 agrees more (87%) but drops plain short English (a 25-word
        # paragraph scores 0.997). bench/refine.py, docs/experiments/refinement.md.
        offline_threshold=0.99,
        fasttext_model="",  # a local lid.176.bin (FineWeb's model); empty: py3langid, shipped in its wheel
    ))
    config.minhash = ml_collections.ConfigDict(dict(n_grams=5, buckets=14, hashes_per_bucket=8, hash_fc="sha1"))
    config.tokenizer = "gpt2"  # FineWeb's token_count is GPT-2 tokens
    return config
