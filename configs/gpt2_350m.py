"""GPT-2 medium (350M parameters), the shape of `gpt2-medium`.

    python -m launch.describe --config configs/gpt2_350m.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="gpt2_350m", sharding="fsdp")
