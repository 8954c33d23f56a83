"""Pretraining: next-token prediction on a text source (FineWeb, the bundled sample), through the shared driver.

    python -m launch.train --config configs/tiny.py --workdir runs/tiny

What is the stage's own: the tokenizer (a named encoding, or our BPE trained once
on the training split into the workdir), the grain pipelines, validation loss and
bits per byte, and greedy samples from fixed prompts (as llm.c prints them).
Everything else (steps, logs, checkpoints, resume, the release) is `llm.train.loop`.
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import ml_collections
import numpy as np

from llm import model, sharding
from llm.bpe import train_bpe
from llm.data.host_batches import HostBatches
from llm.data.pipeline import make_pipeline
from llm.data.sources import open_source, training_texts
from llm.evals import bpb
from llm.generate import Engine, SamplingParams
from llm.tokenizer import Tokenizer
from llm.train import loop
from llm.train.losses import lm_loss
from llm.train.start import host_batches, load_start, micro_batch_size

NAME = "pretrain"


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, tc = config.data, config.train
    cfg, initial_params, tokenizer = load_start(
        config, fresh_tokenizer=lambda: load_or_train_tokenizer(config, workdir))
    micro_batch = micro_batch_size(dc.batch_size, tc.grad_accum, "data.batch_size")

    def pipeline(split: str) -> HostBatches:
        return host_batches(config, lambda index, count: make_pipeline(
            dc.source, tokenizer, seq_len=dc.seq_len, batch_size=micro_batch, seed=config.seed, split=split,
            packing=dc.packing, val_fraction=dc.val_fraction, worker_count=dc.worker_count, process_index=index,
            process_count=count))

    mesh = sharding.make_mesh(config.mesh)
    eval_fn = bpb.jit_eval(cfg, tokenizer, mesh, dict(config.sharding))
    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=functools.partial(lm_loss, cfg),
        batches=pipeline("train"), initial_params=initial_params,
        tokens_per_step=dc.batch_size * dc.seq_len, flops_per_token=model.flops_per_token(cfg, dc.seq_len),
        evaluate=lambda params, step: bpb.validate(eval_fn, params, pipeline("validation"), tc.eval_batches,
                                                   mesh, dict(config.sharding)),
        sample=lambda params: sample_texts(cfg, params, tokenizer, list(tc.sample_prompts), tc.sample_tokens),
        describe=f"{dc.source}, sequence {dc.seq_len}, batch {dc.batch_size}",
    )


run = loop.runner(NAME, build, "Runs (or resumes) pretraining as configured.")


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


def sample_texts(cfg, params, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of fixed prompts from host params (`sharding.gather_to_host`)."""
    engine = Engine(cfg, jax.device_put(params, jax.local_devices()[0]), tokenizer)
    encoded = [[*tokenizer.prompt_start, *tokenizer.encode(p)] for p in prompts]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eot,))
    return [p + s.text for p, [s] in zip(prompts, engine.generate(encoded, sampling))]
