"""Reinforce a chat model on a task with checkable answers (GRPO), or resume doing so, from a config.

    python -m launch.grpo --config configs/grpo_tiny.py --workdir runs/grpo [--config.train.steps=100 ...]

The same command shape, resume and refusal of another run's checkpoints as
`launch.sft`; the release it writes opens in `launch.chat`. Multi-host GRPO is not supported yet.
"""

import sys

from launch import cli
from launch.stage_flags import run_stage
from llm.stages import grpo

if __name__ == "__main__":
    cli.main(run_stage, "python -m launch.grpo", grpo.run, sys.argv[1:])
