"""Train a reward model on preference pairs (Bradley-Terry), or resume doing so, from a config.

    python -m launch.reward --config configs/reward_tiny.py --workdir runs/reward [--config.train.steps=100 ...]

The same command shape, resume and refusal of another run's checkpoints as
`launch.sft`; the release it writes loads with `llm.reward_model.RewardModel.load`.
"""

import sys

from launch import cli
from launch.stage_flags import run_stage
from llm.stages import reward

if __name__ == "__main__":
    cli.main(run_stage, "python -m launch.reward", reward.run, sys.argv[1:])
