"""`report.md` and `stats.json` in the workdir: documents (and characters) in and out of every step, drops by reason.

Counts come from datatrove's per-task stats files (`logs/<job>/stats/*.json`), summed here so a
resumed run reports every task, not only those its last invocation ran. Tokens are counted once,
on the output, with the recipe's tokenizer; earlier steps report characters (tokenizing after every
filter would cost more than the filters do).
"""

from __future__ import annotations

import glob
import gzip
import json
import os

from llm.refine import JOBS

# FineWeb's published removal shares (Penedo et al. 2024, the FineWeb blog post and paper), each with
# what it was measured on. Quoted, not re-measured here; check them against the paper before citing.
FINEWEB_PUBLISHED = {
    "C4 terminal punctuation rule (not used by FineWeb)": "~30% of tokens, on a base-filtered dump",
    "FineWeb: lines ending in punctuation <= 0.12": "10.14% of tokens, on base-filtered, per-dump deduplicated data",
    "FineWeb: chars in duplicated lines >= 0.1": "12.47% of tokens, same data",
    "FineWeb: lines under 30 chars >= 0.67": "3.73% of tokens, same data",
    "FineWeb quality filter, all three": "~22% of tokens, same data",
}
EXAMPLES = 3


def merged_stats(workdir: str, job: str) -> list[dict]:
    """One job's per-step stats, summed over every task that finished (datatrove's own merge)."""
    from datatrove.utils.stats import PipelineStats

    files = sorted(glob.glob(os.path.join(workdir, "logs", job, "stats", "*.json")))
    total = PipelineStats()
    for path in files:
        with open(path) as f:
            total += PipelineStats.from_json(json.load(f))
    return json.loads(total.to_json()) if files else []


def _count(value) -> int:
    return int(value["total"]) if isinstance(value, dict) else int(value)


def steps(workdir: str) -> list[dict]:
    """Every step of every job: name, documents in and out, characters out, drops by reason."""
    rows = []
    for job in JOBS:
        for step in merged_stats(workdir, job):
            stats = step["stats"]
            time_stats = step.get("time_stats") or {}
            row = {"job": job, "step": step["name"].split(": ", 1)[-1], "seconds": time_stats.get("total", 0.0),
                   "time": {k: time_stats[k] for k in ("total", "n", "mean", "max") if k in time_stats}}
            if "total" in stats:
                row["in"] = _count(stats["total"])
            if "documents" in stats and "READER" in step["name"]:
                row["out"] = _count(stats["documents"])
            row["out"] = _count(stats.get("forwarded", row.get("out", row.get("in", 0))))
            if "doc_len" in stats:
                row["chars_out"] = _count(stats["doc_len"])
            drops = {k.removeprefix("dropped_"): _count(v) for k, v in stats.items() if k.startswith("dropped_")}
            skips = {k.removeprefix("skipped_"): _count(v) for k, v in stats.items() if k.startswith("skipped_")}
            for key in ("timeout", "clean_error", "broken_process"):  # Trafilatura's failures
                if key in stats:
                    drops[key] = _count(stats[key])
            if "Trafilatura" in step["name"] and "dropped" in stats:
                drops["empty_extraction"] = _count(stats["dropped"])
            if not drops and "dropped" in stats:
                drops["duplicate" if "MinHash" in step["name"] else "dropped"] = _count(stats["dropped"])
            if drops:
                row["dropped"] = drops
            if skips:
                row["skipped"] = skips
            if "tokens" in stats:
                row["tokens_out"] = _count(stats["tokens"])
            if "truncated" in json.dumps(stats):
                row["truncated_files"] = sorted(k.split(":", 1)[1] for k in stats if k.startswith("truncated_file:"))
            rows.append(row)
    return rows


def examples(workdir: str) -> dict[str, dict]:
    """A few removed documents per filter (from its exclusion files) and a few kept ones."""
    out = {}
    for folder in sorted(glob.glob(os.path.join(workdir, "removed", "*"))):
        docs = []
        for path in sorted(glob.glob(os.path.join(folder, "*.jsonl*"))):
            with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
                docs += [json.loads(line) for _, line in zip(range(EXAMPLES - len(docs)), f)]
        out[os.path.basename(folder)] = [{"url": d.get("metadata", {}).get("url"),
                                          "reason": d.get("metadata", {}).get("filter_reason"),
                                          "text": d["text"][:200]} for d in docs]
    kept = sorted(glob.glob(os.path.join(workdir, "output", "*.parquet")))
    if kept:
        import pyarrow.parquet as pq

        table = pq.read_table(kept[0], columns=["url", "text"]).slice(0, EXAMPLES).to_pylist()
        out["kept"] = [{"url": r["url"], "text": r["text"][:200]} for r in table]
    return out


def write(workdir: str) -> dict:
    """Writes `stats.json` and `report.md` from the logs; returns the stats."""
    rows = steps(workdir)
    reader = next((r for r in rows if r["job"] == "base"), {})
    last = rows[-1] if rows else {}
    stats = {"input_documents": reader.get("out", 0), "skipped": reader.get("skipped", {}),
             "output_documents": last.get("out", 0),
             "output_tokens": sum(r.get("tokens_out", 0) for r in rows),
             "steps": rows, "examples": examples(workdir), "fineweb_published": FINEWEB_PUBLISHED}
    with open(os.path.join(workdir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(_markdown(stats))
    return stats


def _markdown(stats: dict) -> str:
    lines = ["# Refinement report (FineWeb's recipe on datatrove)", "",
             f"{stats['input_documents']} HTML responses in, {stats['output_documents']} documents and "
             f"{stats['output_tokens']} tokens out. Reader skips: {stats['skipped'] or 'none'}.", "",
             "| job | step | docs in | docs out | removed | share | chars out | by reason |", "|---|---|---|---|---|---|---|---|"]
    for r in stats["steps"]:
        removed = r.get("in", r["out"]) - r["out"]
        share = f"{removed / r['in']:.1%}" if r.get("in") else ""
        reasons = ", ".join(f"{k} {v}" for k, v in {**r.get("dropped", {}), **r.get("skipped", {})}.items())
        lines.append(f"| {r['job']} | {r['step']} | {r.get('in', '')} | {r['out']} | {removed} | {share} | "
                     f"{r.get('chars_out', '')} | {reasons} |")
    lines += ["", "FineWeb's published removal shares (quoted; what each was measured on):", ""]
    lines += [f"- {k}: {v}" for k, v in stats["fineweb_published"].items()]
    lines += ["", "## Examples", ""]
    for name, docs in stats["examples"].items():
        lines.append(f"**{name}**")
        lines += [f"- {d['url']} ({d.get('reason') or ''}): {d['text'][:120]!r}" for d in docs]
        lines.append("")
    return "\n".join(lines)


def summary_line(workdir: str) -> str:
    with open(os.path.join(workdir, "stats.json")) as f:
        s = json.load(f)
    return (f"done: {s['input_documents']} documents in, {s['output_documents']} out ({s['output_tokens']} tokens); "
            f"report: {os.path.join(workdir, 'report.md')}")
