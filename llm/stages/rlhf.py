"""RLHF: GRPO's loop with rewards from a learned reward model, a KL penalty to the SFT policy, and a hacking monitor.

    python -m launch.rlhf --config configs/rlhf_tiny.py --workdir runs/rlhf
    python -m launch.rlhf --config configs/overoptimization_tiny.py --workdir runs/overopt/rlhf

Per rollout (Ouyang et al. 2022, with GRPO's group baseline in place of PPO's
value network, as in DeepSeekMath): P prompts x G samples from the policy, each
scored by the proxy reward model (`rlhf.reward_model`, a `launch.reward`
release) on the whole conversation; the scores are standardised over the batch
(`rlhf.normalize`), then group advantages and `grpo_loss` with the k3 KL to the
starting policy (`rl.kl_beta` > 0 by default here). A completion cut at
`rl.max_new_tokens` gets the batch's lowest score (`rl.require_stop`).

The reward-hacking monitor: every `eval_every` steps, on fixed held-out prompts
(one sample each at `rl.eval_temperature`), the proxy's mean score, a judge's
(`rlhf.judge`: "gold", the task's programmatic preference; or a second reward
model's release, trained on a disjoint split of the pairs), the sequence KL to
the starting policy (the mean over samples of sum log pi - log pi_ref), the
completion length and the share of distinct uni- and bigrams. The best judge
score's policy is kept as a release in `workdir/best_judge` (`llm.train.monitor.BestJudge`: always a
step the checkpoints lead to). When, for
`rlhf.patience` evaluations in a row, the proxy stands above its value at the
best judge score while the judge stands below that best by more than its noise
(`rlhf.significance` standard errors of the drop, plus `rlhf.tolerance`), the
monitor says so in the log and the report, and with `rlhf.stop_on_hacking`
ends the run; a later new best withdraws the alarm. `rlhf.png` plots proxy and judge against
steps and against KL, the best and the alarm marked (Gao et al. 2022 plot gold
and proxy reward against KL distance the same way).

The gold preference of the over-optimisation experiment ("a right answer, the
shorter the better") is `gold_score`; `label_pairs` samples a policy and labels
pairs of its replies with it, the data a proxy reward model learns from. With
`rlhf.gold_problems`, each evaluation also scores it on that many more held-out
prompts the monitor never sees (`eval/gold`, plotted with its peak): the true
reward, against which the monitor's choice is checked without sharing its noise.
"""

from __future__ import annotations

import functools
import json
import os
import random
from typing import Any, Callable

import ml_collections
import numpy as np

from llm import model, reward_model, sharding, tasks
from llm.data import preferences as prefs
from llm.errors import UserError
from llm.generate import engine_for
from llm.tasks import Problem
from llm.train import logs, loop, rollouts
from llm.train.monitor import BestJudge, HackingMonitor, distinct_n

NAME = "rlhf"


def base_rlhf_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                     ) -> ml_collections.ConfigDict:
    """The on-policy core's config (data.*, rl.*) with the reward model, the judge and the monitor (rlhf.*)."""
    config = rollouts.base_rl_config(model_name, sharding_name, data_dir)
    config.data.task = "pairs"  # prompts of preference pairs (data.path); or a verifiable task (spelling, ...)
    config.data.path = f"{data_dir}/preference/hh_rlhf_harmless_base_test.jsonl.gz"
    config.data.pairs_kind = "jsonl"  # for task "pairs": how to read data.path (preferences.open_pairs)
    config.data.held_out_fraction = 0.1  # task "pairs": prompts held out, by a hash (a larger share: a superset)
    config.rl.update(kl_beta=0.05, tools=False, eval_samples=1, eval_greedy=False)
    config.rlhf = ml_collections.ConfigDict(dict(
        reward_model="runs/reward/release",  # the proxy: a `launch.reward` release
        normalize=True,  # standardise the proxy's scores over each rollout batch
        judge="",  # "": none; "gold": the gold preference below; or a reward-model release (a second RM)
        gold="rule",  # the hidden gold preference of an over-optimisation experiment (judge "gold", gold_problems,
        # label_pairs): "rule", the task's programmatic gold_score; or a reward-model release (Gao et al. 2022's
        # synthetic setup: a reward model trained on human pairs stands in for the humans)
        gold_length_bonus=0.5,  # gold_score: a right answer scores 1, times up to 1 + this for being short
        gold_problems=0,  # the gold on this many more held-out prompts the monitor never sees (eval/gold): the
        # experiment's measure of the true reward, to check the monitor's choice against
        patience=3,  # evaluations in a row with the proxy up and the judge down before the alarm
        tolerance=0.0,  # how far below its best the judge must be to count as down, beyond its noise:
        significance=1.64,  # ... and z standard errors of the drop (one-sided 95%); 0 counts any drop
        stop_on_hacking=False,  # end the run at the alarm (the best judge's policy is kept either way)
    ))
    return config


