"""Reward over-optimisation on CPU (Gao et al. 2022): RLHF against a proxy reward model of a hidden gold preference.

    scripts/overoptimization_tiny.sh                      # all three steps below, then the plot in the report
    python -m launch.label_pairs --config configs/overoptimization_tiny.py --out runs/overopt/pairs.jsonl
    python -m launch.reward --config configs/overoptimization_proxy_tiny.py --workdir runs/overopt/proxy
    python -m launch.rlhf --config configs/overoptimization_tiny.py --workdir runs/overopt/rlhf

The gold preference is code (`llm.stages.rlhf.gold_score`): a right letter count
first, then shorter is better. The tiny SFT policy's replies to training
prompts are labelled by it into a limited set of pairs; a proxy reward model
(the SFT backbone and a head) learns them; RLHF then optimises the proxy with a
small KL penalty while the monitor tracks the gold score on held-out prompts.
The proxy keeps rising; the gold score should peak and fall (BENCHMARKS.md,
"RLHF: reward over-optimisation").
"""

from llm.stages.rlhf import base_rlhf_config


def get_config():
    config = base_rlhf_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    config.data.task = "spelling"
    config.data.path = "../shared/data/words/words_alpha.zip"
    config.rlhf.update(reward_model="runs/overopt/proxy/release", judge="gold", gold_length_bonus=0.5, patience=3,
                       gold_problems=400)
    config.rl.update(kl_beta=0.0, max_new_tokens=64, eval_problems=100, eval_temperature=1.0)
    # A constant rate after warmup: with the default cosine decay the policy all but stops in the second half and
    # the proxy and the gold score flatten together, which hides the over-optimisation.
    config.optimizer.update(learning_rate=2e-5, warmup_steps=5, weight_decay=0.0, b2=0.99, min_learning_rate_ratio=1.0)
    config.train.update(steps=200, log_every=1, eval_every=10, checkpoint_every=50)
    return config
