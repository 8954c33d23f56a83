"""GRPO: reinforcement learning on tasks with a checkable answer, rollouts from the engine, through the shared driver.

    python -m launch.grpo --config configs/grpo_tiny.py --workdir runs/grpo

Per rollout (Shao et al. 2024, DeepSeekMath section 4; DeepSeek-R1): P training
problems of the task, G samples each from the current policy through the
KV-cache `Engine` (a fresh seed every rollout, the engine running on the
training mesh's sharded params, nothing gathered to one device), rewards by the
task's `grade` (the one the evals use), group advantages (`llm.train.rl`), the
old log-probabilities recomputed by the training forward (not the sampler's,
which are unfiltered temperature-1 values from another layout), then `rl.mu`
optimizer steps of `grpo_loss` over the rollout batch. Each loop step is one
optimizer step; the rollout is redrawn every `mu` steps (a resumed run redraws
it at once). Prompt tokens, padding and tool outputs the engine forced in
(`Sample.forced`) carry no gradient.

Departures: groups whose rewards are all equal are masked out when
`rl.drop_degenerate` (DAPO's dynamic-sampling filter, without resampling: the
batch shrinks instead); the KL to the starting model is logged always (k3, its
reference forward is cheap at this size) and enters the loss only with
`rl.kl_beta` > 0; entropy is estimated from the sampled tokens' -log p, not the
full distribution. With `rl.require_stop` (the default) a completion cut at
`max_new_tokens` scores 0 in training and evaluation alike, whatever its text:
without it the policy learnt to state an answer and ramble on to the limit
(DAPO's overlong filtering, as a reward). `rl.shuffle_rewards` permutes rewards across the step's
samples: the control run that must not learn. Rollouts run in one process
(several processes would step the engine out of lockstep): multi-host GRPO is
not supported yet and is refused.

Logged per step: reward mean, the batch's pass@1, the shares of all-solved and
none-solved groups, KL, clip fraction, entropy, completion length, rollout
tokens/s and seconds in the rollout, in the old and reference forward, in
training (from one rollout's end until the params it trained are ready) and
between rollouts (`step_s`; the last two include any evaluation in between);
every `eval_every` steps the held-out pass@1, pass@k (unbiased, Chen et al.
2021) and greedy pass@1 with their 95% intervals. At the end, `grpo.png` plots
reward and held-out pass@1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from llm import model, sharding
from llm.config import base_config
from llm.evals.passk import pass_at_k
from llm.generate import Engine, SamplingParams
from llm.tasks import Problem
from llm.tokenizer import Tokenizer
from llm.tools import Calculator
from llm.train import loop
from llm.train.losses import grpo_loss_fn, token_logprobs
from llm.train.rl import group_advantages

NAME = "grpo"


def run(config: ml_collections.ConfigDict, workdir: str) -> loop.Summary:
    """Runs (or resumes) GRPO as configured; writes `grpo.png` beside the report."""
    summary = loop.run(NAME, build, config, workdir)
    if jax.process_index() == 0:
        plot_curves(workdir)
    return summary


def base_grpo_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                     ) -> ml_collections.ConfigDict:
    """`base_config` with the task (data.*) and the algorithm's knobs (rl.*); configs start here."""
    config = base_config(model_name, sharding_name)
    config.data = ml_collections.ConfigDict(dict(
        task="spelling",  # spelling, arithmetic or gsm8k (llm/tasks/)
        path=f"{data_dir}/words/words_alpha.zip",  # spelling: the word list; gsm8k: the train JSONL; arithmetic: unused
        eval_path="",  # gsm8k: the test JSONL
        digits=(2, 4),  # arithmetic: operand digits
        prompts_per_step=8,  # P
        samples_per_prompt=8,  # G
        seq_len=160,  # row width: prompt + completion tokens must fit in seq_len + 1
        tokenizer="",  # only for a fresh model (no init_from: tests): a named encoding or a .tiktoken file
        num_shards=0,
    ))
    config.rl = ml_collections.ConfigDict(dict(
        mu=1,  # optimizer steps per rollout (DeepSeekMath's mu)
        max_new_tokens=96,
        temperature=1.0,
        eps_low=0.2,
        eps_high=0.28,
        kl_beta=0.0,
        reference=True,  # log the k3 KL to the starting model (needed when kl_beta > 0)
        aggregation="token",  # token (DAPO), sequence (GRPO), constant (Dr. GRPO)
        scale="group",  # advantage scaling: group, batch, none
        drop_degenerate=True,
        shuffle_rewards=False,  # the control: rewards permuted across the step's samples
        require_stop=True,  # a completion that does not end its turn (cut at max_new_tokens) scores 0, in evals too
        tools=True,  # the calculator, when the tokenizer has its tokens
        eval_problems=100,
        eval_samples=4,  # n per held-out problem; pass@1 and pass@n
        eval_temperature=1.0,
        eval_greedy=True,
        eval_seed=1234,
    ))
    config.train.update(steps=100, log_every=1, eval_every=25, checkpoint_every=25)
    return config


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """A task as GRPO uses it: training problems per rollout, fixed held-out problems, the grading reward."""

    train_problems: Callable[[int, int], list[Problem]]  # (rollout index, count) -> problems
    test_problems: Callable[[int, int], list[Problem]]  # (count, seed) -> problems
    reward: Callable[[Problem, str], float]


