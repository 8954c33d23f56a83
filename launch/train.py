"""Pretrain (or resume) a model from a config.

    python -m launch.train --config configs/tiny.py --workdir runs/tiny [--config.train.steps=100 ...]

Interrupted runs resume from the newest complete checkpoint in the workdir; a
workdir whose checkpoints belong to another run (another model, say) is refused
before anything is written. Multi-host: see `launch/stage_flags.py`.
"""

import sys

from launch import cli
from launch.stage_flags import run_stage
from llm.stages import pretrain

if __name__ == "__main__":
    cli.main(run_stage, "python -m launch.train", pretrain.run, sys.argv[1:])
