"""What every stage's command shares (not a command itself, like `sampling_flags` for the sampling commands).

`launch.train`, `launch.sft`, ... are `python -m launch.<stage> --config configs/<name>.py --workdir DIR`.

On a cluster, JAX's own runtime connects the processes: `jax.distributed.initialize()`
runs when the environment names a coordinator (JAX_COORDINATOR_ADDRESS with
JAX_NUM_PROCESSES and JAX_PROCESS_ID) or a multi-task SLURM job, and each process
then feeds its own slice of the data. If a process dies, the others abort after
JAX_HEARTBEAT_TIMEOUT_SECONDS (default 100) instead of hanging.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import jax
import ml_collections

from llm.config import config_from_argv
from llm.train.loop import ResumeMismatch, Summary


def initialize_distributed() -> None:
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


def run_stage(prog: str, run: Callable[[ml_collections.ConfigDict, str], Summary], argv: list[str]) -> None:
    """Parses the config and workdir, joins the cluster, runs the stage, prints its summary."""
    config, rest = config_from_argv(argv)
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(rest)
    initialize_distributed()
    try:
        summary = run(config, args.workdir)
    except ResumeMismatch as error:
        sys.exit(f"error: {error}")
    evals = ", ".join(f"{k} {v:.4f} (first {summary.first_evals.get(k, float('nan')):.4f})"
                      for k, v in summary.evals.items())
    print(f"done: step {summary.step}, train loss {summary.train_loss:.4f}" + (f", {evals}" if evals else ""))
