"""A Llama-3-style model (GQA, RoPE, SwiGLU, RMSNorm) of 230M parameters (95M of them embeddings) on FineWeb-Edu, with WSD schedule.

    python -m launch.train --config configs/llama3_fineweb_edu.py --workdir runs/llama3_230m

12 layers of width 768 with 12 query and 4 key/value heads, GPT-4's cl100k_base
tokenizer (vocabulary padded to 100,352), sequence 2,048 with BOS-aligned best-fit
packing and document masking, warmup-stable-decay schedule (last 20% decays),
QK-norm for stability at the higher learning rate.
"""

from llm.config import base_config


def get_config():
    config = base_config(model="tiny", sharding="fsdp")
    config.model.update(family="llama", vocab_size=100352, n_layer=12, n_embd=768, n_head=12, n_kv_head=4,
                        mlp_dim=2048, max_seq_len=2048, tie_embeddings=False, rope_theta=500_000.0, qk_norm=True)
    config.data.update(source="fineweb-edu:sample-10BT", tokenizer="cl100k_base", seq_len=2048, batch_size=256,
                       packing="bos_best_fit", worker_count=4)
    config.optimizer.update(learning_rate=1.5e-3, schedule="wsd", decay_fraction=0.2, warmup_steps=500,
                            min_learning_rate_ratio=0.0, weight_decay=0.1)
    config.train.update(steps=20_000, grad_accum=4, log_every=10, eval_every=500, eval_batches=20,
                        sample_every=2000, checkpoint_every=1000)
    return config
