"""Peak memory of the loss (value and gradient): full [B, T, V] logits against the chunked cross-entropy.

    python -m bench.xent_memory                  # [8, 1024, 50304], D 768: XLA's buffer plan, compile only
    python -m bench.xent_memory --run            # also run each once in its own process: peak RSS
    python -m bench.xent_memory --chunks 0 64 128 256 --batch 8 --seq 1024 --vocab 50304 --d-model 768

The loss is `lm_loss`'s reduction over `token_logprobs`' output head (GPT-2's tied
[V, D] table, f32): `sum(mask * logprobs)` and its gradient with respect to the
final hidden states and the table, jitted. chunk 0 is the full path
(`model.output_logits` then optax's cross-entropy, autodiff); chunk > 0 is
`xent.chunked_logprobs`. Figures:

- XLA's plan (`jit(...).lower(...).compile().memory_analysis()`): temporary
  buffers, and temporaries + arguments + outputs (the gradients), the peak the
  compiled program can need beyond what the caller already holds;
- with `--run`: each variant compiled and run once in a fresh process; the peak
  RSS during the run minus the RSS just before it (inputs and compiled program
  already resident), and the whole process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm import model
from llm.config import ModelConfig
from llm.train import xent

MiB = 2**20


def _problem(batch: int, seq: int, vocab: int, d_model: int):
    cfg = ModelConfig(family="gpt2", vocab_size=vocab, n_layer=1, n_embd=d_model, n_head=1, n_kv_head=1,
                      mlp_dim=4 * d_model, max_seq_len=seq, loss_chunk=0)
    rng = np.random.RandomState(0)
    x_BxTxD = jnp.asarray(rng.randn(batch, seq, d_model).astype(np.float32))
    head_VxD = jnp.asarray((rng.randn(vocab, d_model) * 0.02).astype(np.float32))
    targets_BxT = jnp.asarray(rng.randint(0, vocab, (batch, seq)).astype(np.int32))
    mask_BxT = jnp.asarray((rng.rand(batch, seq) < 0.9).astype(np.float32))
    return cfg, (x_BxTxD, head_VxD, targets_BxT, mask_BxT)


def loss_and_grad(cfg: ModelConfig, chunk: int):
    """Jitted (summed masked log-likelihood, (d/dx, d/dhead)) of the tied output head."""

    def loss(x_BxTxD, head_VxD, targets_BxT, mask_BxT):
        if chunk:
            logprobs_BxT = xent.chunked_logprobs(cfg, head_VxD, x_BxTxD, targets_BxT, chunk)
        else:
            logits_BxTxV = model.output_logits(cfg, {"embed": head_VxD}, x_BxTxD)
            logprobs_BxT = -optax.losses.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
        return -jnp.sum(jnp.where(mask_BxT > 0, logprobs_BxT * mask_BxT, 0.0))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def planned(cfg: ModelConfig, args: tuple, chunk: int) -> dict[str, float]:
    """XLA's buffer plan of the compiled loss and gradient, in MiB."""
    stats = loss_and_grad(cfg, chunk).lower(*args).compile().memory_analysis()
    temp = stats.temp_size_in_bytes / MiB
    total = temp + (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes) / MiB
    return {"temp_mib": temp, "total_mib": total}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def measured(cfg: ModelConfig, args: tuple, chunk: int) -> dict[str, float]:
    """Peak RSS of one run of the compiled loss and gradient (call in a fresh process), in MiB."""
    compiled = loss_and_grad(cfg, chunk).lower(*args).compile()
    before = _rss_mib()
    start = time.perf_counter()
    value, grads = compiled(*args)
    jax.block_until_ready((value, grads))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"run_peak_mib": peak - before, "process_peak_mib": peak, "seconds": seconds, "loss": float(value)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 256])
    parser.add_argument("--run", action="store_true", help="also run each variant once in its own process")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg, inputs = _problem(args.batch, args.seq, args.vocab, args.d_model)
    if args.child is not None:
        print(json.dumps(measured(cfg, inputs, args.child)))
        return
    print(f"loss value and gradient, [{args.batch}, {args.seq}, {args.vocab}] logits, D {args.d_model}, f32; "
          f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    rows = {}
    for chunk in args.chunks:
        rows[chunk] = planned(cfg, inputs, chunk)
        if args.run:
            base = [a for a in sys.argv[1:] if a != "--run"]
            out = subprocess.run([sys.executable, "-m", "bench.xent_memory", *base, "--child", str(chunk)],
                                 check=True, capture_output=True, text=True).stdout
            rows[chunk] |= json.loads(out.strip().splitlines()[-1])
    full = rows.get(0)
    for chunk, row in rows.items():
        name = "full logits" if chunk == 0 else f"chunk {chunk}"
        line = (f"{name:12} XLA plan: temp {row['temp_mib']:8,.0f} MiB, "
                f"with args+outputs {row['total_mib']:8,.0f} MiB")
        if full and chunk:
            line += (f" ({full['temp_mib'] / row['temp_mib']:.1f}x less temp, "
                     f"{full['total_mib'] / row['total_mib']:.1f}x less in all)")
        if "run_peak_mib" in row:
            line += (f"; run: peak RSS +{row['run_peak_mib']:,.0f} MiB (process {row['process_peak_mib']:,.0f}), "
                     f"{row['seconds']:.1f} s, loss {row['loss']:.4f}")
            if full and chunk and "run_peak_mib" in full:
                line += f" ({full['run_peak_mib'] / row['run_peak_mib']:.1f}x less)"
        print(line)


if __name__ == "__main__":
    main()
