"""Fine-tune a policy on preference pairs with DPO, or resume doing so, from a config.

    python -m launch.dpo --config configs/dpo_tiny.py --workdir runs/dpo [--config.dpo.beta=0.1 ...]

The same command shape, resume and refusal of another run's checkpoints as
`launch.sft`; the release it writes opens in `launch.chat`.
"""

import sys

from launch import cli
from launch.stage_flags import run_stage
from llm.stages import dpo

if __name__ == "__main__":
    cli.main(run_stage, "python -m launch.dpo", dpo.run, sys.argv[1:])