def make_task(dc: ml_collections.ConfigDict) -> Task:
    """The task named by `data.task`, reading its files once."""
    if dc.task == "spelling":
        from llm.tasks import spelling

        words = spelling.read_words(dc.path)
        return Task(lambda index, n: spelling.problems(words, n, split="train", seed=index),
                    lambda n, seed: spelling.problems(words, n, split="test", seed=seed), spelling.reward)
    if dc.task == "arithmetic":
        from llm.tasks import arithmetic

        digits = tuple(dc.digits)
        return Task(lambda index, n: arithmetic.problems(n, split="train", seed=index, digits=digits),
                    lambda n, seed: arithmetic.problems(n, split="test", seed=seed, digits=digits), arithmetic.reward)
    if dc.task == "gsm8k":
        from llm.tasks import gsm8k

        train, test = gsm8k.problems(dc.path, split="train"), gsm8k.problems(dc.eval_path or dc.path, split="test")
        return Task(lambda index, n: random.Random(index).sample(train, n),
                    lambda n, seed: random.Random(seed).sample(test, min(n, len(test))),
                    lambda p, text: float(gsm8k.grade(p, text)))
    raise ValueError(f"unknown data.task {dc.task!r}; expected spelling, arithmetic or gsm8k")


# ----------------------------------------------------------------------------- rollouts


def rollout_rows(prompts: list[list[int]], samples: list[list[Any]], width: int) -> dict[str, np.ndarray]:
    """Rows {inputs, targets, loss_mask} [P * G, width], one per sample (prompt then completion, right-padded).

    The mask is 1 on each completion token the model sampled (its stop token
    included) and 0 on the prompt, padding and tokens the engine forced in.
    """
    rows = [(prompt, s) for prompt, group in zip(prompts, samples) for s in group]
    inputs = np.zeros((len(rows), width), np.int32)
    targets = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (prompt, s) in enumerate(rows):
        sequence = list(prompt) + list(s.tokens)
        if len(sequence) > width + 1:
            raise ValueError(f"a prompt of {len(prompt)} tokens and a completion of {len(s.tokens)} do not fit in "
                             f"data.seq_len={width} + 1; raise data.seq_len or lower rl.max_new_tokens")
        inputs[i, :len(sequence) - 1] = sequence[:-1]
        targets[i, :len(sequence) - 1] = sequence[1:]
        # Target j predicts sequence[j + 1]: completion token j + 1 - len(prompt).
        mask[i, len(prompt) - 1:len(sequence) - 1] = ~np.asarray(s.forced, bool)
    return {"inputs": inputs, "targets": targets, "loss_mask": mask}


class RolloutPosition:
    """The data position saved with checkpoints: rollouts derive from the step alone, so there is nothing to save."""

    def get_state(self) -> bytes:
        return json.dumps({"rollouts": "from the step"}).encode()

    def set_state(self, state: bytes) -> None:
        del state

    def start_prefetch(self) -> None:  # the checkpointer restarts a data pipeline's prefetch after restoring
        pass


