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
from typing import Callable

import jax
import ml_collections

from launch import cli
from llm import sharding
from llm.config import config_from_argv, model_config
from llm.train.loop import Summary
from llm.train.optimizer import make_optimizer


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


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects a config whose model, mesh, sharding or optimizer cannot be built, before any work."""
    with cli.user_input():
        if not config.get("init_from"):  # otherwise the model is the one init_from holds
            model_config(config)
        sharding.make_mesh(config.mesh)
        sharding.check_rules(dict(config.sharding))
        make_optimizer(config.optimizer, {})  # the name and the schedule; no parameters needed


def run_stage(prog: str, run: Callable[[ml_collections.ConfigDict, str], Summary], argv: list[str]) -> None:
    """Parses the config and workdir, joins the cluster, runs the stage, prints its summary.

    Run it under `cli.main`, which turns a mistake (a config typo, an unwritable workdir,
    another run's checkpoints in it) into one `error:` line.
    """
    with cli.user_input():
        config, rest = config_from_argv(argv)
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(rest)
    cli.writable_dir(args.workdir, "--workdir")
    initialize_distributed()
    check_config(config)
    summary = run(config, args.workdir)
    evals = ", ".join(f"{k} {v:.4f} (first {summary.first_evals.get(k, float('nan')):.4f})"
                      for k, v in summary.evals.items())
    print(f"done: step {summary.step}, train loss {summary.train_loss:.4f}" + (f", {evals}" if evals else ""))
