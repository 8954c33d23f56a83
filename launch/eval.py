"""Evaluate a model on named tasks and write its report card.

    python -m launch.eval --checkpoint runs/tiny/release --tasks hellaswag,arc_easy,arc_challenge,mmlu,gsm8k --limit 100
    python -m launch.eval --checkpoint ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --tasks gsm8k --chat --n 4 --k 1,4 --temperature 0.8

`--checkpoint` takes our releases, Hugging Face directories or hub ids, and GGUF
files. Tasks are `llm.evals.registry.TASKS`; data come from `--data-dir` (the
public files, as in `../shared/data`) or else the Hugging Face hub. A progress bar
per task, then a table; `report.json` and `report.md` go to `--out DIR`, by default
the run's workdir when the checkpoint is a training run's release (`runs/x/release`
-> `runs/x/`, beside the stage's own report), else the current directory: never into
a model's folder this project did not create (a GGUF's folder, a Hugging Face
directory, the hub cache).
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec

from launch import cli
from llm import sharding
from llm.config import LOGICAL_AXES, SHARDING_PRESETS
from llm.evals import registry
from llm.evals.report import table, write_report
from llm.release import load_release

# What a training workdir holds beside its release/ (llm/train/loop.py): the marks of a run of ours.
RUN_MARKS = ("checkpoints", "metrics.jsonl")


def report_dir(checkpoint: str) -> str:
    """Where a checkpoint's report card goes by default: its run's workdir for a run's release, else here."""
    path = os.path.normpath(checkpoint)
    run = os.path.dirname(path)
    if os.path.basename(path) == "release" and os.path.isdir(path) and any(
            os.path.exists(os.path.join(run or ".", mark)) for mark in RUN_MARKS):
        return run or "."
    return "."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on named tasks and write its report card.")
    parser.add_argument("--checkpoint", required=True,
                        help="a release directory, a Hugging Face GPT-2/Llama one or hub id, or a .gguf file")
    parser.add_argument("--tokenizer", help="an encoding overriding the checkpoint's own")
    parser.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,mmlu,gsm8k",
                        help=f"comma-separated, from {','.join(registry.TASKS)}")
    parser.add_argument("--limit", type=int, help="the first N items of each task")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", help="folder for report.json and report.md (default: the run's workdir for a "
                                      "training run's release/, else the current directory)")
    parser.add_argument("--chat", action="store_true", help="chat variants (ARC, MMLU letters; GSM8K as a user message)")
    parser.add_argument("--bos", action="store_true",
                        help="the model's own prompt start (its BOS, where it adds one) before each choice context")
    parser.add_argument("--batch-rows", type=int, default=16, help="packed rows per multiple-choice forward")
    parser.add_argument("--max-len", type=int, help="tokens the model reads per choice (default: its context)")
    parser.add_argument("--n", type=int, default=1, help="samples per generative problem")
    parser.add_argument("--k", default="1", help="pass@k for these k (comma-separated, each <= n)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--shots", type=int, default=5, help="GSM8K few-shot examples for a base model")
    parser.add_argument("--no-tools", action="store_true", help="generate without the calculator tool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bpb-source", default="sample", help="bpb task: a text source ('sample', files, 'fineweb-edu')")
    parser.add_argument("--bpb-val-fraction", type=float, default=0.01,
                        help="bpb task: the source's held-out share, as in pretraining (1: every document)")
    parser.add_argument("--bpb-batches", type=int, default=16)
    args = parser.parse_args(argv)

    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in registry.TASKS]
    if unknown:
        raise cli.UserError(f"unknown task(s) {unknown}; choose from {sorted(registry.TASKS)}")
    out = args.out or report_dir(args.checkpoint)
    cli.writable_dir(out, "--out" if args.out else "the report folder (choose one with --out)")
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise cli.UserError(f"--k {args.k!r}: expected comma-separated numbers of samples, e.g. 1,4") from None
    if any(registry.TASKS[t].kind == "generative" for t in names) and not all(1 <= k <= args.n for k in ks):
        raise cli.UserError(f"--k {args.k}: pass@k needs 1 <= k <= --n (the samples per problem, {args.n})")
    options = registry.Options(
        data_dir=args.data_dir, limit=args.limit, chat=args.chat, batch_rows=args.batch_rows, max_len=args.max_len,
        bos=args.bos, n=args.n, ks=ks, temperature=args.temperature,
        top_p=args.top_p, max_new_tokens=args.max_new_tokens, shots=args.shots, tools=not args.no_tools,
        seed=args.seed, bpb_source=args.bpb_source, bpb_val_fraction=args.bpb_val_fraction,
        bpb_batches=args.bpb_batches)

    cfg, params, tokenizer = load_release(args.checkpoint, tokenizer=args.tokenizer)
    # Data parallel over every device: parameters replicated, the batch split.
    rules = {axis: tuple(SHARDING_PRESETS["dp"].get(axis, ())) for axis in LOGICAL_AXES}
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    results = {}
    for name in names:
        with tqdm.tqdm(desc=name, unit="item", dynamic_ncols=True) as bar:
            def total(n, bar=bar):
                bar.total = n
                bar.refresh()

            host = params if registry.TASKS[name].kind == "generative" else placed
            results[name] = registry.run_task(name, cfg, host, tokenizer, options, mesh=mesh, rules=rules,
                                              on_total=total, on_progress=bar.update)
    meta = {"checkpoint": args.checkpoint, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "limit": args.limit, "chat": args.chat, "n": args.n, "temperature": args.temperature}
    print(table(results))
    json_path, md_path = write_report(out, results, meta)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    cli.main(main)
