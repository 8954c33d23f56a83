"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is right), given c right: 1 - C(n-c, k)/C(n, k).

    Computed as a product, as in the paper's numerically stable form, never with
    factorials. k > n is an error: n samples cannot estimate pass@k.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems, each with `n` samples of which `correct_counts[i]` are right."""
    if not correct_counts:
        raise ValueError("no problems to average pass@k over")
    return float(np.mean([pass_at_k(n, c, k) for c in correct_counts]))
