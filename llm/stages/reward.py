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
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import model, reward_model, sharding
from llm.config import base_config, model_config
from llm.data import preferences as prefs
from llm.data.pipeline import HostBatches
from llm.tokenizer import Tokenizer
from llm.train import loop
from llm.train.losses import reward_loss_fn

NAME = "reward"


def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Summary:
    """Trains (or resumes training) a reward model as configured."""
    return loop.run(NAME, build, config, workdir)


def base_reward_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                       ) -> ml_collections.ConfigDict:
    """`base_config` with the pair sources (data.*) and the reward model's knobs (reward.*); configs start here."""
    config = base_config(model_name, sharding_name)
    config.data = ml_collections.ConfigDict(dict(
        # Each source: kind (jsonl, oasst, hub), path (a file, or a hub id), optionally its own val_fraction,
        # and the reader's options (`preferences.open_pairs`).
        sources=dict(
            hh_harmless=dict(kind="jsonl", path=f"{data_dir}/preference/hh_rlhf_harmless_base_test.jsonl.gz"),
            oasst=dict(kind="oasst", path=f"{data_dir}/chat/oasst1_en_validation.jsonl"),
        ),
        val_fraction=0.1,  # of each source's prompts (trees), by a hash: their pairs are held out
        seq_len=256,  # a pair with a side longer than this is dropped and counted
        batch_size=16,  # pairs per optimizer step
        tokenizer="",  # only for a fresh model (no init_from: tests)
        num_shards=0,
    ))
    config.reward = ml_collections.ConfigDict(dict(
        freeze_backbone=False,  # True: only the head trains (a linear probe of the backbone's last hidden state)
        center_coef=0.0,  # Eisenstein et al.'s (r_chosen + r_rejected)^2 term; 0 leaves it out
    ))
    config.optimizer.update(learning_rate=1e-5, warmup_steps=10, weight_decay=0.0)
    config.train.update(steps=200, log_every=10, eval_every=50, checkpoint_every=100)
    return config


def check_pair_stage(config: ml_collections.ConfigDict, cfg, tokenizer: Tokenizer) -> int:
    """The micro-batch size of a stage that trains on pairs (reward, DPO), after checking the config fits the model."""
    dc, tc = config.data, config.train
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name} has no chat format this project can render")
    if dc.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={dc.seq_len} is longer than the model's context {cfg.max_seq_len}")
    if dc.batch_size % tc.grad_accum:
        raise ValueError(f"data.batch_size={dc.batch_size} is not divisible by train.grad_accum={tc.grad_accum}")
    return dc.batch_size // tc.grad_accum


def longer_wins(rows: prefs.PairRows) -> float:
    """Held-out accuracy of the baseline "the longer reply wins" (in reply tokens; a tie counts half)."""
    chosen, rejected = rows.arrays["chosen_mask"].sum(axis=1), rows.arrays["rejected_mask"].sum(axis=1)
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, rc = config.data, config.reward
    if config.init_from:
        cfg, backbone, tokenizer = loop.load_init_from(config)
        initial_params = {"backbone": backbone, "head": jax.tree.map(np.asarray, reward_model.init_head(cfg))}
    else:  # a fresh backbone: tests only
        cfg, initial_params, tokenizer = model_config(config), None, Tokenizer.load(dc.tokenizer)
    micro_batch = check_pair_stage(config, cfg, tokenizer)

    train_parts, val_parts, lines = prefs.load_sources(dc.sources, tokenizer, dc.seq_len, dc.val_fraction)
    train = prefs.concat_rows(train_parts)
    described = f"{len(train)} training pairs; " + "; ".join(lines)
    if jax.process_index() == 0:
        print("reward data:\n  " + "\n  ".join(lines))
    num_shards = dc.num_shards or jax.process_count()
    batches = HostBatches(
        lambda i, n: prefs.pair_batches(train, batch_size=micro_batch, seed=config.seed, process_index=i,
                                        process_count=n), num_shards, jax.process_index(), jax.process_count())

    mesh, rules = sharding.make_mesh(config.mesh), dict(config.sharding)
    loss_fn = functools.partial(reward_loss_fn, cfg, center_coef=rc.center_coef)

    val_batches = {name: prefs.padded_pair_batches(rows, micro_batch, jax.process_index(), jax.process_count())
                   for name, rows in val_parts.items() if len(rows)}
    baselines = {f"longer_wins/{name}": longer_wins(rows) for name, rows in val_parts.items() if len(rows)}
    held_out = held_out_evaluator(loss_fn, val_batches, mesh, rules, reward_figures)

    def evaluate(params) -> dict[str, float]:
        return held_out(params) | baselines

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=reward_model.param_axes(cfg),
        init_params=functools.partial(reward_model.init_params, cfg), loss_fn=loss_fn, batches=batches,
        initial_params=initial_params, frozen=("backbone",) if rc.freeze_backbone else (),
        tokens_per_step=2 * dc.batch_size * dc.seq_len, flops_per_token=model.flops_per_token(cfg, dc.seq_len),
        evaluate=evaluate, release=lambda directory, host: reward_model.save(directory, cfg, host, tokenizer),
        describe=described + (", backbone frozen" if rc.freeze_backbone else ""),
    )


def held_out_evaluator(loss_fn, batches: dict[str, list[dict[str, np.ndarray]]], mesh, rules,
                       figures: Callable[[dict[str, float]], dict[str, float]]) -> Callable[[Any], dict[str, float]]:
    """params -> {"<figure>/<source>": value}: each source's held-out batches through the loss once, its
    summed loss and aux sums (`loss` and the aux keys) turned into figures by `figures`."""

    def loss_sums(params, batch):
        with sharding.use_rules(mesh, rules):
            return loss_fn(params, batch)

    sums_fn = jax.jit(loss_sums, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def evaluate(params) -> dict[str, float]:
        out = {}
        for name, source_batches in batches.items():
            total: dict[str, float] = {}
            for batch in source_batches:
                loss_sum, _, aux = jax.device_get(sums_fn(params, sharding.shard_batch(batch, mesh, rules)))
                for k, v in {"loss": loss_sum, **aux}.items():
                    total[k] = total.get(k, 0.0) + float(v)
            if total.get("pairs"):
                out |= {f"{k}/{name}": v for k, v in figures(total).items()}
        return out

    return evaluate


def reward_figures(total: dict[str, float]) -> dict[str, float]:
    """Held-out `accuracy` (chosen scored higher), `margin` (mean r_chosen - r_rejected), `loss`, and the
    rewards' `reward_mean` and `reward_std` over both sides, from the loss's sums."""
    pairs = total["pairs"]
    mean = total["reward"] / (2 * pairs)
    return {"accuracy": total["correct"] / pairs, "margin": total["margin"] / pairs, "loss": total["loss"] / pairs,
            "reward_mean": mean, "reward_std": float(np.sqrt(max(total["reward_sq"] / (2 * pairs) - mean ** 2, 0.0)))}
