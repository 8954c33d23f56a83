"""Input-pipeline throughput against what the trainer consumes, and the CPU cores a big run needs.

    python bench/bench_data.py                      # bundled sample, GPT-2 tokens, tiny trainer
    python bench/bench_data.py --source '../shared/data/pretrain/*.jsonl.gz' --seconds 20

Times `make_pipeline` batches of the `tiny` config's shape (16 x 256) with 0, 1
and 2 worker processes, both packings and prepared token shards; times the
`tiny` trainer's forward+backward with bench/model_step.py on the same machine;
and extrapolates the cores that tokenizing on the fly would need to feed GPT-2
124M on 8 H100s (1.8M tokens/s, our fwd+bwd; 3.7M tokens/s, llm.c's figure).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO))

from llm.data import make_pipeline
from llm.data.prepare import prepare
from llm.tokenizer import Tokenizer

H100X8_TOKENS_PER_S = {"ours fwd+bwd, 8 x 221k": 8 * 221_000, "llm.c": 3_700_000}


def pipeline_tokens_per_s(ds, seconds: float, warmup_batches: int = 3) -> float:
    """Tokens/s of input batches after warm-up (worker start, first shuffle window)."""
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    n_tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n_tokens += next(it)["inputs"].size
    rate = n_tokens / (time.perf_counter() - start)
    if hasattr(it, "close"):
        it.close()
    return rate


def trainer_tokens_per_s(batch: int, seq: int) -> float:
    """The tiny model's value_and_grad tokens/s, from bench/model_step.py."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/model_step.py"),
            "--preset",
            "tiny",
            "--batch",
            str(batch),
            "--seq",
            str(seq),
            "--dtype",
            "float32",
            "--no-torch",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    ).stdout
    return float(re.search(r"ours \(JAX\):\s+([\d,]+) tokens/s", out).group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="sample")
    parser.add_argument("--encoding", default="gpt2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per configuration")
    parser.add_argument("--workers", default="1,2", help="worker-process counts to time, comma-separated")
    parser.add_argument("--trainer-tokens-per-s", type=float, help="skip timing the trainer; use this figure")
    args = parser.parse_args()
    tok = Tokenizer.load(args.encoding)
    print(f"cpu cores: {os.cpu_count()}, source {args.source}, {args.encoding}, batch {args.batch} x {args.seq}")
    common = dict(seq_len=args.seq, batch_size=args.batch, process_index=0, process_count=1)
    runs = {
        "concat, in process, 1 thread": dict(read_threads=1),
        "concat, in process, 2 threads": dict(read_threads=2),
        **{
            f"concat, {n} worker processes": dict(worker_count=n, read_threads=1)
            for n in map(int, args.workers.split(","))
        },
        "bos_best_fit, in process, 2 threads": dict(read_threads=2, packing="bos_best_fit"),
    }
    rates = {}
    for name, kw in runs.items():
        rates[name] = pipeline_tokens_per_s(make_pipeline(args.source, tok, **common, **kw), args.seconds)
        print(f"{name:40s} {rates[name]:12,.0f} tokens/s")
    with tempfile.TemporaryDirectory() as shards:
        start = time.perf_counter()
        manifest = prepare(args.source, tok, shards, progress=False)
        n = manifest["counts"]["train_tokens"] + manifest["counts"]["validation_tokens"]
        print(f"{'prepare (tokenize to shards, 2 threads)':40s} {n / (time.perf_counter() - start):12,.0f} tokens/s")
        name = "prepared shards, in process"
        rates[name] = pipeline_tokens_per_s(make_pipeline(shards, tok, **common), args.seconds)
        print(f"{name:40s} {rates[name]:12,.0f} tokens/s")
    trainer = args.trainer_tokens_per_s or trainer_tokens_per_s(args.batch, args.seq)
    print(f"{'tiny trainer (fwd+bwd, float32, CPU)':40s} {trainer:12,.0f} tokens/s")
    best = max(v for k, v in rates.items() if not k.startswith("prepared"))
    print(f"on-the-fly pipeline / trainer: {best / trainer:.1f}x (goal >= 10x)")
    # Conservative: the best figure with every core busy, divided by the cores. The
    # in-process figure overlaps reading, tokenizing and packing on two threads, so it
    # is not a one-core figure.
    per_core = best / (os.cpu_count() or 1)
    for label, target in H100X8_TOKENS_PER_S.items():
        print(
            f"cores to tokenize on the fly for GPT-2 124M on 8 x H100 ({label}, {target / 1e6:.1f}M tokens/s): "
            f"{target / per_core:.1f} at {per_core:,.0f} tokens/s per core"
        )


if __name__ == "__main__":
    main()
