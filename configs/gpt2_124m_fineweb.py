"""GPT-2 124M on FineWeb 10B tokens, llm.c's recipe: 524,288 tokens per step, sequence 1,024, target val loss 3.28.

    python -m launch.train --config configs/gpt2_124m_fineweb.py --workdir runs/gpt2_124m [--config.mesh.fsdp=8]

19,073 steps of 512 x 1,024 tokens (10B tokens, one pass of FineWeb's sample-10BT),
AdamW lr 6e-4 with 700 warmup steps and cosine decay to 10%, weight decay 0.1,
gradient clipping 1.0, vocabulary padded to 50,304 (a multiple of 128) for speed.
The global batch is split into grad_accum micro-batches; 8 x 64 sequences fits
8 x 80 GB GPUs in bf16 without remat.
"""

from llm.config import base_config


def get_config():
    config = base_config(model="gpt2_124m", sharding="fsdp")
    config.model.update(vocab_size=50304)
    config.data.update(source="fineweb:sample-10BT", tokenizer="gpt2", seq_len=1024, batch_size=512,
                       worker_count=4)
    config.optimizer.update(learning_rate=6e-4, warmup_steps=700, min_learning_rate_ratio=0.1, weight_decay=0.1,
                            b1=0.9, b2=0.95, grad_clip=1.0)
    config.train.update(steps=19_073, grad_accum=8, log_every=10, eval_every=250, eval_batches=20,
                        sample_every=1000, checkpoint_every=1000)
    return config
