"""FineWeb's recipe (Penedo et al. 2024; datatrove's `examples/fineweb.py`) from a config, as datatrove executors.

Five dependent jobs, as FineWeb runs them: `base` (WARC -> URL filter -> Trafilatura with
`favour_precision` -> language -> Gopher repetition -> Gopher quality -> C4 quality without the
terminal-punctuation rule -> FineWeb quality -> JSONL), MinHash's signatures, buckets and clusters
(14 buckets x 8 hashes over 5-grams), and `output` (MinHash's filter -> PII formatting -> token
count -> parquet in FineWeb's schema). Each job writes datatrove's completion markers under
`logs/<job>/completions`, so a rerun skips finished tasks and redoes unfinished ones from scratch
(their writers truncate the same file names: a task killed halfway leaves nothing behind once it
reruns). Removed documents go to `removed/<filter>/`, with datatrove's `filter_reason`.

Departures from FineWeb's example: the reader counts its skips (`blocks.CountingWarcReader`);
language ID is py3langid unless a fastText model file is configured (FineWeb: fastText
`lid.176.bin`, downloaded); token counts use `llm.tokenizer` (FineWeb: the hub's GPT-2 tokenizer,
the same encoding); FineWeb deduplicates each dump separately, and so does this (one run = one dump).
"""

from __future__ import annotations

import glob as globlib
import os

import ml_collections
import pyarrow as pa

from llm.data.sources import FINEWEB_COLUMNS
from llm.errors import UserError
from llm.refine import JOBS, blocks

# FineWeb's columns (the ones `llm.data.sources` reads), typed: all strings but the two numbers.
_TYPES = {"language_score": pa.float64(), "token_count": pa.int64()}
FINEWEB_SCHEMA = pa.schema([(name, _TYPES.get(name, pa.string())) for name in FINEWEB_COLUMNS])


def split_input(spec: str) -> tuple[str, str | None]:
    """(folder, glob relative to it) for a WARC path, folder or glob, local or any fsspec URL; missing is an error."""
    from datatrove.io import get_datafolder

    if not spec:
        raise UserError("config.input.paths is empty: give WARC files by path or glob (local or fsspec URL)")
    parts = spec.split("/")
    magic = next((i for i, p in enumerate(parts) if globlib.has_magic(p)), None)
    if magic is not None:
        folder, pattern = "/".join(parts[:magic]) or ".", "/".join(parts[magic:])
    else:
        folder, pattern = spec, None
    data = get_datafolder(folder)
    if magic is None and data.isfile(""):
        folder, pattern = os.path.dirname(spec) or ".", os.path.basename(spec)
        data = get_datafolder(folder)
    elif magic is None:
        pattern = "**/*.warc*"
    if not data.exists("") or not data.list_files(glob_pattern=pattern):
        raise UserError(f"no WARC files at {spec!r} (config.input.paths: a path, folder or glob, local or fsspec URL)")
    return folder, pattern


def language_model(config: ml_collections.ConfigDict):
    """(LID, threshold): fastText where its model file is configured and present (FineWeb's), else py3langid."""
    lang = config.language
    if lang.fasttext_model:
        if not os.path.isfile(lang.fasttext_model):
            raise UserError(f"config.language.fasttext_model={lang.fasttext_model!r}: no such file "
                            f"(FineWeb's lid.176.bin; or leave it empty for the offline py3langid backend)")
        return blocks.FastTextFile(lang.fasttext_model, list(lang.languages)), lang.threshold
    return blocks.LangIdPy3(list(lang.languages)), lang.offline_threshold


