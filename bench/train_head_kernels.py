"""Where the CPU training step's time goes: the output head's three products and the loss backward, JAX vs PyTorch.

    python -m bench.train_head_kernels        # shapes of `python -m bench.train_step`: 16 x 256 tokens, D 256, V 50,304

The bench model is ~75% output head (in FLOPs): per step, logits = h @ E.T ([4096, 256] x [256, 50,304]),
dh = dlogits @ E and dE = dlogits.T @ h, 105.5 GFLOP each, and the softmax cross-entropy
over the [4096, 50,304] f32 logits. Each op runs jitted on XLA:CPU and eagerly in PyTorch,
the two alternating in one process (5 rounds), so a shared host's drift weighs on both;
the script prints medians, minima and the per-round ratio torch/JAX (below 1: PyTorch faster).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch.nn import functional as F

N, D, V = 16 * 256, 256, 50304


def main(rounds: int = 5) -> None:
    rs = np.random.RandomState(0)
    h, g = rs.randn(N, D).astype(np.float32), rs.randn(N, V).astype(np.float32)
    E, y = (rs.randn(V, D) * 0.02).astype(np.float32), rs.randint(0, V, N)
    hj, Ej, gj, yj = map(jnp.asarray, (h, E, g, y))
    ht, Et, gt, yt = map(torch.from_numpy, (h, E, g, y))
    ce_grad = jax.grad(lambda logits: optax.losses.softmax_cross_entropy_with_integer_labels(logits, yj).mean())
    ours = {"logits h @ E.T": (jax.jit(lambda a, b: a @ b.T), (hj, Ej)),
            "dh = g @ E": (jax.jit(lambda a, b: a @ b), (gj, Ej)),
            "dE = g.T @ h": (jax.jit(lambda a, b: a.T @ b), (gj, hj)),
            "CE backward": (jax.jit(ce_grad), (gj,))}
    logits = gt.clone().requires_grad_()

    def torch_ce():
        logits.grad = None
        F.cross_entropy(logits, yt).backward()

    theirs = {"logits h @ E.T": lambda: ht @ Et.T, "dh = g @ E": lambda: gt @ Et,
              "dE = g.T @ h": lambda: gt.T @ ht, "CE backward": torch_ce}
    for name, (fn, args) in ours.items():
        jax.block_until_ready(fn(*args))
        theirs[name]()
    times = {name: ([], []) for name in ours}
    for _ in range(rounds):
        for name, (fn, args) in ours.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            middle = time.perf_counter()
            theirs[name]()
            times[name][0].append(middle - start)
            times[name][1].append(time.perf_counter() - middle)
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {rounds} alternating rounds")
    for name, (a, b) in times.items():
        flops = "" if name == "CE backward" else (f"  best GFLOP/s JAX {2 * N * D * V / min(a) / 1e9:.0f}, "
                                                  f"torch {2 * N * D * V / min(b) / 1e9:.0f}")
        ratios = ", ".join(f"{t / o:.2f}" for o, t in sorted(zip(a, b), key=lambda p: p[1] / p[0]))
        print(f"{name:15} JAX {statistics.median(a) * 1e3:7.0f} ms (min {min(a) * 1e3:6.0f})  torch "
              f"{statistics.median(b) * 1e3:7.0f} ms (min {min(b) * 1e3:6.0f})  torch/JAX per round {ratios}{flops}")


if __name__ == "__main__":
    main()