# ----------------------------------------------------------------------------- judges and the gold preference


def gold_score(task_reward: Callable[[Problem, str], float], length_bonus: float, max_tokens: int,
               problem: Problem, text: str, n_tokens: int) -> float:
    """The experiment's hidden preference: a right answer, the shorter the better; a wrong one is worth nothing.

    score = reward * (1 + length_bonus * (1 - n_tokens / max_tokens)): any right
    answer beats any wrong one, among right ones the shorter wins, and wrong ones
    tie however short, so that dropping the work that makes an answer right
    (here, spelling the word out) to be brief loses the gold score.
    """
    return task_reward(problem, text) * (1.0 + length_bonus * (1.0 - min(n_tokens, max_tokens) / max_tokens))


def _conversations(problems: list[Problem], samples: list[list[Any]]) -> list[list[dict]]:
    return [[*p.messages, {"role": "assistant", "content": s.text}] for p, group in zip(problems, samples)
            for s in group]


Judge = Callable[[list[Problem], list[list[Any]]], np.ndarray]  # (problems, samples per problem) -> [P * G]


def reward_model_scorer(path: str) -> Judge:
    """A `launch.reward` release's scores of the whole conversations (their last tokens where too long)."""
    scorer = reward_model.RewardModel.load(path)
    return lambda problems, samples: scorer.score(_conversations(problems, samples), keep_end=True).astype(np.float64)


def make_gold(rc: ml_collections.ConfigDict, hc: ml_collections.ConfigDict, task: tasks.Task) -> Judge:
    """The hidden gold preference (`rlhf.gold`): the task's `gold_score` ("rule") or a reward model's release."""
    if hc.gold != "rule":
        return reward_model_scorer(hc.gold)
    if task.grade is None:
        raise UserError("rlhf.gold='rule' needs a verifiable data.task (spelling, arithmetic, gsm8k); "
                         "give a reward-model release as rlhf.gold for preference-pair prompts")
    gold = functools.partial(gold_score, task.reward, hc.gold_length_bonus, rc.max_new_tokens)
    return lambda problems, samples: np.asarray([gold(p, s.text, len(s.tokens)) for p, group in
                                                 zip(problems, samples) for s in group], np.float64)


def make_judge(rc: ml_collections.ConfigDict, hc: ml_collections.ConfigDict, task: tasks.Task,
               gold: Judge | None = None) -> Judge | None:
    """The monitor's judge (`rlhf.judge`): none, the gold preference (`gold` when already loaded), or a second
    reward model's release."""
    if not hc.judge:
        return None
    if hc.judge == "gold":
        return gold or make_gold(rc, hc, task)
    return reward_model_scorer(hc.judge)


