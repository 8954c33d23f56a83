"""SFT of the tiny model on a letter-counting mixture that thinks half the time: the start of GRPO.

    python -m launch.sft --config configs/sft_spell_tiny.py --workdir runs/sft_spell_tiny

`configs/sft_tiny.py` with 40,000 letter-counting conversations in the mixture
(instead of 400), half of them answered at once ("'r' appears 3 times. #### 3")
and half spelled out first ("s,t,r(1),a,w,b,e,r(2),r(3),y. So 'r' appears 3
times. #### 3"), at random (`direct_fraction=0.5`), for 1,500 steps. The
fine-tuned model then chooses for itself whether to think, so GRPO
(`configs/grpo_tiny.py`) can learn that spelling pays (DeepSeek-R1's longer
thinking, in miniature); how well it spells bounds what that choice can gain.
The figures, and the starts that fell short (every conversation spelled out,
fewer steps), are in docs/experiments/grpo_letter_counting.md. Needs
`runs/tiny/release` (`python -m launch.train --config configs/tiny.py --workdir
runs/tiny`).
"""

from llm.stages.sft import base_sft_config


def get_config():
    config = base_sft_config(model="tiny", sharding="fsdp")
    config.init_from = "runs/tiny/release"
    config.data.sources.spelling.update(n=40_000, direct_fraction=0.5)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)
    config.train.update(steps=1500, log_every=10, eval_every=250, checkpoint_every=250, sample_every=500,
                        sample_tokens=64)
    return config
