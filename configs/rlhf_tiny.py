"""RLHF of the tiny SFT model against the reward model trained on human preference pairs, on CPU.

    python -m launch.rlhf --config configs/rlhf_tiny.py --workdir runs/rlhf

Needs the SFT release and a reward model (`python -m launch.reward --config
configs/reward_tiny.py --workdir runs/reward`). Prompts: the HH-RLHF
harmless-base prompts (10% held out for the monitor's evaluations). Without a
judge the monitor logs the proxy, KL, length and distinct-n only; give a second
reward model trained on other pairs with --config.rlhf.judge=PATH.
"""

from llm.stages.rlhf import base_rlhf_config


def get_config():
    config = base_rlhf_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    config.rlhf.reward_model = "runs/reward/release"
    config.data.seq_len = 256
    config.rl.update(max_new_tokens=64, eval_problems=64)
    config.optimizer.update(learning_rate=5e-5, warmup_steps=5, weight_decay=0.0, b2=0.99)
    config.train.update(steps=100, log_every=1, eval_every=10, checkpoint_every=50)
    return config