def pair_prompts(dc: ml_collections.ConfigDict, fits: Callable[[Problem], bool] = lambda p: True) -> tasks.Task:
    """Prompts of preference pairs as a task without a reward: train and held-out prompts split by prompt; a prompt
    that does not `fit` (no room left for a reply) is left out and counted."""
    if not 0 < dc.held_out_fraction < 1:
        raise UserError(f"data.held_out_fraction is a share of the prompts in (0, 1), got {dc.held_out_fraction}")
    found = prefs.open_pairs(dc.pairs_kind, dc.path)
    train, test = prefs.split_pairs(found.items, dc.held_out_fraction)
    unique = lambda pairs: list({p.split_key: Problem(messages=p.prompt, answer="", key=p.split_key)  # noqa: E731
                                 for p in pairs}.values())
    train, test = unique(train), unique(test)
    kept_train, kept_test = [p for p in train if fits(p)], [p for p in test if fits(p)]
    if len(kept_train) + len(kept_test) < len(train) + len(test):
        print(f"{dc.path}: {len(train) + len(test) - len(kept_train) - len(kept_test)} of {len(train) + len(test)} "
              f"prompts leave no room for a reply in data.seq_len and are left out")
    train, test = kept_train, kept_test
    if not train or not test:
        raise UserError(f"{dc.path}: no prompts to train on or hold out that fit ({found.describe()})")
    by_split = {"train": train, "test": test}
    return tasks.Task(name="pairs", kind="generative",
                      problems=lambda split, n, seed: random.Random(seed).sample(by_split[split],
                                                                                 min(n, len(by_split[split]))))


def prompt_task(config: ml_collections.ConfigDict, tokenizer) -> tasks.Task:
    """The configured task (`data.task`); preference-pair prompts only where a whole reply fits after them."""
    dc, rc = config.data, config.rl
    if dc.task != "pairs":
        return tasks.load(dc.task, path=dc.path, eval_path=dc.eval_path, digits=tuple(dc.digits))
    return pair_prompts(dc, lambda p: len(tokenizer.render_for_completion(list(p.messages))) + rc.max_new_tokens
                        <= dc.seq_len + 1)


# ----------------------------------------------------------------------------- the stage


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, rc, hc = config.data, config.rl, config.rlhf
    cfg, initial_params, tokenizer = rollouts.load_policy(config)
    task = prompt_task(config, tokenizer)
    proxy = reward_model.RewardModel.load(hc.reward_model)
    if proxy.tokenizer.name != tokenizer.name or proxy.tokenizer.n_vocab != tokenizer.n_vocab:
        print(f"note: the reward model's tokenizer ({proxy.tokenizer.name}) is not the policy's ({tokenizer.name}); "
              f"replies are scored as text, rendered in its own chat format")
    gold = make_gold(rc, hc, task) if hc.gold_problems or hc.judge == "gold" else None  # loaded once
    judge = make_judge(rc, hc, task, gold)
    if hc.patience < 1:
        raise UserError(f"rlhf.patience must be at least 1 evaluation, got {hc.patience}")
    # One draw split in two, so the gold prompts are disjoint from the monitor's.
    drawn = task.problems("test", rc.eval_problems + hc.gold_problems, rc.eval_seed)
    if len(drawn) < rc.eval_problems + hc.gold_problems:
        raise UserError(f"rl.eval_problems={rc.eval_problems} and rlhf.gold_problems={hc.gold_problems} ask for "
                         f"{rc.eval_problems + hc.gold_problems} held-out prompts; the task holds out {len(drawn)}")
    test_problems, gold_problems = drawn[:rc.eval_problems], drawn[rc.eval_problems:]

    def score(problems: list[Problem], samples: list[list[Any]]) -> tuple[np.ndarray, dict[str, float]]:
        raw = proxy.score(_conversations(problems, samples), keep_end=True).astype(np.float64)
        figures = {"proxy_reward": float(raw.mean())}
        if judge is not None:
            figures["judge_reward"] = float(judge(problems, samples).mean())
        ended = np.asarray([s.finish_reason == "stop" for group in samples for s in group])
        if rc.require_stop and not ended.all():  # a cut reply is worth the least of the batch, whatever its text
            raw = np.where(ended, raw, raw.min())
        if hc.normalize:
            raw = (raw - raw.mean()) / (raw.std() if raw.std() > 0 else 1.0)
        return raw.reshape(len(problems), -1), figures

    policy = rollouts.Rollouts(config, cfg, tokenizer, initial_params, task.problems, score)
    monitor = HackingMonitor(hc.patience, hc.tolerance, hc.significance)
    best_judge = BestJudge(workdir, config.train.keep_checkpoints)

    def evaluate(params, step: int) -> dict[str, float]:
        prompts = [tokenizer.render_for_completion(p.messages) for p in test_problems + gold_problems]
        samples = policy.sample(params, prompts, n=1, seed=rc.eval_seed, temperature=rc.eval_temperature)
        samples, gold_samples = samples[:len(test_problems)], samples[len(test_problems):]
        prompts = prompts[:len(test_problems)]
        rows = rollouts.rollout_rows(prompts, samples, dc.seq_len)
        log_ratio = (policy.row_logprobs(params, rows) - policy.row_logprobs(policy.reference(params), rows))
        tokens = [s.tokens for [s] in samples]
        figures = {"eval/proxy": float(proxy.score(_conversations(test_problems, samples), keep_end=True).mean()),
                   "eval/kl": float(np.sum(log_ratio * rows["loss_mask"]) / len(samples)),
                   "eval/length": float(np.mean([len(t) for t in tokens])),
                   "eval/distinct_1": distinct_n(tokens, 1), "eval/distinct_2": distinct_n(tokens, 2)}
        if gold_problems:
            figures["eval/gold"] = float(gold(gold_problems, gold_samples).mean())
        if judge is None:
            return figures
        judged = judge(test_problems, samples)
        figures["eval/judge"] = float(judged.mean())
        best, message = monitor.update(step, figures["eval/proxy"], figures["eval/judge"],
                                       float(judged.std(ddof=1) / np.sqrt(len(judged))) if len(judged) > 1 else 0.0)
        if best:
            best_judge.save(step, cfg, sharding.gather_to_host(params), tokenizer, monitor.best["step"])
        if message:
            print(message)
        with open(os.path.join(workdir, "monitor.json"), "w") as f:  # to read; resuming uses the checkpoint's
            json.dump(monitor.state(), f)
        return figures | {"monitor/best_judge_step": float(monitor.best["step"]),
                          "monitor/alarm": float(bool(monitor.alarm))}

    def state(step: int) -> dict[str, Any]:
        best_step = monitor.best["step"] if monitor.best else None
        return {"monitor": monitor.state(), "best_judge_steps": best_judge.checkpointed(step, best_step)}

    def restore(saved: dict[str, Any], step: int) -> None:
        monitor.restore(saved["monitor"])
        best_judge.restore(saved["best_judge_steps"], step, monitor.best["step"] if monitor.best else None)

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=policy.loss_fn(), rollout=policy,
        initial_params=initial_params, evaluate=evaluate, step_figures=policy.step_figures,
        should_stop=lambda: bool(hc.stop_on_hacking and monitor.alarm), state=state, restore=restore,
        finish=lambda workdir, summary: plot_monitor(workdir, monitor.state()),
        describe=(f"prompts: {dc.task}; proxy {hc.reward_model}; judge {hc.judge or 'none'}; {policy.P} prompts x "
                  f"{policy.G} samples per rollout, kl_beta {rc.kl_beta}, advantages {rc.advantage}"),
    )


