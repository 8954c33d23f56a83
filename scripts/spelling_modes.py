"""Does the model think before it counts? Held-out letter counting split by whether a sample spells the word out.

    python scripts/spelling_modes.py runs/sft_spell_tiny runs/grpo

For each model (a workdir or release), GRPO's held-out problems of
`configs/grpo_tiny.py` (200 problems on test-split words, 4 samples at
temperature 1, the same seed): the share of samples that spell the word out
("s,t,r(1),... So 'r' appears ..."), and the pass rate of spelled and of direct
answers. GRPO's held-out pass@1 is the mix of the two, so this says whether it
rose because the model spells more often or because it spells better.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llm.config import load_config
from llm.generate import engine_for
from llm.stages import grpo
from llm.train import rollouts
from llm.train.start import load_init_from

CONFIG = str(Path(__file__).parents[1] / "configs" / "grpo_tiny.py")


def modes(source: str) -> str:
    config = load_config(CONFIG, [f"--config.init_from={source}"])
    rc = config.rl
    cfg, params, tokenizer = load_init_from(config)
    task = grpo.load_task(config.data)
    problems = task.problems("test", rc.eval_problems, rc.eval_seed)
    groups = rollouts.sample_problems(engine_for(cfg, params, tokenizer, rc.tools), tokenizer, problems,
                                      n=rc.eval_samples, temperature=rc.eval_temperature,
                                      max_new_tokens=rc.max_new_tokens, seed=rc.eval_seed)
    samples = [(p, s) for p, group in zip(problems, groups) for s in group]
    # " So '" opens the spelling's closing sentence; a direct answer lacks it.
    spelled_S = np.asarray([" So '" in s.text for _, s in samples])
    right_S = np.asarray([rollouts.sample_reward(task.reward, p, s, rc.require_stop) == 1.0 for p, s in samples])

    def rate(mask) -> str:
        return f"{right_S[mask].mean():.3f} of {mask.sum()}" if mask.any() else "none"

    return (f"{source}: spells {spelled_S.mean():.3f} of samples; right when spelled {rate(spelled_S)}, "
            f"when direct {rate(~spelled_S)}; all {right_S.mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="workdirs or releases (init_from)")
    for source in parser.parse_args().sources:
        print(modes(source))


if __name__ == "__main__":
    main()
