"""Watching for reward hacking: the reward-hacking monitor, the best judge's policy kept on disk, distinct-n.

The monitor (`HackingMonitor`) sees the proxy and a judge at each evaluation and
raises the alarm when the proxy keeps rising while the judge falls beyond its
noise (Gao et al. 2022's over-optimisation, watched for online). `BestJudge`
keeps the policy of the best judge score as a release in `best_judge/`, always
one of a step the run's checkpoints lead to: a resumed run forgets the bests of
the steps it replays, as the monitor's state (saved with each checkpoint) does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import numpy as np

from llm.release import save_release


@dataclasses.dataclass
class HackingMonitor:
    """Watches the proxy and the judge at each evaluation; remembers the best judge and raises the alarm.

    The alarm: `patience` evaluations in a row where the proxy is above its value
    at the best judge score and the judge is below that best by more than
    `tolerance` plus `z` standard errors of the difference (each judge score is a
    mean over held-out prompts, so a drop within its noise does not count). A new
    best judge score after an alarm withdraws it (the log says so); every alarm
    stays in `alarms`.
    """

    patience: int
    tolerance: float = 0.0
    z: float = 1.64
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best: dict[str, float] | None = None
    alarm: dict[str, float] | None = None
    alarms: list[dict[str, float]] = dataclasses.field(default_factory=list)
    streak: int = 0

    def update(self, step: int, proxy: float, judge: float, judge_se: float = 0.0) -> tuple[bool, str]:
        """(is this the best judge so far, a message for the log when the alarm goes off or is withdrawn, else "")."""
        point = {"step": step, "proxy": proxy, "judge": judge, "judge_se": judge_se}
        self.history.append(point)
        if self.best is None or judge > self.best["judge"]:
            message = ""
            if self.alarm is not None:
                message = (f"the judge recovered: a new best {judge:.4f} at step {step}; the reward-hacking alarm of "
                           f"step {self.alarm['step']} is withdrawn")
                self.alarm = None
            self.best, self.streak = point, 0
            return True, message
        margin = self.tolerance + self.z * float(np.hypot(self.best["judge_se"], judge_se))
        hacked = proxy > self.best["proxy"] and judge < self.best["judge"] - margin
        self.streak = self.streak + 1 if hacked else 0
        if self.streak >= self.patience and self.alarm is None:
            self.alarm = point
            self.alarms.append(point)
            return False, (f"reward hacking: for {self.streak} evaluations the proxy rose above "
                           f"{self.best['proxy']:.4f} (its value at the best judge score) while the judge fell from "
                           f"{self.best['judge']:.4f} (step {self.best['step']}) to {judge:.4f}, more than its noise "
                           f"({margin:.4f}); the best judge's policy is kept in best_judge/")
        return False, ""

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "alarm": self.alarm, "alarms": self.alarms,
                "streak": self.streak}

    def restore(self, state: dict[str, Any]) -> None:
        self.history, self.best, self.alarm = state["history"], state["best"], state["alarm"]
        self.alarms, self.streak = state["alarms"], state["streak"]


class BestJudge:
    """`workdir/best_judge`: the release of the monitor's best judge score, consistent with the checkpoints.

    Each new best is written to `best_judge.steps/<step>` and `best_judge` is a
    relative symbolic link to it (replaced atomically). A best reached after the
    newest checkpoint may belong to steps a crash loses, so candidates stay until
    no retained checkpoint can lead back to them: those of the bests recorded at
    the last `keep` checkpoint saves, and any newer than the last save. On
    resume, candidates newer than the resumed step are deleted and the link
    points at the best of the restored monitor again.
    """

    def __init__(self, workdir: str, keep: int):
        self.root, self.link = os.path.join(workdir, "best_judge.steps"), os.path.join(workdir, "best_judge")
        self.keep = keep
        self.saved_bests: list[int] = []  # the best step at each of the last `keep` checkpoint saves
        self.last_saved = -1

    def save(self, step: int, cfg, host_params, tokenizer, best_step: int) -> None:
        """Writes step's release as the new best and drops candidates nothing can lead back to."""
        path = os.path.join(self.root, str(step))
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        save_release(path + ".tmp", cfg, host_params, tokenizer)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
        self._point(step)
        self._prune(best_step)

    def checkpointed(self, step: int, best_step: int | None) -> list[int]:
        """Records a checkpoint save at `step` whose monitor's best is `best_step`; the state to save with it."""
        if best_step is not None:
            self.saved_bests = (self.saved_bests + [best_step])[-self.keep:]
        self.last_saved = step
        return list(self.saved_bests)

    def restore(self, saved_bests: list[int], step: int, best_step: int | None) -> None:
        """Back to checkpoint `step`: candidates after it are gone, the link points at the restored best."""
        self.saved_bests, self.last_saved = list(saved_bests), step
        for name in self._candidates():
            if name > step:
                shutil.rmtree(os.path.join(self.root, str(name)))
        if best_step is not None and best_step in self._candidates():
            self._point(best_step)
        elif os.path.lexists(self.link):
            print(f"the best judge's policy of step {best_step} is no longer on disk; best_judge/ is removed until "
                  f"a new best")
            os.remove(self.link)

    def _point(self, step: int) -> None:
        if os.path.isdir(self.link) and not os.path.islink(self.link):
            shutil.rmtree(self.link)  # a directory left by an older version of this stage
        tmp = self.link + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.join(os.path.basename(self.root), str(step)), tmp)
        os.replace(tmp, self.link)

    def _prune(self, best_step: int) -> None:
        needed = {best_step, *self.saved_bests}
        for name in self._candidates():
            if name <= self.last_saved and name not in needed:
                shutil.rmtree(os.path.join(self.root, str(name)))

    def _candidates(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(n) for n in os.listdir(self.root) if n.isdigit())


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of the samples (Li et al. 2016): near 0 when the policy repeats itself."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
