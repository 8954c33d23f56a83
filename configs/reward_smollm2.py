"""A reward model on SmolLM2-135M-Instruct's backbone (GGUF, ChatML), from human preference pairs.

    python -m launch.reward --config configs/reward_smollm2.py --workdir runs/reward_smollm2

The backbone is frozen by default (the head is a linear probe of its last hidden
state: on CPU each step is then a forward pass); on a GPU train it whole with
--config.reward.freeze_backbone=False --config.optimizer.learning_rate=1e-5.
Pairs: HH-RLHF harmless-base and oasst1's ranked siblings, as configs/reward_tiny.py.
"""

from llm.stages.reward import base_reward_config


def get_config():
    config = base_reward_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    config.reward.freeze_backbone = True
    config.data.update(seq_len=256, batch_size=8)
    config.data.sources.oasst.val_fraction = 0.3  # few oasst1 pairs fit 256 tokens: hold out more of them
    config.optimizer.update(learning_rate=1e-3, warmup_steps=5)
    config.train.update(steps=100, log_every=10, eval_every=100, checkpoint_every=100)
    return config
