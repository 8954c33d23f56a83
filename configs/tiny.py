"""A Llama-style model small enough to train on a laptop CPU: our 4k BPE + 1.3M parameters on the bundled sample.

    python -m launch.train --config configs/tiny.py --workdir runs/tiny [--config.train.steps=100 ...]

Trains the tokenizer on the bundled FineWeb-schema sample first (once, into the
workdir), then pretrains, printing validation bits per byte and greedy samples.
"""

from llm.config import base_config


def get_config():
    config = base_config(model="tiny", sharding="fsdp")
    config.data.update(tokenizer="train:4096", seq_len=256, batch_size=16)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
    config.train.update(steps=500, log_every=25, eval_every=100, eval_batches=8, sample_every=250,
                        checkpoint_every=100)
    return config
