"""The proxy reward model of the over-optimisation experiment: the tiny SFT backbone on gold-labelled pairs.

    python -m launch.reward --config configs/overoptimization_proxy_tiny.py --workdir runs/overopt/proxy

Reads the pairs `launch.label_pairs` wrote (configs/overoptimization_tiny.py
explains the experiment); a tenth to a fifth of the prompts held out, where the log shows how
well the proxy imitates the gold preference.
"""

from llm.stages.reward import base_reward_config


def get_config():
    config = base_reward_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    # val_fraction 0.2 of the prompts by the same hash as the RL run's split: on preference-pair prompts the RL
    # run's own held-out tenth is never labelled (label_pairs draws training prompts), so this holds out the next.
    config.data.sources = dict(gold=dict(kind="jsonl", path="runs/overopt/pairs.jsonl", val_fraction=0.2))
    config.optimizer.update(learning_rate=1e-4, warmup_steps=10)
    config.train.update(steps=150, log_every=10, eval_every=50, checkpoint_every=150)
    return config
