"""The report card: every task's figures in `report.json` and as a Markdown table in `report.md` (its own section)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

# Figures that are counts, shown as they are; any other number is a fraction shown to 4 places.
COUNTS = ("items", "problems", "samples", "truncated", "tokens", "bytes")


def table(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown row per task and figure: | task | figure | value |."""
    lines = ["| task | figure | value |", "|---|---|---|"]
    for task, figures in tasks.items():
        for name, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown = str(value) if name in COUNTS else f"{value:.4f}"
                lines.append(f"| {task} | {name} | {shown} |")
    return "\n".join(lines)


SECTION = "## Report card"


def write_report(directory: str, tasks: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> tuple[str, str]:
    """Writes `report.json` ({"meta", "tasks"}) and the report card section of `report.md` in `directory`.

    The run folder's `report.md` is the training stage's report: the card replaces
    its own section (from `SECTION` to the end) and keeps everything above it.
    """
    os.makedirs(directory, exist_ok=True)
    json_path, md_path = os.path.join(directory, "report.json"), os.path.join(directory, "report.md")
    with open(json_path, "w") as f:
        json.dump({"meta": dict(meta), "tasks": {k: dict(v) for k, v in tasks.items()}}, f, indent=2)
    kept = ""
    if os.path.exists(md_path):
        with open(md_path) as f:
            kept = f.read().split(SECTION, 1)[0].rstrip()
        kept = kept + "\n\n" if kept else ""
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    with open(md_path, "w") as f:
        f.write(f"{kept}{SECTION}\n\n{header}\n\n{table(tasks)}\n")
    return json_path, md_path