run = loop.runner(NAME, build, "Runs (or resumes) RLHF as configured; `rlhf.png` and the monitor's verdict in the "
                                "report.")


# ----------------------------------------------------------------------------- gold-labelled pairs


def label_pairs(config: ml_collections.ConfigDict, n_prompts: int, samples: int, seed: int = 0) -> list[dict]:
    """Preference pairs labelled by the gold preference (`rlhf.gold`): `samples` replies of the starting policy per
    training prompt of the task, every two replies with different gold scores a pair (the higher one chosen).

    Records are `{"prompt": messages, "chosen", "rejected", "gold_chosen", "gold_rejected"}` (`read_pairs` reads them).
    """
    rc, hc = config.rl, config.rlhf
    cfg, params, tokenizer = rollouts.load_policy(config)
    if params is None:
        raise UserError("label_pairs samples a trained policy: set init_from (an SFT release or checkpoint)")
    task = prompt_task(config, tokenizer)
    gold = make_gold(rc, hc, task)
    problems = task.problems("train", n_prompts, 10_000_019 + seed)  # not the RL run's rollout draws
    groups = rollouts.sample_problems(engine_for(cfg, params, tokenizer, rc.tools), tokenizer, problems, n=samples,
                                      temperature=rc.temperature, max_new_tokens=rc.max_new_tokens, seed=seed,
                                      batch_size=max(1, len(problems)))
    if rc.require_stop:  # a reply cut at max_new_tokens is no example
        groups = [[s for s in group if s.finish_reason == "stop"] for group in groups]
    scores = iter(gold(problems, groups).tolist())
    records = []
    for problem, group in zip(problems, groups):
        scored = [(next(scores), s.text) for s in group]
        for i, (a_score, a) in enumerate(scored):
            for b_score, b in scored[i + 1:]:
                if a_score != b_score and a.strip() != b.strip():
                    (hi, hi_text), (lo, lo_text) = sorted([(a_score, a), (b_score, b)], reverse=True)
                    records.append({"prompt": list(problem.messages), "chosen": hi_text, "rejected": lo_text,
                                    "gold_chosen": hi, "gold_rejected": lo})
    return records


