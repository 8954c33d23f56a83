"""Pretraining: next-token prediction on a text source (FineWeb, the bundled sample), through the shared driver.

    python -m launch.train --config configs/tiny.py --workdir runs/tiny

What is the stage's own: the tokenizer (a named encoding, or our BPE trained once
on the training split into the workdir), the grain pipelines, validation loss and
bits per byte, and greedy samples from fixed prompts (as llm.c prints them).
Everything else (steps, logs, checkpoints, resume, the release) is `llm.train.loop`.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import model, sharding
from llm.config import model_config
from llm.data.pipeline import HostBatches, make_pipeline
from llm.data.sources import open_source, training_texts
from llm.generate import Engine, SamplingParams
from llm.tokenizer import Tokenizer, train_bpe
from llm.train import loop
from llm.train.losses import lm_loss

NAME = "pretrain"


def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Summary:
    """Runs (or resumes) pretraining as configured."""
    return loop.run(NAME, build, config, workdir)


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, tc = config.data, config.train
    if config.init_from:
        cfg, initial_params, tokenizer = loop.load_init_from(config)
    else:
        cfg, initial_params, tokenizer = model_config(config), None, load_or_train_tokenizer(config, workdir)
    if tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids but model.vocab_size is "
                         f"{cfg.vocab_size}; set --config.model.vocab_size={tokenizer.n_vocab} or larger")
    if dc.batch_size % tc.grad_accum:
        raise ValueError(f"data.batch_size={dc.batch_size} is not divisible by train.grad_accum={tc.grad_accum}")
    micro_batch = dc.batch_size // tc.grad_accum
    num_shards = dc.num_shards or jax.process_count()

    def pipeline(split: str) -> HostBatches:
        def shard(index: int, count: int):
            return make_pipeline(dc.source, tokenizer, seq_len=dc.seq_len, batch_size=micro_batch,
                                 seed=config.seed, split=split, packing=dc.packing, val_fraction=dc.val_fraction,
                                 worker_count=dc.worker_count, process_index=index, process_count=count)

        return HostBatches(shard, num_shards, jax.process_index(), jax.process_count())

    mesh = sharding.make_mesh(config.mesh)
    eval_fn = _jit_eval(cfg, tokenizer, mesh, dict(config.sharding))
    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=functools.partial(lm_loss, cfg),
        batches=pipeline("train"), initial_params=initial_params,
        tokens_per_step=dc.batch_size * dc.seq_len, flops_per_token=model.flops_per_token(cfg, dc.seq_len),
        evaluate=lambda params: validate(eval_fn, params, pipeline("validation"), tc.eval_batches, mesh,
                                         dict(config.sharding)),
        sample=lambda params: sample_texts(cfg, params, tokenizer, list(tc.sample_prompts), tc.sample_tokens),
        describe=f"{dc.source}, sequence {dc.seq_len}, batch {dc.batch_size}",
    )


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """`data.tokenizer` by name or path; `train:VOCAB` trains our BPE on the training split once, into workdir.

    With several processes only process 0 trains and writes it; the others receive
    its files (a shared workdir is not assumed).
    """
    spec = config.data.tokenizer
    if not spec.startswith("train:"):
        return Tokenizer.load(spec)
    path = os.path.join(workdir, "tokenizer.tiktoken")
    if jax.process_index() == 0 and not os.path.exists(path):
        source = open_source(config.data.source)
        train_bpe(training_texts(source, config.data.val_fraction), int(spec.split(":")[1]), name="bpe").save(path)
    if jax.process_count() == 1:
        return Tokenizer.load(path)
    files = [path, path.replace(".tiktoken", ".json")]
    blobs = [_broadcast_bytes(open(f, "rb").read() if jax.process_index() == 0 else None) for f in files]
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, "tokenizer.tiktoken")
        for name, blob in zip([local, local.replace(".tiktoken", ".json")], blobs):
            with open(name, "wb") as f:
                f.write(blob)
        return Tokenizer.load(local)


def _broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's bytes on every process."""
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data) if data is not None else 0)))
    buffer = np.frombuffer(data, np.uint8) if data is not None else np.zeros(size, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def _jit_eval(cfg, tokenizer: Tokenizer, mesh, rules):
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


def sample_texts(cfg, params, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of fixed prompts from host params (`sharding.gather_to_host`)."""
    engine = Engine(cfg, jax.device_put(params, jax.local_devices()[0]), tokenizer)
    encoded = [[*tokenizer.document_start, *tokenizer.encode(p)] for p in prompts]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eot,))
    return [p + s.text for p, [s] in zip(prompts, engine.generate(encoded, sampling))]