def pipelines(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list]:
    """Each job's list of datatrove blocks, by job name (in `JOBS` order)."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
    from datatrove.utils.hashing import HashConfig

    folder, pattern = split_input(config.input.paths)
    removed = lambda name: JsonlWriter(os.path.join(workdir, "removed", name))  # noqa: E731
    lid, threshold = language_model(config)
    minhash = MinhashConfig(n_grams=config.minhash.n_grams, num_buckets=config.minhash.buckets,
                            hashes_per_bucket=config.minhash.hashes_per_bucket,
                            hash_config=HashConfig(hash_fc=config.minhash.hash_fc, precision=64))
    mh = lambda name: os.path.join(workdir, "minhash", name)  # noqa: E731
    base = os.path.join(workdir, "base")
    dump = {"dump": config.input.dump} if config.input.dump else None
    return {
        "base": [
            blocks.CountingWarcReader(folder, glob_pattern=pattern, limit=config.input.limit, default_metadata=dump),
            blocks.OfflineURLFilter(extra_domains=[d for d in config.url_filter.extra_domains.split(",") if d] or None,
                                    exclusion_writer=removed("1_url")),
            Trafilatura(favour_precision=True, timeout=config.trafilatura_timeout),
            blocks.OfflineLanguageFilter(lid, list(config.language.languages), threshold, removed("2_language")),
            GopherRepetitionFilter(exclusion_writer=removed("3_gopher_repetition")),
            GopherQualityFilter(exclusion_writer=removed("4_gopher_quality")),
            C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=removed("5_c4")),
            FineWebQualityFilter(exclusion_writer=removed("6_fineweb_quality")),
            JsonlWriter(base),
        ],
        "minhash_signatures": [JsonlReader(base), MinhashDedupSignature(output_folder=mh("signatures"), config=minhash)],
        "minhash_buckets": [MinhashDedupBuckets(input_folder=mh("signatures"), output_folder=mh("buckets"),
                                                config=minhash)],
        "minhash_clusters": [MinhashDedupCluster(input_folder=mh("buckets"), output_folder=mh("remove_ids"),
                                                 config=minhash)],
        "output": [
            JsonlReader(base),
            MinhashDedupFilter(input_folder=mh("remove_ids"), exclusion_writer=removed("7_minhash")),
            PIIFormatter(),
            blocks.TokenCount(config.tokenizer),
            ParquetWriter(os.path.join(workdir, "output"), output_filename="${rank}.parquet",
                          adapter=blocks.fineweb_row, schema=FINEWEB_SCHEMA),
        ],
    }


def job_tasks(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Tasks per job: the per-file jobs share `executor.tasks`; buckets one per bucket; clustering one."""
    tasks = config.executor.tasks
    return {"base": tasks, "minhash_signatures": tasks, "minhash_buckets": config.minhash.buckets,
            "minhash_clusters": 1, "output": tasks}


def executors(config: ml_collections.ConfigDict, workdir: str) -> list:
    """The jobs as dependent executors of `config.executor.kind` (local, slurm or ray), in run order."""
    kind = config.executor.kind
    if kind not in ("local", "slurm", "ray"):
        raise UserError(f"config.executor.kind={kind!r}: use 'local', 'slurm' or 'ray'")
    steps, tasks, chain = pipelines(config, workdir), job_tasks(config), []
    for job in JOBS:
        common = dict(pipeline=steps[job], tasks=tasks[job], logging_dir=os.path.join(workdir, "logs", job),
                      depends=chain[-1] if chain else None)
        if kind == "local":
            from datatrove.executor import LocalPipelineExecutor

            # -1: one worker per core; tasks beyond that queue (a worker per task would oversubscribe the cores).
            workers = min(config.executor.workers if config.executor.workers > 0 else os.cpu_count() or 1, tasks[job])
            chain.append(LocalPipelineExecutor(workers=workers, **common))
        elif kind == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            s = config.executor.slurm
            chain.append(SlurmPipelineExecutor(job_name=f"refine_{job}", time=s.time, partition=s.partition,
                                               cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb,
                                               venv_path=s.venv_path or None,
                                               slurm_logs_folder=os.path.join(workdir, "slurm_logs", job),
                                               **common))
        else:
            from datatrove.executor import RayPipelineExecutor

            chain.append(RayPipelineExecutor(cpus_per_task=config.executor.ray.cpus_per_task, **common))
    return chain


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs (or resumes) every job; a local run then writes `report.md` and `stats.json` in the workdir."""
    from llm.refine import report

    chain = executors(config, workdir)
    chain[-1].run()  # runs its dependencies first; finished tasks are skipped by their completion markers
    if config.executor.kind == "local":
        report.write(workdir)
