"""A Llama-style model small enough to train on a laptop CPU (1.3M parameters).

    python -m launch.describe --config configs/tiny.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="tiny", sharding="fsdp")
