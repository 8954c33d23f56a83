"""GRPO: reinforcement learning on tasks with a checkable answer, through the on-policy core and the shared driver.

    python -m launch.grpo --config configs/grpo_tiny.py --workdir runs/grpo

What is the stage's own (Shao et al. 2024, DeepSeekMath section 4; DeepSeek-R1):
the rewards are the task's `reward` (its `grade`, the one the evals use) through
`rollouts.task_scorer`; advantages by `rl.advantage` (GRPO's group baseline, or
RLOO's leave-one-out); the loss `grpo_loss` with `rl.mu` optimizer steps per
rollout and an optional k3 KL to the starting model (`rl.kl_beta`; logged
always with `rl.reference`). The rollouts themselves (sampling, rows, old and
reference log-probabilities, departures from the paper) are `llm.train.rollouts`.
With `rl.require_stop` (the default) a completion cut at `max_new_tokens` scores
0 in training and evaluation alike, whatever its text: without it the policy
learnt to state an answer and ramble on to the limit (DAPO's overlong filtering,
as a reward). Entropy is estimated from the sampled tokens' -log p, not the full
distribution.

Logged per step: the task reward's mean, the batch's pass@1, the shares of
all-solved and none-solved groups, KL, clip fraction, entropy, completion
length, rollout tokens/s and seconds in the rollout, in the old and reference
forward, in training and between rollouts; every `eval_every` steps the held-out
pass@1, pass@k (unbiased, Chen et al. 2021) and greedy pass@1 with their 95%
intervals. At the end, `grpo.png` plots them.
"""

from __future__ import annotations

import functools

import ml_collections
import numpy as np

from llm import model, tasks
from llm.evals import generative
from llm.generate import engine_for
from llm.train import logs, loop, rollouts

NAME = "grpo"


def base_grpo_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                     ) -> ml_collections.ConfigDict:
    """The on-policy core's config (data.*, rl.*) for a verifiable task; configs start here."""
    return rollouts.base_rl_config(model_name, sharding_name, data_dir)


def load_task(dc: ml_collections.ConfigDict) -> tasks.Task:
    """The verifiable task `data.task` names, reading its files once."""
    return tasks.load(dc.task, path=dc.path, eval_path=dc.eval_path, digits=tuple(dc.digits))


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, rc = config.data, config.rl
    cfg, initial_params, tokenizer = rollouts.load_policy(config)
    task = load_task(dc)
    test_problems = task.problems("test", rc.eval_problems, rc.eval_seed)
    policy = rollouts.Rollouts(config, cfg, tokenizer, initial_params, task.problems,
                               rollouts.task_scorer(task, rc.require_stop))

    def evaluate(params, step: int) -> dict[str, float]:
        """Held-out pass@1 and pass@n (n samples at `eval_temperature`) and greedy pass@1, each with its 95%
        half-interval, and the mean completion length of each: graded as the evals grade."""
        engine, figures = engine_for(cfg, params, tokenizer, rc.tools), {}
        runs = [("", rc.eval_samples, rc.eval_temperature)] + ([("greedy_", 1, 0.0)] if rc.eval_greedy else [])
        for prefix, n, temperature in runs:
            result = generative.evaluate(engine, test_problems, task.grade, n=n, ks=sorted({1, n}),
                                         temperature=temperature, max_new_tokens=rc.max_new_tokens, batch_size=64,
                                         seed=rc.eval_seed, require_stop=rc.require_stop, batch_seeds=False)
            figures |= {f"heldout/{prefix}{k}": v for k, v in result.summary(intervals=True).items()
                        if k.startswith("pass@") or k == "completion_len"}
        return figures

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=policy.loss_fn(), rollout=policy,
        initial_params=initial_params, evaluate=evaluate, step_figures=policy.step_figures,
        finish=lambda workdir, summary: plot_curves(workdir),
        describe=(f"task {dc.task}: {policy.P} prompts x {policy.G} samples per rollout, mu {rc.mu}, "
                  f"{len(test_problems)} held-out problems; aggregation {rc.aggregation}, advantages {rc.advantage}"
                  + (f" ({rc.scale})" if rc.advantage == "grpo" else "")
                  + (", rewards shuffled (control)" if rc.shuffle_rewards else "")),
    )


run = loop.runner(NAME, build, "Runs (or resumes) GRPO as configured; `grpo.png` beside the report.")


def plot_curves(workdir: str) -> None:
    """grpo.png: the rollout reward and completion length per step, and the held-out pass@1 at each evaluation
    (left), the completion lengths (right: DeepSeek-R1's "thinking grows" curve); linked from report.md."""
    rows = logs.metric_rows(workdir)
    fig, (ax, ax_len) = logs.pyplot().subplots(1, 2, figsize=(11, 4))

    def per_step(axis, key: str, label: str) -> None:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points)
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps, values, alpha=0.3, label=label)
            axis.plot(steps[window - 1:], smooth, label=f"{label}, mean of {window}")

    per_step(ax, "pass1_batch", "rollout pass@1 (batch)")
    held = [(r["step"], r["heldout/pass@1"], r["heldout/pass@1_ci95"]) for r in rows if "heldout/pass@1" in r]
    if held:
        steps, values, ci = zip(*held)
        ax.errorbar(steps, values, yerr=ci, fmt="o-", capsize=3, label="held-out pass@1 (95% interval)")
    ax.set_xlabel("step")
    ax.set_ylabel("pass@1")
    ax.legend()
    per_step(ax_len, "completion_len", "rollout completion")
    held_len = [(r["step"], r["heldout/completion_len"]) for r in rows if "heldout/completion_len" in r]
    if held_len:
        ax_len.plot(*zip(*held_len), "o-", label="held-out completion")
    ax_len.set_xlabel("step")
    ax_len.set_ylabel("tokens")
    ax_len.legend()
    logs.save_figure(fig, workdir, "grpo.png", "rollout and held-out pass@1, completion lengths")