# ----------------------------------------------------------------------------- the plot


def plot_monitor(workdir: str, monitor: dict[str, Any]) -> None:
    """rlhf.png: proxy, judge and gold on held-out prompts against steps and KL, peaks marked (the monitor's state:
    its best and alarms); linked from report.md with the monitor's verdict."""
    rows = [r for r in logs.metric_rows(workdir) if "eval/proxy" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    kl = [r["eval/kl"] for r in rows]
    gold_peak = max(rows, key=lambda r: r["eval/gold"]) if "eval/gold" in rows[0] else None
    fig, axes = logs.pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], steps, "step"), (axes[1], kl, "KL to the starting policy (nats per reply)")):
        ax.plot(x, [r["eval/proxy"] for r in rows], "o-", label="proxy reward model")
        if "eval/judge" in rows[0]:
            ax.plot(x, [r["eval/judge"] for r in rows], "s-", label="judge (the monitor's)")
        if "eval/gold" in rows[0]:
            ax.plot(x, [r["eval/gold"] for r in rows], "^-", label="gold (prompts the monitor never sees)")
        marks = [(monitor["best"], "g", "--", "best judge")] if monitor.get("best") else []
        if gold_peak is not None:
            marks.append((gold_peak, "k", "-.", "gold peak"))
        marks += [(point, "r", ":", "monitor's alarm" + ("" if point == monitor.get("alarm") else ", withdrawn"))
                  for point in monitor.get("alarms", [])]
        for point, color, style, what in marks:
            at = point["step"] if x is steps else kl[steps.index(point["step"])]
            ax.axvline(at, color=color, linestyle=style, label=f"{what} (step {point['step']})")
        ax.set_xlabel(label)
        ax.set_ylabel("mean score on held-out prompts")
    axes[0].legend(fontsize=8)
    logs.save_figure(fig, workdir, "rlhf.png", "proxy, judge and gold against steps and KL", monitor_verdict(
        monitor, rows, gold_peak))


def monitor_verdict(monitor: dict[str, Any], rows: list[dict[str, Any]], gold_peak: dict | None) -> str:
    """The report's lines on the monitor: the alarm standing or withdrawn, the best judge, the gold's course."""
    verdict = ""
    if monitor.get("alarm"):
        verdict = (f"\nReward hacking detected at step {monitor['alarm']['step']}: the proxy kept rising while the "
                   f"judge fell from its best ({monitor['best']['judge']:.4f} at step {monitor['best']['step']}; "
                   f"that policy is in best_judge/).\n")
    elif monitor.get("best"):
        best = monitor["best"]
        withdrawn = ", ".join(str(a["step"]) for a in monitor.get("alarms", []))
        verdict = (f"\nNo reward hacking standing at the end; best judge {best['judge']:.4f} at step "
                   f"{best['step']}" + (f" (alarms at steps {withdrawn} were withdrawn when the judge recovered)"
                                        if withdrawn else "") + ".\n")
    if gold_peak is not None and monitor.get("best"):
        chosen, peak = monitor["best"]["step"], gold_peak["step"]
        verdict += (f"\nGold (on prompts the monitor never sees): {rows[0]['eval/gold']:.4f} at the start, peak "
                    f"{gold_peak['eval/gold']:.4f} at step {peak}, {rows[-1]['eval/gold']:.4f} at the end; the "
                    f"monitor's best judge is {abs(chosen - peak)} steps from the gold peak"
                    + (f" ({abs(chosen - peak) / peak:.0%} of it)" if peak else "") + ".\n")
    return verdict
