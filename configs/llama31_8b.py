"""Llama-3.1 8B: GQA 32/8 heads, untied embeddings, RoPE scaled 8x; FSDP + tensor parallel.

    python -m launch.describe --config configs/llama31_8b.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="llama31_8b", sharding="fsdp_tp")
