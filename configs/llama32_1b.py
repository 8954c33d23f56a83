"""Llama-3.2 1B: GQA 32/8 heads, tied embeddings, RoPE scaled 32x (Llama-3.1 rule).

    python -m launch.describe --config configs/llama32_1b.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="llama32_1b", sharding="fsdp")
