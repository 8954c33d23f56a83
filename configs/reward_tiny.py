"""A reward model on the tiny SFT model's backbone, from human preference pairs, on CPU in minutes.

    python -m launch.reward --config configs/reward_tiny.py --workdir runs/reward [--config.reward.freeze_backbone=True]

Starts from the SFT release (`python -m launch.sft --config configs/sft_tiny.py
--workdir runs/sft` first). Pairs: Anthropic HH-RLHF harmless-base (test split)
and OpenAssistant oasst1's ranked sibling replies, from ../shared/data; 10% of
the HH prompts and 30% of the oasst1 trees held out. Logs held-out pairwise
accuracy per source next to the baseline "the longer reply wins"; the figures
are in docs/experiments/reward_models.md.
"""

from llm.stages.reward import base_reward_config


def get_config():
    config = base_reward_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    # At 256 tokens most oasst1 pairs are too long for the tiny model: hold out more of the few that fit.
    config.data.sources.oasst.val_fraction = 0.3
    config.optimizer.update(learning_rate=1e-4, warmup_steps=10)
    config.train.update(steps=300, log_every=10, eval_every=50, checkpoint_every=100)
    return config
