"""Fine-tune (or resume fine-tuning) a model on conversations from a config.

    python -m launch.sft --config configs/sft_tiny.py --workdir runs/sft [--config.train.steps=100 ...]

The same command shape, resume and refusal of another run's checkpoints as
`launch.train`; the release it writes opens in `launch.chat`. Multi-host: see `launch/stage_flags.py`.
"""

import sys

from launch import cli
from launch.stage_flags import run_stage
from llm.stages import sft

if __name__ == "__main__":
    cli.main(run_stage, "python -m launch.sft", sft.run, sys.argv[1:])
