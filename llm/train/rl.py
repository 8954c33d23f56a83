"""Advantages for policy-gradient RL from verifiable rewards: GRPO's group baseline.

Shape legend: P prompts (groups), G samples per prompt.
"""

from __future__ import annotations

import numpy as np

SCALES = ("group", "batch", "none")


def group_advantages(rewards_PxG: np.ndarray, scale: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantages_PxG, degenerate_P): each reward minus its group's mean, optionally scaled.

    GRPO (Shao et al. 2024, DeepSeekMath section 4.1.2) uses the G samples of one
    prompt as each other's baseline: A = (r - mean(group)) / std(group) ("group").
    "batch" divides by the std of all the step's rewards instead (as REINFORCE++
    and Hu et al. suggest; less weight on nearly-solved prompts), "none" keeps the
    centred reward (Dr. GRPO, Liu et al. 2025: the std scaling biases toward too
    easy and too hard prompts). The std is the population one (ddof 0), so a
    half-right binary group gets exactly +-1. A group whose rewards are all equal
    (all solved or none) teaches nothing: its advantages are exactly 0, never
    0 / 0, and `degenerate_P` marks it so a stage can count or drop it.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards_PxG = np.asarray(rewards_PxG, np.float64)
    if rewards_PxG.ndim != 2 or rewards_PxG.shape[1] < 1:
        raise ValueError(f"rewards must be [prompts, samples per prompt], got shape {rewards_PxG.shape}")
    degenerate_P = np.all(rewards_PxG == rewards_PxG[:, :1], axis=1)
    centred_PxG = rewards_PxG - rewards_PxG.mean(axis=1, keepdims=True)
    if scale == "group":
        std_Px1 = rewards_PxG.std(axis=1, keepdims=True)
        centred_PxG = centred_PxG / np.where(degenerate_P[:, None], 1.0, std_Px1)
    elif scale == "batch":
        std = rewards_PxG.std()
        centred_PxG = centred_PxG / (std if std > 0 else 1.0)
    advantages_PxG = np.where(degenerate_P[:, None], 0.0, centred_PxG)
    return advantages_PxG.astype(np.float32), degenerate_P
