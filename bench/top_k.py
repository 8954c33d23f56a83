"""Top-k over a vocabulary: the sampler's two-pass top-k against `lax.top_k` and `torch.topk`, one run.

    python -m bench.top_k [--vocab 50304 --k 50 --batches 1 8]

The sampler's top-k (llm.sampling.top_k_by_blocks) takes block maxima, then the
top k blocks' logits; `lax.top_k` is what it replaces and `torch.topk` is what
`transformers`' TopKLogitsWarper calls. Same random float32 logits for all three;
each time is the best of ROUNDS rounds in which the three take turns.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
import torch

from llm.sampling import top_k_by_blocks

ROUNDS, CALLS = 5, 100


def _per_call_ms(fn) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; vocab {args.vocab}, k {args.k}; ms per call")
    print(f"{'batch':>5} {'two-pass (ours)':>16} {'lax.top_k':>10} {'torch.topk':>11} {'vs lax':>7} {'vs torch':>9}")
    for batch in args.batches:
        logits = np.random.RandomState(batch).randn(batch, args.vocab).astype(np.float32)
        x, x_torch = jax.device_put(logits), torch.from_numpy(logits)
        ours, lax_top_k = (jax.jit(functools.partial(f, k=args.k)) for f in (top_k_by_blocks, jax.lax.top_k))
        np.testing.assert_array_equal(ours(x)[0], lax_top_k(x)[0])
        runs = {
            "ours": lambda: jax.block_until_ready(ours(x)),
            "lax": lambda: jax.block_until_ready(lax_top_k(x)),
            "torch": lambda: torch.topk(x_torch, args.k),
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(ROUNDS):
            for name, run in runs.items():
                best[name] = min(best[name], _per_call_ms(run))
        print(f"{batch:5d} {best['ours']:16.3f} {best['lax']:10.3f} {best['torch']:11.3f} "
              f"{best['lax'] / best['ours']:6.2f}x {best['torch'] / best['ours']:8.2f}x")


if __name__ == "__main__":
    main()
