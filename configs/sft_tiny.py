"""Supervised fine-tuning of the tiny model into a chat assistant, on CPU in minutes.

    python -m launch.sft --config configs/sft_tiny.py --workdir runs/sft [--config.train.steps=100 ...]

Starts from the main job's release (`python -m launch.train --config configs/tiny.py
--workdir runs/tiny` first); its 4k BPE already has the chat and tool tokens. The
mixture (`sft.base_sft_config`): human conversations (OpenAssistant oasst1, English
validation trees), GSM8K with calculator calls, identity conversations (who the
assistant is) and the letter-counting task, read from ../shared/data (point them
elsewhere with --config.data.sources.NAME.path=...). Logs validation loss per
source on held-out conversations, greedy chat figures on held-out prompts and
greedy samples; `python -m launch.chat --checkpoint runs/sft/release` chats with it.
"""

from llm.stages.sft import base_sft_config


def get_config():
    config = base_sft_config(model="tiny", sharding="fsdp")
    config.init_from = "runs/tiny/release"
    config.optimizer.update(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)
    config.train.update(steps=300, log_every=10, eval_every=100, checkpoint_every=100, sample_every=100,
                        sample_tokens=64)
    return config
