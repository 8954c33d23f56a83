"""GPT-2 large (774M parameters), the shape of `gpt2-large`.

    python -m launch.describe --config configs/gpt2_774m.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="gpt2_774m", sharding="fsdp")
