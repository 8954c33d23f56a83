"""GPT-2 XL (1.5B parameters), the shape of `gpt2-xl`.

    python -m launch.describe --config configs/gpt2_1558m.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="gpt2_1558m", sharding="fsdp")
