"""RLHF against a reward model with the reward-hacking monitor, or resume it, from a config.

    python -m launch.rlhf --config configs/overoptimization_tiny.py --workdir runs/overopt/rlhf [--config.rlhf.stop_on_hacking=True]

The same command shape, resume and refusal of another run's checkpoints as
`launch.grpo`; the release it writes opens in `launch.chat`, the best judge's
policy is in WORKDIR/best_judge. Multi-host RLHF is not supported yet.
"""

import sys

from launch import cli
from launch.stage_flags import run_stage
from llm.stages import rlhf

if __name__ == "__main__":
    cli.main(run_stage, "python -m launch.rlhf", rlhf.run, sys.argv[1:])
