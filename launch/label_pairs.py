"""Label pairs of a policy's replies with a task's gold preference: data for a proxy reward model.

    python -m launch.label_pairs --config configs/overoptimization_tiny.py --out runs/overopt/pairs.jsonl \
        [--prompts 300 --samples 4 --seed 0] [--config.init_from=runs/sft/release ...]

Samples `--samples` replies of the config's starting policy (`init_from`) to
`--prompts` training prompts of its task (`data.task`) and writes every two
replies with different gold scores as a preference pair (`rlhf.gold`: a reward
model's release, or "rule", `llm.stages.rlhf.gold_score` on a verifiable task),
JSONL that `launch.reward` reads (`kind: jsonl`).
"""

import argparse
import json
import os
import sys

from launch import cli
from llm.config import config_from_argv
from llm.stages import rlhf


def main(argv: list[str]) -> None:
    with cli.user_input():
        config, rest = config_from_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.label_pairs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(rest)
    cli.writable_file(args.out, "--out")
    records = rlhf.label_pairs(config, args.prompts, args.samples, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(args.out + ".tmp", args.out)
    chosen = [r["gold_chosen"] for r in records]
    print(f"wrote {len(records)} pairs from {args.prompts} prompts x {args.samples} replies to {args.out}"
          + (f"; mean gold score chosen {sum(chosen) / len(chosen):.3f}, rejected "
             f"{sum(r['gold_rejected'] for r in records) / len(records):.3f}" if records else ""))


if __name__ == "__main__":
    cli.main(main, sys.argv[1:])
