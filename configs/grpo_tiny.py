"""GRPO of the tiny chat model on letter counting, on CPU: the policy may spell the word out before it counts.

    python -m launch.grpo --config configs/grpo_tiny.py --workdir runs/grpo [--config.train.steps=100 ...]

Starts from the SFT model of `configs/sft_spell_tiny.py` (`python -m launch.sft
--config configs/sft_spell_tiny.py --workdir runs/sft_spell_tiny`), which spells
the word out before answering in about half its samples and answers at once
otherwise. 16 prompts x 8 samples per rollout, two optimizer steps per rollout
(mu 2), a constant 5e-5 after 5 warmup steps (a cosine decay left the second
half of a run still) and a k3 KL penalty of 0.04 to the start (at a higher rate,
or without the penalty, the policy drifts). Replies are at most ~50 tokens
("c(1),o,l,...") so the cap is 64 and rows are 112 wide (prompts are <= ~40
tokens; a longer row is an error, not a silent cut). Every 50 steps: held-out
pass@1 and pass@4 (4 samples at temperature 1), greedy pass@1 and the
completion lengths on 200 problems of held-out words, answers 0-3 a quarter
each. The mechanism, the figures and the runs that fell short are in
docs/experiments/grpo_letter_counting.md.
`--config.data.task=arithmetic` switches the task; `--config.rl.shuffle_rewards=True` is the control.
"""

from llm.stages.grpo import base_grpo_config


def get_config():
    config = base_grpo_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft_spell_tiny"
    config.data.update(prompts_per_step=16, seq_len=112)
    config.optimizer.update(learning_rate=5e-5, warmup_steps=5, weight_decay=0.0, b2=0.99,
                            min_learning_rate_ratio=1.0)  # constant after warmup
    config.rl.update(mu=2, max_new_tokens=64, kl_beta=0.04, eval_problems=200)
    config.train.update(steps=300, log_every=1, eval_every=50, checkpoint_every=50)
    return config
