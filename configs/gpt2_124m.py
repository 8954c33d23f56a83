"""GPT-2 small (124M parameters), the shape of OpenAI's `gpt2` checkpoint.

    python -m launch.describe --config configs/gpt2_124m.py [--config.model.n_layer=2 ...]
"""

from llm.config import base_config


def get_config():
    return base_config(model="gpt2_124m", sharding="fsdp")
