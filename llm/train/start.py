"""What every stage starts from: the model (`init_from`'s or a fresh one), its tokenizer, and its data batches.

    cfg, initial_params, tokenizer = load_start(config, chat=True)
    micro_batch = micro_batch_size(config.data.batch_size, config.train.grad_accum, "data.batch_size")
    batches = host_batches(config, lambda index, count: make_pipeline(..., process_index=index, process_count=count))

A stage's own file then only says what is its own (its data, its loss, its
figures); these checks read the same in every stage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from llm import model
from llm.checkpoint import Checkpointer
from llm.config import EXECUTION_FIELDS, ModelConfig, model_config
from llm.data.host_batches import HostBatches
from llm.errors import UserError
from llm.release import load_release
from llm.tokenizer import Tokenizer


def load_init_from(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Any, Tokenizer]:
    """(model config, host params, tokenizer) of `config.init_from`: params only, no optimizer or data state.

    A training workdir gives its newest readable checkpoint; anything else goes to
    `load_release` (our release directories, Hugging Face directories and hub ids).
    The released model is used as it is, with this config's execution knobs
    (`model.remat`, `dtype`, ...) and the release's own tokenizer.
    """
    source = config.init_from
    knobs = {k: config.model[k] for k in EXECUTION_FIELDS}
    if os.path.isdir(os.path.join(source, "checkpoints")):
        checkpointer = Checkpointer(os.path.join(source, "checkpoints"), keep=1_000_000)
        try:
            saved = checkpointer.saved_run()
            if saved is None:
                raise FileNotFoundError(f"init_from={source!r}: the workdir has no readable checkpoint")
            _, saved_config, _ = saved
            cfg = dataclasses.replace(model_config(saved_config), **knobs)
            abstract = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
            single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            step, params = checkpointer.restore_params(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), abstract))
            tokenizer = checkpointer.restore_tokenizer(step)
        finally:
            checkpointer.close()
        print(f"init_from: step {step} of {source}")
    else:
        cfg, params, tokenizer = load_release(source)
        cfg = dataclasses.replace(cfg, **knobs)
        print(f"init_from: {source}")
    return cfg, jax.tree.map(np.asarray, params), tokenizer


def load_start(config: ml_collections.ConfigDict, *, chat: bool = False,
               fresh_tokenizer: Callable[[], Tokenizer] | None = None) -> tuple[ModelConfig, Any, Tokenizer]:
    """(model config, host params or None, tokenizer) a stage starts from.

    With `init_from`, that model and its own tokenizer; without, a fresh model of
    `config.model` (None params: the driver initialises them sharded) and the
    tokenizer `fresh_tokenizer()` gives, by default `data.tokenizer`. With `chat`,
    a tokenizer without a chat format this project can render is refused.
    """
    if config.init_from:
        cfg, initial_params, tokenizer = load_init_from(config)
    else:
        cfg, initial_params = model_config(config), None
        tokenizer = fresh_tokenizer() if fresh_tokenizer is not None else Tokenizer.load(config.data.tokenizer)
    if chat and tokenizer.chat_template is None:
        raise UserError(f"{tokenizer.name} has no chat format this project can render")
    if initial_params is None and tokenizer.n_vocab > cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids but model.vocab_size is "
                         f"{cfg.vocab_size}; set --config.model.vocab_size={tokenizer.n_vocab} or larger")
    return cfg, initial_params, tokenizer


def micro_batch_size(rows: int, grad_accum: int, what: str) -> int:
    """Rows per micro-batch: `rows` per optimizer step (named `what` in the error) in `grad_accum` equal parts."""
    if rows % grad_accum:
        raise UserError(f"{what}={rows} is not divisible by train.grad_accum={grad_accum}")
    return rows // grad_accum


def host_batches(config: ml_collections.ConfigDict, shard: Callable[[int, int], Any]) -> HostBatches:
    """This process's batches: `shard(index, count)` over `data.num_shards` data shards (default: one a process)."""
    num_shards = config.data.num_shards or jax.process_count()
    return HostBatches(shard, num_shards, jax.process_index(), jax.process_count())
