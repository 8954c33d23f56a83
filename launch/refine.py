"""Refine raw Common Crawl WARC files into FineWeb-schema parquet (FineWeb's recipe on datatrove).

    python -m launch.refine --config configs/refine_fineweb.py --workdir runs/refine [--config.input.paths=GLOB ...]
    python -m launch.refine --config configs/refine_fineweb.py --workdir runs/refine --report   # report only

A rerun of the same command resumes: datatrove's completion markers skip finished tasks.
The parquet in `WORKDIR/output/` feeds `launch.train` and `launch.prepare` as it is; the drop
table is `WORKDIR/report.md` (and `stats.json`). Needs `pip install -e .[refine]`.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch import cli
from llm.config import config_from_argv
from llm.errors import UserError


def main(argv: list[str]) -> int:
    with cli.user_input():
        config, rest = config_from_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.refine")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--report", action="store_true", help="only (re)write report.md and stats.json from the logs")
    args = parser.parse_args(rest)
    cli.writable_dir(args.workdir, "--workdir")
    try:
        from llm.refine import recipe, report
    except ImportError as error:
        raise UserError(f"launch.refine needs the refine extra ({error.name} is missing): pip install -e .[refine]")
    workdir = os.path.abspath(args.workdir)
    if args.report:
        report.write(workdir)
    else:
        recipe.run(config, workdir)
    if os.path.exists(os.path.join(workdir, "stats.json")):
        print(report.summary_line(workdir))
    return 0


if __name__ == "__main__":
    cli.main(main, sys.argv[1:])
