"""Reward over-optimisation on CPU (Gao et al. 2022): RLHF against a proxy reward model of a hidden gold preference.

    bash scripts/overoptimization_tiny.sh               # all three steps below, then the plot in the report
    python -m launch.label_pairs --config configs/overoptimization_tiny.py --out runs/overopt/pairs.jsonl
    python -m launch.reward --config configs/overoptimization_proxy_tiny.py --workdir runs/overopt/proxy
    python -m launch.rlhf --config configs/overoptimization_tiny.py --workdir runs/overopt/rlhf

Gao et al.'s synthetic setup at the tiny scale: the gold preference is a reward
model trained on human pairs (`runs/reward/release`, from `launch.reward
--config configs/reward_tiny.py`), standing in for the humans. The tiny SFT
policy's replies to HH-RLHF harmless-base prompts are labelled by it into a few
hundred pairs; a proxy reward model, a linear probe of the SFT backbone
(configs/overoptimization_proxy_tiny.py), learns them; RLHF optimises the proxy
without a KL penalty, at a constant rate (with the default cosine decay the
policy all but stops in the second half and both curves flatten together).
The monitor's judge is the gold on 245 held-out prompts; `eval/gold` is the gold
on the other 250 held-out prompts, which the monitor never sees, the curve to check its
choice against. The figures, and what they do not show yet, are in
docs/experiments/overoptimization.md.

The gold can instead be a rule on a verifiable task (`rlhf.gold_score`: a right
letter count, the shorter the better): `--config.data.task=spelling
--config.data.path=../shared/data/words/words_alpha.zip --config.rlhf.gold=rule`.
"""

from llm.stages.rlhf import base_rlhf_config


def get_config():
    config = base_rlhf_config(model_name="tiny", sharding_name="fsdp")
    config.init_from = "runs/sft/release"
    config.data.seq_len = 256  # HH prompts longer than 256 - 64 tokens are left out
    # 30% of the HH prompts held out, so that the judge's and the gold's standard errors are small enough to show a
    # fall: the 495 that fit, 245 for the monitor's judge and the other 250 for the gold curve.
    config.data.held_out_fraction = 0.3
    config.rlhf.update(reward_model="runs/overopt/proxy/release", judge="gold", gold="runs/reward/release",
                       patience=3, gold_problems=250)
    config.rl.update(kl_beta=0.0, max_new_tokens=64, eval_problems=245, eval_temperature=1.0)
    config.optimizer.update(learning_rate=2e-5, warmup_steps=5, weight_decay=0.0, b2=0.99, min_learning_rate_ratio=1.0)
    config.train.update(steps=250, log_every=1, eval_every=10, checkpoint_every=50)
    return config