def _interval(values: list[float]) -> float:
    """Half-width of the normal 95% interval of the mean of per-problem scores."""
    return float(1.96 * np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def sample_problems(engine: Engine, tokenizer: Tokenizer, problems: list[Problem], *, n: int, temperature: float,
                    max_new_tokens: int, seed: int, batch_size: int = 64) -> list[list[Any]]:
    """`n` samples of each problem (its messages rendered for the assistant's turn), `batch_size` prompts at a time;
    a sample ends at the end of its turn or at `max_new_tokens`."""
    stops = tuple(dict.fromkeys((tokenizer.end_of_turn, tokenizer.eot)))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed,
                              stop_token_ids=stops)
    prompts = [tokenizer.render_for_completion(p.messages) for p in problems]
    return [group for start in range(0, len(prompts), batch_size)
            for group in engine.generate(prompts[start:start + batch_size], sampling)]


def evaluate_pass(cfg, params, tokenizer: Tokenizer, problems: list[Problem], reward, *, n: int, temperature: float,
                  max_new_tokens: int, seed: int, greedy: bool, tools: bool, require_stop: bool = True,
                  batch_size: int = 64) -> dict[str, float]:
    """Held-out pass@1 and pass@n (n samples at `temperature`) and greedy pass@1, each with its 95% half-interval,
    and the mean completion length of each."""
    engine = engine_for(cfg, params, tokenizer, tools)
    figures = {}
    runs = [("", n, temperature)] + ([("greedy_", 1, 0.0)] if greedy else [])
    for prefix, count, temp in runs:
        groups = sample_problems(engine, tokenizer, problems, n=count, temperature=temp,
                                 max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
        right = [sum(sample_reward(reward, p, s, require_stop) == 1.0 for s in group)
                 for p, group in zip(problems, groups)]
        figures[f"heldout/{prefix}completion_len"] = float(np.mean([len(s.tokens) for g in groups for s in g]))
        for k in sorted({1, count}):
            scores = [pass_at_k(count, c, k) for c in right]
            figures[f"heldout/{prefix}pass@{k}"] = float(np.mean(scores))
            figures[f"heldout/{prefix}pass@{k}_ci95"] = _interval(scores)
    return figures


def sample_reward(reward, problem: Problem, sample, require_stop: bool) -> float:
    """The task's reward of a sample; 0 for one cut before it ended its turn when `require_stop`."""
    return 0.0 if require_stop and sample.finish_reason != "stop" else reward(problem, sample.text)


def engine_for(cfg, params, tokenizer: Tokenizer, tools: bool) -> Engine:
    """The engine on `params` as they are placed (sharded on the training mesh), with the calculator if asked."""
    use = tools and tokenizer.has_tool("python")
    return Engine(cfg, params, tokenizer, tools={"python": Calculator()} if use else None)


# ----------------------------------------------------------------------------- the stage


def load_policy(config: ml_collections.ConfigDict) -> tuple[Any, Any, Tokenizer]:
    """(model config, host params or None, tokenizer) of the policy a policy-gradient stage starts from."""
    if jax.process_count() > 1:
        raise NotImplementedError("policy-gradient rollouts run in one process; multi-host RL is not supported yet")
    if config.init_from:
        cfg, initial_params, tokenizer = loop.load_init_from(config)
    else:  # a fresh model: tests only (it has nothing to be rewarded for)
        from llm.config import model_config

        cfg, initial_params, tokenizer = model_config(config), None, Tokenizer.load(config.data.tokenizer)
    if tokenizer.chat_template is None:
        raise ValueError(f"{tokenizer.name} has no chat format this project can render")
    return cfg, initial_params, tokenizer


# (problems, their samples) -> (rewards [P, G], figures of the rollout to log)
Scorer = Callable[[list[Problem], list[list[Any]]], tuple[np.ndarray, dict[str, float]]]


def score_by_task(task: Task, require_stop: bool, problems: list[Problem], samples: list[list[Any]]
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """A verifiable task's rewards, and the batch's pass@1 and shares of all-solved and none-solved groups."""
    rewards_PxG = np.asarray([[sample_reward(task.reward, p, s, require_stop) for s in group]
                              for p, group in zip(problems, samples)])
    correct_PxG = rewards_PxG == 1.0
    return rewards_PxG, {"pass1_batch": float(correct_PxG.mean()), "solved_all": float(correct_PxG.all(axis=1).mean()),
                         "solved_none": float((~correct_PxG.any(axis=1)).mean())}


class PolicyRollouts:
    """The on-policy half of GRPO and RLHF: each rollout's rows, advantages, old and reference log-probabilities.

    `train_problems(index, P)` gives a rollout's prompts, `score` its rewards;
    the rest (sampling through the engine, group advantages, masks, timing, the
    reference) is the same for a verifiable task and for a reward model. Called by
    the loop as `Stage.rollout(params, step)`; `step_figures` turns the step's
    summed loss aux into clip fraction, KL and entropy.
    """

    def __init__(self, config: ml_collections.ConfigDict, cfg, tokenizer: Tokenizer, initial_params,
                 train_problems: Callable[[int, int], list[Problem]], score: Scorer):
        dc, rc, tc = config.data, config.rl, config.train
        self.config, self.cfg, self.tokenizer, self.initial_params = config, cfg, tokenizer, initial_params
        self.train_problems, self.score = train_problems, score
        self.P, self.G = dc.prompts_per_step, dc.samples_per_prompt
        if (self.P * self.G) % tc.grad_accum:
            raise ValueError(f"prompts_per_step * samples_per_prompt = {self.P * self.G} rows do not split into "
                             f"train.grad_accum={tc.grad_accum} micro-batches")
        if rc.kl_beta and not rc.reference:
            raise ValueError("rl.kl_beta > 0 needs rl.reference=True")
        mesh, rules = sharding.make_mesh(config.mesh), dict(config.sharding)
        self.placement = sharding.batch_sharding(mesh, rules)

        def logprobs(params, batch):
            with sharding.use_rules(mesh, rules):
                return token_logprobs(cfg, params, batch)

        self.logprob_fn = jax.jit(logprobs)
        self.stops = tuple(dict.fromkeys((tokenizer.end_of_turn, tokenizer.eot)))
        self.cached, self._reference, self.last_began, self.last_end = None, None, None, None
        self.step = 0  # the step of the last call: what an evaluation right after it measured

    def reference(self, params):
        """The starting model, placed as `params` are (kept after the first call)."""
        if self._reference is None:
            start = self.initial_params if self.initial_params is not None else sharding.gather_to_host(params)
            self._reference = jax.tree.map(lambda h, p: jax.device_put(h, p.sharding), start, params)
        return self._reference

    def row_logprobs(self, params, rows: dict[str, np.ndarray]) -> np.ndarray:
        placed = {k: jax.make_array_from_process_local_data(self.placement, rows[k]) for k in ("inputs", "targets")}
        return np.asarray(self.logprob_fn(params, placed))

    def sample(self, params, prompts: list[list[int]], *, n: int, seed: int, temperature: float):
        sampling = SamplingParams(max_new_tokens=self.config.rl.max_new_tokens, temperature=temperature, n=n,
                                  seed=seed, stop_token_ids=self.stops)
        return engine_for(self.cfg, params, self.tokenizer, self.config.rl.tools).generate(prompts, sampling)

    def make_rollout(self, params, step: int):
        config, rc, dc = self.config, self.config.rl, self.config.data
        began = time.perf_counter()
        jax.block_until_ready(params)  # the previous optimizer step's work: the training share of the step
        ready = time.perf_counter()
        index = (step - 1) // rc.mu
        problems = self.train_problems(config.seed * 1_000_003 + index, self.P)
        prompts = [self.tokenizer.render_for_completion(p.messages) for p in problems]
        samples = self.sample(params, prompts, n=self.G, seed=config.seed * 1_000_003 + index,
                              temperature=rc.temperature)
        sampled = time.perf_counter()
        rewards_PxG, figures = self.score(problems, samples)
        if rc.shuffle_rewards:  # the control: the same rewards, on the wrong samples
            rng = np.random.default_rng([config.seed, index])
            rewards_PxG = rng.permutation(rewards_PxG.ravel()).reshape(rewards_PxG.shape)
        advantages_PxG, degenerate_P = group_advantages(rewards_PxG, rc.scale)
        rows = rollout_rows(prompts, samples, dc.seq_len)
        if rc.drop_degenerate:
            rows["loss_mask"] *= np.repeat(~degenerate_P, self.G)[:, None]
        rows["advantages"] = advantages_PxG.ravel()
        rows["old_logprobs"] = self.row_logprobs(params, rows)
        if rc.reference:
            rows["ref_logprobs"] = self.row_logprobs(self.reference(params), rows)
        scored = time.perf_counter()
        previous, self.last_began = self.last_began, began
        lengths = [len(s.tokens) for group in samples for s in group]
        figures = {"reward": float(rewards_PxG.mean()),  # a permutation keeps the mean: the control's too
                   **figures, "degenerate": float(degenerate_P.mean()), "completion_len": float(np.mean(lengths)),
                   "rollout_s": sampled - ready, "logprob_s": scored - sampled,
                   # From the previous rollout's end until the params it trained are ready: that step's training.
                   "train_s": ready - self.last_end if self.last_end else float("nan"),
                   "step_s": began - previous if previous else float("nan"),
                   "rollout_tok_s": sum(lengths) / max(sampled - ready, 1e-9)}
        A = config.train.grad_accum
        micro = [{k: v.reshape(A, -1, *v.shape[1:])[a] for k, v in rows.items()} for a in range(A)]
        return micro, figures

    def __call__(self, params, step: int):
        self.step = step
        if (step - 1) % self.config.rl.mu == 0 or self.cached is None:
            self.cached = self.make_rollout(params, step)
            micro, figures = self.cached
        else:
            micro, figures = self.cached[0], {}
        self.last_end = time.perf_counter()
        return micro, figures

    @staticmethod
    def step_figures(metrics: dict[str, float]) -> dict[str, float]:
        tokens = metrics.get("tokens", 0.0)
        if not tokens:
            return {}
        return {"clip_fraction": metrics["clipped_tokens"] / tokens, "kl": metrics["kl"] / tokens,
                "entropy": metrics["neg_logprob"] / tokens}

    def loss_fn(self):
        rc = self.config.rl
        return functools.partial(grpo_loss_fn, self.cfg, eps_low=rc.eps_low, eps_high=rc.eps_high,
                                 kl_beta=rc.kl_beta, aggregation=rc.aggregation, constant_length=rc.max_new_tokens)


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, rc = config.data, config.rl
    cfg, initial_params, tokenizer = load_policy(config)
    task = make_task(dc)
    test_problems = task.test_problems(rc.eval_problems, rc.eval_seed)
    rollouts = PolicyRollouts(config, cfg, tokenizer, initial_params, task.train_problems,
                              functools.partial(score_by_task, task, rc.require_stop))

    def evaluate(params) -> dict[str, float]:
        return evaluate_pass(cfg, params, tokenizer, test_problems, task.reward, n=rc.eval_samples,
                             temperature=rc.eval_temperature, max_new_tokens=rc.max_new_tokens, seed=rc.eval_seed,
                             greedy=rc.eval_greedy, tools=rc.tools, require_stop=rc.require_stop)

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=rollouts.loss_fn(), batches=RolloutPosition(),
        initial_params=initial_params, evaluate=evaluate, rollout=rollouts, step_figures=rollouts.step_figures,
        describe=(f"task {dc.task}: {rollouts.P} prompts x {rollouts.G} samples per rollout, mu {rc.mu}, "
                  f"{len(test_problems)} held-out problems; aggregation {rc.aggregation}, advantages {rc.scale}"
                  + (", rewards shuffled (control)" if rc.shuffle_rewards else "")),
    )


def plot_curves(workdir: str) -> None:
    """grpo.png: the rollout reward and completion length per step, and the held-out pass@1 at each evaluation
    (left), the completion lengths (right: DeepSeek-R1's "thinking grows" curve); linked from report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, (ax, ax_len) = plt.subplots(1, 2, figsize=(11, 4))

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
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "grpo.png"), dpi=100)
    plt.close(fig)
    report = os.path.join(workdir, "report.md")
    if os.path.exists(report):
        with open(report, "a") as f:
            f.write("\n![reward and held-out pass@1](grpo.png)\n")
