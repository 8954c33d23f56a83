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
import importlib.util
from pathlib import Path

import numpy as np

from llm.generate import Engine, SamplingParams
from llm.tasks import spelling
from llm.train import loop


def grpo_tiny_config():
    spec = importlib.util.spec_from_file_location("grpo_tiny", Path(__file__).parents[1] / "configs" / "grpo_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def modes(source: str) -> str:
    config = grpo_tiny_config()
    config.init_from = source
    cfg, params, tokenizer = loop.load_init_from(config)
    problems = spelling.problems(spelling.read_words(config.data.path), config.rl.eval_problems, split="test",
                                 seed=config.rl.eval_seed)
    engine = Engine(cfg, params, tokenizer)
    sampling = SamplingParams(max_new_tokens=config.rl.max_new_tokens, temperature=config.rl.eval_temperature,
                              n=config.rl.eval_samples, seed=config.rl.eval_seed,
                              stop_token_ids=tuple(dict.fromkeys((tokenizer.end_of_turn, tokenizer.eot))))
    spelled, right = [], []
    prompts = [tokenizer.render_for_completion(p.messages) for p in problems]
    for start in range(0, len(prompts), 64):
        for problem, group in zip(problems[start:], engine.generate(prompts[start:start + 64], sampling)):
            for sample in group:
                spelled.append(" So '" in sample.text)  # the spelling's closing sentence; a direct answer lacks it
                right.append(sample.finish_reason == "stop" and spelling.grade(problem, sample.text))
    spelled_S, right_S = np.asarray(spelled), np.asarray(right)

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
