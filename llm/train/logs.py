"""What a run leaves to read: `metrics.jsonl` and TensorBoard events per step, `loss.png` and `report.md` at the end."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

from llm import model


class Writers:
    """metrics.jsonl and TensorBoard, written only by process 0; a resume drops rows past its step."""

    def __init__(self, workdir: str, resumed_step: int):
        from tensorboardX import SummaryWriter

        self.active = jax.process_index() == 0
        if not self.active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if resumed_step and os.path.exists(path):
            # Steps after the checkpoint are replayed; keeping their old rows would log them twice.
            with open(path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(rows)
            os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.active:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()




def first_logged(workdir: str) -> dict[str, float]:
    """The evaluation logged at step 0 by the run that started the workdir."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        row = next((row for row in map(json.loads, f) if row["step"] == 0), {"step": 0})
    return {k: v for k, v in row.items() if k != "step"}




def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def metric_rows(workdir: str) -> list[dict[str, Any]]:
    """Every row of the run's metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def pyplot():
    """matplotlib's pyplot drawing to files (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, workdir: str, name: str, caption: str = "", note: str = "") -> None:
    """Writes `fig` to workdir/name and closes it; with a caption, report.md (when written) gains `note` and the
    picture."""
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, name), dpi=100)
    pyplot().close(fig)
    report = os.path.join(workdir, "report.md")
    if caption and os.path.exists(report):
        with open(report, "a") as f:
            f.write(f"{note}\n![{caption}]({name})\n")


def write_report(workdir: str, stage_name: str, stage: Any, summary: Any) -> None:
    """loss.png from metrics.jsonl and a short report.md."""
    rows = metric_rows(workdir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    save_figure(fig, workdir, "loss.png")
    cfg = stage.cfg
    evals = "".join(f"- {k}: {v:.4f} (first evaluation: {summary.first_evals.get(k, math.nan):.4f})\n"
                    for k, v in summary.evals.items())
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(
            f"# {stage_name} report\n\n"
            f"- model: {cfg.family}, {model.count_params(cfg):,} parameters, {cfg.n_layer} layers, width {cfg.n_embd}\n"
            + (f"- data: {stage.describe}\n" if stage.describe else "")
            + f"- steps: {summary.step}\n- final train loss: {summary.train_loss:.4f}\n{evals}\n![loss](loss.png)\n"
        )
