"""The proxy reward model of the over-optimisation experiment: a linear probe of the tiny SFT backbone on gold pairs.

    python -m launch.reward --config configs/overoptimization_proxy_tiny.py --workdir runs/overopt/proxy

Reads the pairs `launch.label_pairs` wrote (configs/overoptimization_tiny.py
explains the experiment). The backbone is frozen: a proxy of less capacity than
the gold, as Gao et al. (2022) find smaller proxies over-optimised sooner
(docs/experiments/overoptimization.md has the whole-model proxy it replaced). A
tenth of the prompts (beyond the RL run's held-out ones) is held out, where the
log shows how well the proxy imitates the gold preference.
"""

from llm.stages.reward import base_reward_config


def get_config():
    config = base_reward_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    config.reward.freeze_backbone = True
    # val_fraction 0.4 of the prompts by the same hash as the RL run's split: the RL run's own held-out 30%
    # (data.held_out_fraction) is never labelled (label_pairs draws training prompts), so this holds out the next 10%.
    config.data.sources = dict(gold=dict(kind="jsonl", path="runs/overopt/pairs.jsonl", val_fraction=0.4))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=10)
    config.train.update(steps=150, log_every=10, eval_every=50, checkpoint_every=150)
    return config
