"""What the stages that train on preference pairs share (the reward model, DPO): their data, checks and held-out sums.

    config = base_pair_config("tiny", "fsdp")               # data.sources: the pair files, split by prompt
    micro_batch = check_pair_stage(config, cfg, tokenizer)
    train, val_parts, lines = pair_rows.load_sources(...); batches = pair_batches(config, train, micro_batch)
    evaluate = held_out_evaluator(loss_fn, val_batches, mesh, rules, figures)   # (params, step) -> figures
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import sharding
from llm.config import base_config
from llm.data import pair_rows
from llm.errors import UserError
from llm.tokenizer import Tokenizer
from llm.train.start import host_batches, micro_batch_size


def base_pair_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                     ) -> ml_collections.ConfigDict:
    """`base_config` with the pair sources (data.*); the reward and DPO configs start here."""
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
    config.train.update(steps=200, log_every=10, eval_every=50, checkpoint_every=100)
    return config


def check_pair_stage(config: ml_collections.ConfigDict, cfg, tokenizer: Tokenizer) -> int:
    """The micro-batch size of a stage that trains on pairs, after checking the config fits the model."""
    if tokenizer.chat_template is None:
        raise UserError(f"{tokenizer.name} has no chat format this project can render")
    if config.data.seq_len > cfg.max_seq_len:
        raise UserError(f"data.seq_len={config.data.seq_len} is longer than the model's context {cfg.max_seq_len}")
    return micro_batch_size(config.data.batch_size, config.train.grad_accum, "data.batch_size")


def pair_batches(config: ml_collections.ConfigDict, train: pair_rows.PairRows, micro_batch: int):
    """This process's training micro-batches of pairs, in the order the seed draws."""
    return host_batches(config, lambda i, n: pair_rows.pair_batches(train, batch_size=micro_batch, seed=config.seed,
                                                                process_index=i, process_count=n))


def held_out_evaluator(loss_fn, batches: dict[str, list[dict[str, np.ndarray]]], mesh, rules,
                       figures: Callable[[dict[str, float]], dict[str, float]]
                       ) -> Callable[[Any, int], dict[str, float]]:
    """(params, step) -> {"<figure>/<source>": value}: each source's held-out batches through the loss once, its
    summed loss and aux sums (`loss` and the aux keys) turned into figures by `figures`."""

    def loss_sums(params, batch):
        with sharding.use_rules(mesh, rules):
            return loss_fn(params, batch)

    sums_fn = jax.jit(loss_sums, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def evaluate(params, step: int) -> dict[str, float]:
        del step
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
