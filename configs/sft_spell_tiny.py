"""SFT of the tiny model with a spelling-heavy mixture, stopped halfway: the start of GRPO on letter counting.

    python -m launch.sft --config configs/sft_spell_tiny.py --workdir runs/sft_spell_tiny

`configs/sft_tiny.py` with 40,000 letter-counting conversations in the mixture
(instead of 400), stopped at step 500 of a 1,000-step cosine schedule (the
learning rate still at 0.55x its peak). The default mixture leaves the model
guessing the count (it does not spell the word), so GRPO has little to
reinforce; run to the end of the schedule (`--config.train.steps=1000`) it
answers ~79% of held-out problems, too few left for GRPO to show; 300 steps of a
300-step schedule write random letters. Its release is `configs/grpo_tiny.py`'s
`init_from`. Needs `runs/tiny/release` (`python -m launch.train --config
configs/tiny.py --workdir runs/tiny`). About 7 minutes on a 2-core CPU.
"""

from llm.stages.sft import base_sft_config


def get_config():
    config = base_sft_config(model="tiny", sharding="fsdp")
    config.init_from = "runs/tiny/release"
    config.data.sources.spelling.n = 40_000
    config.optimizer.update(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)
    config.train.update(steps=500, log_every=10, eval_every=250, checkpoint_every=250, sample_every=500,
                        sample_tokens=64)
    # The schedule of a 1,000-step run, stopped halfway; deleting the field unties it from train.steps.
    del config.optimizer["total_steps"]
    config.optimizer.total_steps = 1000
    return config
