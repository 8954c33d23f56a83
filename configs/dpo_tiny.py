"""DPO of the tiny SFT model on human preference pairs, on CPU in minutes.

    python -m launch.dpo --config configs/dpo_tiny.py --workdir runs/dpo [--config.dpo.beta=0.1 ...]

Starts from the SFT release (`python -m launch.sft --config configs/sft_tiny.py
--workdir runs/sft` first), which is also the reference: its log-probabilities of
every pair are computed once before the first step. Pairs: Anthropic HH-RLHF
harmless-base (test split) and OpenAssistant oasst1's ranked siblings from
../shared/data, 10% of the prompts held out. Logs the held-out implicit reward
margin and the chosen and rejected replies' log-probabilities; the figures are in
docs/experiments/dpo.md.
"""

from llm.stages.dpo import base_dpo_config


def get_config():
    config = base_dpo_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    config.data.sources.oasst.val_fraction = 0.3  # as configs/reward_tiny.py: few oasst1 pairs fit 256 tokens
    config.optimizer.update(learning_rate=5e-5, warmup_steps=10)
    config.train.update(steps=200, log_every=10, eval_every=50, checkpoint_every=100)
    return config
