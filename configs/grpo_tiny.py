"""GRPO of the tiny chat model on letter counting, on CPU in minutes.

    python -m launch.grpo --config configs/grpo_tiny.py --workdir runs/grpo [--config.train.steps=100 ...]

Starts from the SFT release (`python -m launch.sft --config configs/sft_tiny.py
--workdir runs/sft` first), whose mixture taught the task's format ("... #### N"),
so rewards are not all zero from the first rollout. 8 prompts x 8 samples per
step, one optimizer step per rollout; held-out pass@1 (4 samples at temperature
1) and greedy pass@1 on 200 problems of held-out words every 50 steps (BENCHMARKS.md, "GRPO": about 13 minutes
on a 2-core CPU).
`--config.data.task=arithmetic` switches the task; `--config.rl.shuffle_rewards=True` is the control.
"""

from llm.stages.grpo import base_grpo_config


def get_config():
    config = base_grpo_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    config.optimizer.update(learning_rate=2e-4, warmup_steps=5, weight_decay=0.0, b2=0.99)
    config.rl.eval_problems = 200
    config.train.update(steps=200, log_every=1, eval_every=50, checkpoint_every=50)
    return config
