"""SFT of the tiny model on a letter-counting mixture that thinks half the time: the start of GRPO.

    python -m launch.sft --config configs/sft_spell_tiny.py --workdir runs/sft_spell_tiny

`configs/sft_tiny.py` with 40,000 letter-counting conversations in the mixture
(instead of 400), half of them answered at once ("'r' appears 3 times. #### 3")
and half spelled out first ("s,t,r(1),a,w,b,e,r(2),r(3),y. So 'r' appears 3
times. #### 3"), at random (`direct_fraction=0.5`), for 1,500 steps. The
fine-tuned model then chooses for itself whether to think, about half the time:
it spells in 53% of held-out samples and is right in 86% of those, against 41%
when it answers at once, so GRPO can learn that spelling pays (DeepSeek-R1's
longer thinking, in miniature). With every conversation spelled out (an earlier
start) GRPO had nothing to choose: stopped at 500 steps the model could not
spell unseen words and guessed; at 1,000 it answered ~79% already. After 1,000
steps of this mixture it is right in 66% of its spellings, which caps what the
choice can gain below the GRPO issue's +15 points. Needs `runs/tiny/release`
(`python -m launch.train --config configs/tiny.py --workdir runs/tiny`). About
18 minutes on a 2-core CPU.
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
