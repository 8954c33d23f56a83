"""The refinement recipe: raw Common Crawl WARC files -> FineWeb-schema parquet, built on datatrove.

`blocks.py` holds the few blocks the project adds to datatrove's (a WARC reader that counts its
skips, offline language ID and URL filtering, token counts with our tokenizer, FineWeb's schema);
`recipe.py` turns a config into datatrove executors; `report.py` writes `report.md` and `stats.json`.
Needs the `refine` extra.
"""

# The recipe's datatrove jobs in the order they run (each depends on the one before): the report's rows too.
JOBS = ("base", "minhash_signatures", "minhash_buckets", "minhash_clusters", "output")
