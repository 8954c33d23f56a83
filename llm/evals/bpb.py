"""Bits per byte: the model's loss on a text source in bits per UTF-8 byte, comparable across tokenizers.

    eval_fn = jit_eval(cfg, tokenizer, mesh, rules)
    validate(eval_fn, params, batches, max_batches, mesh, rules)   # {"val_loss", "val_bpb"}
    bits_per_byte(cfg, params, tokenizer, "sample", mesh=mesh, rules=rules)   # any text source, for launch.eval

Pretraining validates with the first two; `bits_per_byte` builds the same
validation pipeline over any source `llm.data.sources.open_source` reads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import sharding
from llm.data.host_batches import HostBatches
from llm.data.pipeline import make_pipeline
from llm.tokenizer import Tokenizer
from llm.train.losses import lm_loss


def jit_eval(cfg, tokenizer: Tokenizer, mesh, rules):
    """(summed loss over byte-carrying targets, their count, their UTF-8 bytes) of one micro-batch."""
    # Special tokens carry no text bytes and are left out of bits per byte, as nanochat does.
    token_bytes = np.zeros(cfg.vocab_size, np.float32)
    for i in range(tokenizer.n_vocab):
        if i not in tokenizer.encoding._special_tokens.values():
            token_bytes[i] = len(tokenizer.decode_bytes([i]))
    token_bytes_V = jnp.asarray(token_bytes)

    def eval_step(params, batch):
        with sharding.use_rules(mesh, rules):
            bytes_BxT = token_bytes_V[batch["targets"]]
            loss_sum, count, _ = lm_loss(cfg, params, {**batch, "loss_mask": (bytes_BxT > 0).astype(jnp.float32)})
            return loss_sum, count, bytes_BxT.sum()

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, PartitionSpec()))


def validate(eval_fn, params, val_pipeline, max_batches: int, mesh, rules) -> dict[str, float]:
    """Validation loss (nats per token) and bits per byte over the first `max_batches` micro-batches.

    Every process evaluates the same number of batches (the fewest any process
    has): a process whose shard ran out first would otherwise leave the others
    waiting in a collective.
    """
    from jax.experimental import multihost_utils

    local = [batch for _, batch in zip(range(max_batches), val_pipeline)]
    n_batches = len(local)
    if jax.process_count() > 1:
        n_batches = int(np.min(multihost_utils.process_allgather(np.int32(n_batches))))
    if not n_batches:
        raise ValueError("the validation split yielded no batch; lower data.batch_size or raise data.val_fraction")
    loss_sum = count = n_bytes = 0.0
    placement = sharding.batch_sharding(mesh, rules)
    for batch in local[:n_batches]:
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(placement, x), batch)
        s, c, b = jax.device_get(eval_fn(params, batch))
        loss_sum, count, n_bytes = loss_sum + s, count + c, n_bytes + b
    return {"val_loss": float(loss_sum / count), "val_bpb": float(loss_sum / math.log(2) / n_bytes)}


def bits_per_byte(cfg, params, tokenizer: Tokenizer, source: str, *, mesh, rules, seq_len: int | None = None,
                  batch_size: int = 8, max_batches: int = 16, val_fraction: float = 0.01) -> dict[str, float]:
    """`validate` over the validation split of `source` (its hashed `val_fraction` of documents, as in pretraining)."""
    seq_len = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)

    def shard(index: int, count: int):
        return make_pipeline(source, tokenizer, seq_len=seq_len, batch_size=batch_size, split="validation",
                             val_fraction=val_fraction, process_index=index, process_count=count)

    batches = HostBatches(shard, jax.process_count(), jax.process_index(), jax.process_count())
    return validate(jit_eval(cfg, tokenizer, mesh, rules), params, batches, max_batches, mesh, rules)
