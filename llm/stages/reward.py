"""The reward model: a policy's backbone and a scalar head trained on human preference pairs (Bradley-Terry).

    python -m launch.reward --config configs/reward_tiny.py --workdir runs/reward

What is the stage's own: the pair sources (`config.data.sources`, each `{kind,
path, ...}`: `llm/data/preferences.py`), split into train and held-out pairs by
a hash of the prompt (or the OpenAssistant tree), both sides rendered in the
model's chat format; the params `{"backbone", "head"}` (`llm/reward_model.py`),
the backbone from `init_from` and trained whole or frozen
(`reward.freeze_backbone`: then only the head moves); held-out figures per
source: pairwise accuracy, the mean margin r_chosen - r_rejected, the rewards'
mean and spread, and the baseline "the longer reply wins" on the same pairs. The
loss is `reward_loss_fn` (`bradley_terry_loss`); steps, logs, checkpoints and
resume are `llm.train.loop`'s; the release is a reward-model release
(`reward_model.RewardModel.load(...).score(conversations)`).
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from llm import model, reward_model, sharding
from llm.data import pair_rows
from llm.train import loop
from llm.train.losses import reward_loss_fn
from llm.train.pairs import base_pair_config, check_pair_stage, held_out_evaluator, pair_batches
from llm.train.start import load_start

NAME = "reward"


def base_reward_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                       ) -> ml_collections.ConfigDict:
    """The pair sources (data.*) and the reward model's knobs (reward.*); configs start here."""
    config = base_pair_config(model_name, sharding_name, data_dir)
    config.reward = ml_collections.ConfigDict(dict(
        freeze_backbone=False,  # True: only the head trains (a linear probe of the backbone's last hidden state)
        center_coef=0.0,  # Eisenstein et al.'s (r_chosen + r_rejected)^2 term; 0 leaves it out
    ))
    config.optimizer.update(learning_rate=1e-5, warmup_steps=10, weight_decay=0.0)
    return config


def longer_wins(rows: pair_rows.PairRows) -> float:
    """Held-out accuracy of the baseline "the longer reply wins" (in reply tokens; a tie counts half)."""
    chosen, rejected = rows.arrays["chosen_mask"].sum(axis=1), rows.arrays["rejected_mask"].sum(axis=1)
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, rc = config.data, config.reward
    cfg, backbone, tokenizer = load_start(config)  # a fresh backbone (no init_from): tests only
    initial_params = None if backbone is None else {
        "backbone": backbone, "head": jax.tree.map(np.asarray, reward_model.init_head(cfg))}
    micro_batch = check_pair_stage(config, cfg, tokenizer)

    train_parts, val_parts, lines = pair_rows.load_sources(dc.sources, tokenizer, dc.seq_len, dc.val_fraction)
    train = pair_rows.concat_rows(train_parts)
    described = f"{len(train)} training pairs; " + "; ".join(lines)
    if jax.process_index() == 0:
        print("reward data:\n  " + "\n  ".join(lines))
    batches = pair_batches(config, train, micro_batch)

    mesh, rules = sharding.make_mesh(config.mesh), dict(config.sharding)
    loss_fn = functools.partial(reward_loss_fn, cfg, center_coef=rc.center_coef)

    val_batches = {name: pair_rows.padded_pair_batches(rows, micro_batch, jax.process_index(), jax.process_count())
                   for name, rows in val_parts.items() if len(rows)}
    baselines = {f"longer_wins/{name}": longer_wins(rows) for name, rows in val_parts.items() if len(rows)}
    held_out = held_out_evaluator(loss_fn, val_batches, mesh, rules, reward_figures)

    def evaluate(params, step: int) -> dict[str, float]:
        return held_out(params, step) | baselines

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=reward_model.param_axes(cfg),
        init_params=functools.partial(reward_model.init_params, cfg), loss_fn=loss_fn, batches=batches,
        initial_params=initial_params, frozen=("backbone",) if rc.freeze_backbone else (),
        tokens_per_step=2 * dc.batch_size * dc.seq_len, flops_per_token=model.flops_per_token(cfg, dc.seq_len),
        evaluate=evaluate, release=lambda directory, host: reward_model.save(directory, cfg, host, tokenizer),
        describe=described + (", backbone frozen" if rc.freeze_backbone else ""),
    )


run = loop.runner(NAME, build, "Trains (or resumes training) a reward model as configured.")


def reward_figures(total: dict[str, float]) -> dict[str, float]:
    """Held-out `accuracy` (chosen scored higher), `margin` (mean r_chosen - r_rejected), `loss`, and the
    rewards' `reward_mean` and `reward_std` over both sides, from the loss's sums."""
    pairs = total["pairs"]
    mean = total["reward"] / (2 * pairs)
    return {"accuracy": total["correct"] / pairs, "margin": total["margin"] / pairs, "loss": total["loss"] / pairs,
            "reward_mean": mean, "reward_std": float(np.sqrt(max(total["reward_sq"] / (2 * pairs) - mean ** 2, 0.0)))}
