"""Pretrain (or resume) a model from a config.

    python -m launch.train --config configs/tiny.py --workdir runs/tiny [--config.train.steps=100 ...]

On a cluster, JAX's own runtime connects the processes: `jax.distributed.initialize()`
runs when the environment names a coordinator (JAX_COORDINATOR_ADDRESS with
JAX_NUM_PROCESSES and JAX_PROCESS_ID) or a multi-task SLURM job, and each process
then feeds its own slice of the data. If a process dies, the others abort after
JAX_HEARTBEAT_TIMEOUT_SECONDS (default 100) instead of hanging.
"""

import argparse
import os
import sys

import jax

from llm.config import config_from_argv
from llm.train.loop import train


def _initialize_distributed() -> None:
    if os.environ.get("JAX_PLATFORMS") == "cpu":  # CPU processes talk through gloo (tests, laptops)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            # How long a silent peer may go before the others abort instead of waiting in a collective.
            heartbeat_timeout_seconds=int(os.environ.get("JAX_HEARTBEAT_TIMEOUT_SECONDS", "100")),
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # reads the SLURM environment


def main(argv: list[str]) -> None:
    config, rest = config_from_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.train")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(rest)
    _initialize_distributed()
    summary = train(config, args.workdir)
    print(f"done: step {summary.step}, train loss {summary.train_loss:.4f}, validation bits per byte "
          f"{summary.val_bpb} (first evaluation {summary.first_val_bpb})")


if __name__ == "__main__":
    main(sys.argv[1:])
