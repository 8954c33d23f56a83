"""The on-policy core of GRPO and RLHF: groups sampled on the current params, scored, advantages, training rows.

    rollouts = Rollouts(config, cfg, tokenizer, initial_params, task.problems, task_scorer(task, require_stop))
    loop.Stage(..., rollout=rollouts, loss_fn=rollouts.loss_fn(), step_figures=rollouts.step_figures)

Per rollout (Shao et al. 2024, DeepSeekMath section 4): P training problems, G
samples each from the current policy through the KV-cache engine (a fresh seed
every rollout, on the training mesh's sharded params, nothing gathered to one
device); a `Scorer` gives their rewards (a task's `reward`, a reward model's
scores: the stage's choice); an advantage estimator (`ADVANTAGES`, by
`rl.advantage`) turns each group's rewards into advantages; the old
log-probabilities are recomputed by the training forward (not the sampler's,
which are unfiltered temperature-1 values from another layout), and the
reference's when a KL is logged or penalised. The rollout is redrawn every
`rl.mu` optimizer steps (a resumed run redraws it at once). Prompt tokens,
padding and tool outputs the engine forced in (`Sample.forced`) carry no gradient.

Departures: groups whose rewards are all equal are masked out when
`rl.drop_degenerate` (DAPO's dynamic-sampling filter, without resampling: the
batch shrinks instead); `rl.shuffle_rewards` permutes rewards across the step's
samples, the control run that must not learn. Rollouts run in one process
(several processes would step the engine out of lockstep): multi-host RL is
refused.

Shape legend: P prompts (groups) per rollout, G samples per prompt, R = P * G rows, W row width.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from llm import sharding
from llm.config import base_config
from llm.errors import UserError
from llm.generate import SamplingParams, engine_for
from llm.tasks import Problem
from llm.tokenizer import Tokenizer
from llm.train.losses import grpo_loss_fn, token_logprobs
from llm.train.start import load_start, micro_batch_size


def base_rl_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                   ) -> ml_collections.ConfigDict:
    """`base_config` with the prompts (data.*) and the on-policy knobs (rl.*) every RL stage shares."""
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
        advantage="grpo",  # the estimator (ADVANTAGES): grpo (group baseline, scaled by `scale`) or rloo
        scale="group",  # grpo's advantage scaling: group, batch, none
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


# ----------------------------------------------------------------------------- advantage estimators

SCALES = ("group", "batch", "none")


def group_advantages(rewards_PxG: np.ndarray, scale: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantages_PxG, degenerate_P): each reward minus its group's mean, optionally scaled.

    GRPO (Shao et al. 2024, DeepSeekMath section 4.1.2) uses the G samples of one
    prompt as each other's baseline: A = (r - mean(group)) / std(group) ("group").
    "batch" divides by the std of all the step's rewards instead (as REINFORCE++
    and Hu et al. suggest; less weight on nearly-solved prompts), "none" keeps the
    centred reward (Dr. GRPO, Liu et al. 2025: the std scaling biases toward too
    easy and too hard prompts). The std is the population one (ddof 0), so a
    half-right binary group gets exactly +-1. A group whose rewards are all equal
    (all solved or none) teaches nothing: its advantages are exactly 0, never
    0 / 0, and `degenerate_P` marks it so a stage can count or drop it.
    """
    if scale not in SCALES:
        raise UserError(f"rl.scale must be one of {SCALES}, got {scale!r}")
    rewards_PxG, degenerate_P = _groups(rewards_PxG)
    centred_PxG = rewards_PxG - rewards_PxG.mean(axis=1, keepdims=True)
    if scale == "group":
        std_Px1 = rewards_PxG.std(axis=1, keepdims=True)
        centred_PxG = centred_PxG / np.where(degenerate_P[:, None], 1.0, std_Px1)
    elif scale == "batch":
        std = rewards_PxG.std()
        centred_PxG = centred_PxG / (std if std > 0 else 1.0)
    return np.where(degenerate_P[:, None], 0.0, centred_PxG).astype(np.float32), degenerate_P


def leave_one_out_advantages(rewards_PxG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(advantages_PxG, degenerate_P): each reward minus the mean of the other G - 1 rewards of its group.

    RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019): the
    baseline of sample i is (sum_j r_j - r_i) / (G - 1), so it does not depend on
    the sample it baselines and the estimate stays unbiased; equal to
    G / (G - 1) times the centred reward. Unscaled, as in the paper. A group of
    equal rewards gets exactly 0, as in `group_advantages`.
    """
    rewards_PxG, degenerate_P = _groups(rewards_PxG)
    G = rewards_PxG.shape[1]
    if G < 2:
        raise UserError("RLOO needs at least 2 samples per prompt (data.samples_per_prompt)")
    baseline_PxG = (rewards_PxG.sum(axis=1, keepdims=True) - rewards_PxG) / (G - 1)
    return np.where(degenerate_P[:, None], 0.0, rewards_PxG - baseline_PxG).astype(np.float32), degenerate_P


def _groups(rewards_PxG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rewards_PxG = np.asarray(rewards_PxG, np.float64)
    if rewards_PxG.ndim != 2 or rewards_PxG.shape[1] < 1:
        raise ValueError(f"rewards must be [prompts, samples per prompt], got shape {rewards_PxG.shape}")
    return rewards_PxG, np.all(rewards_PxG == rewards_PxG[:, :1], axis=1)


# `rl.advantage` -> (rl config -> rewards_PxG -> (advantages_PxG, degenerate_P)); a new estimator is one entry.
ADVANTAGES: dict[str, Callable[[ml_collections.ConfigDict], Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]] = {
    "grpo": lambda rc: functools.partial(group_advantages, scale=rc.scale),
    "rloo": lambda rc: leave_one_out_advantages,
}


def advantage_estimator(rc: ml_collections.ConfigDict) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The estimator `rl.advantage` names."""
    if rc.advantage not in ADVANTAGES:
        raise UserError(f"unknown rl.advantage {rc.advantage!r}; choose from {sorted(ADVANTAGES)}")
    return ADVANTAGES[rc.advantage](rc)


# ----------------------------------------------------------------------------- scorers

# (problems, their samples) -> (rewards_PxG the advantages are computed from, figures of the rollout to log)
Scorer = Callable[[list[Problem], list[list[Any]]], tuple[np.ndarray, dict[str, float]]]


def sample_reward(reward: Callable[[Problem, str], float], problem: Problem, sample, require_stop: bool) -> float:
    """The task's reward of a sample; 0 for one cut before it ended its turn when `require_stop`."""
    return 0.0 if require_stop and sample.finish_reason != "stop" else reward(problem, sample.text)


def task_scorer(task, require_stop: bool) -> Scorer:
    """A verifiable task's rewards, logged as `task_reward` (their mean), the batch's pass@1 and the shares of
    all-solved and none-solved groups."""

    def score(problems: list[Problem], samples: list[list[Any]]) -> tuple[np.ndarray, dict[str, float]]:
        rewards_PxG = np.asarray([[sample_reward(task.reward, p, s, require_stop) for s in group]
                                  for p, group in zip(problems, samples)])
        correct_PxG = rewards_PxG == 1.0
        return rewards_PxG, {"task_reward": float(rewards_PxG.mean()), "pass1_batch": float(correct_PxG.mean()),
                             "solved_all": float(correct_PxG.all(axis=1).mean()),
                             "solved_none": float((~correct_PxG.any(axis=1)).mean())}

    return score


# ----------------------------------------------------------------------------- rows


def rollout_rows(prompts: list[list[int]], samples: list[list[Any]], width: int) -> dict[str, np.ndarray]:
    """Rows {inputs, targets, loss_mask} [R, W], one per sample (prompt then completion, right-padded).

    The mask is 1 on each completion token the model sampled (its stop token
    included) and 0 on the prompt, padding and tokens the engine forced in.
    """
    rows = [(prompt, s) for prompt, group in zip(prompts, samples) for s in group]
    inputs_RxW = np.zeros((len(rows), width), np.int32)
    targets_RxW = np.zeros((len(rows), width), np.int32)
    mask_RxW = np.zeros((len(rows), width), np.float32)
    for i, (prompt, s) in enumerate(rows):
        sequence = list(prompt) + list(s.tokens)
        if len(sequence) > width + 1:
            raise UserError(f"a prompt of {len(prompt)} tokens and a completion of {len(s.tokens)} do not fit in "
                             f"data.seq_len={width} + 1; raise data.seq_len or lower rl.max_new_tokens")
        inputs_RxW[i, :len(sequence) - 1] = sequence[:-1]
        targets_RxW[i, :len(sequence) - 1] = sequence[1:]
        # Target j predicts sequence[j + 1]: completion token j + 1 - len(prompt).
        mask_RxW[i, len(prompt) - 1:len(sequence) - 1] = ~np.asarray(s.forced, bool)
    return {"inputs": inputs_RxW, "targets": targets_RxW, "loss_mask": mask_RxW}


def sample_problems(engine, tokenizer: Tokenizer, problems: list[Problem], *, n: int, temperature: float,
                    max_new_tokens: int, seed: int, batch_size: int = 64) -> list[list[Any]]:
    """`n` samples of each problem (its messages rendered for the assistant's turn), `batch_size` prompts at a time;
    a sample ends at the end of its turn or at `max_new_tokens`."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed,
                              stop_token_ids=tokenizer.chat_stop_ids)
    prompts = [tokenizer.render_for_completion(p.messages) for p in problems]
    return [group for start in range(0, len(prompts), batch_size)
            for group in engine.generate(prompts[start:start + batch_size], sampling)]


# ----------------------------------------------------------------------------- the policy and its rollouts


def load_policy(config: ml_collections.ConfigDict) -> tuple[Any, Any, Tokenizer]:
    """(model config, host params or None, tokenizer) of the chat policy an on-policy stage starts from."""
    if jax.process_count() > 1:
        raise NotImplementedError("on-policy rollouts run in one process; multi-host RL is not supported yet")
    return load_start(config, chat=True)


class Rollouts:
    """`Stage.rollout(params, step)` of an on-policy stage: each rollout's rows, advantages, old and reference
    log-probabilities, from `problems("train", P, seed)` and `score`; `step_figures` turns the step's summed loss
    aux into clip fraction, KL and entropy."""

    def __init__(self, config: ml_collections.ConfigDict, cfg, tokenizer: Tokenizer, initial_params,
                 problems: Callable[[str, int, int], list[Problem]], score: Scorer):
        dc, rc = config.data, config.rl
        self.config, self.cfg, self.tokenizer, self.initial_params = config, cfg, tokenizer, initial_params
        self.problems, self.score, self.advantages = problems, score, advantage_estimator(rc)
        self.P, self.G = dc.prompts_per_step, dc.samples_per_prompt
        micro_batch_size(self.P * self.G, config.train.grad_accum, "data.prompts_per_step * samples_per_prompt")
        if rc.kl_beta and not rc.reference:
            raise UserError("rl.kl_beta > 0 needs rl.reference=True")
        mesh, rules = sharding.make_mesh(config.mesh), dict(config.sharding)
        self.placement = sharding.batch_sharding(mesh, rules)

        def logprobs(params, batch):
            with sharding.use_rules(mesh, rules):
                return token_logprobs(cfg, params, batch)

        self.logprob_fn = jax.jit(logprobs)
        self.cached, self._reference, self.last_began, self.last_end = None, None, None, None

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
                                  seed=seed, stop_token_ids=self.tokenizer.chat_stop_ids)
        return engine_for(self.cfg, params, self.tokenizer, self.config.rl.tools).generate(prompts, sampling)

    def make_rollout(self, params, step: int):
        config, rc, dc = self.config, self.config.rl, self.config.data
        began = time.perf_counter()
        jax.block_until_ready(params)  # the previous optimizer step's work: the training share of the step
        ready = time.perf_counter()
        index = (step - 1) // rc.mu
        seed = config.seed * 1_000_003 + index
        problems = self.problems("train", self.P, seed)
        prompts = [self.tokenizer.render_for_completion(p.messages) for p in problems]
        samples = self.sample(params, prompts, n=self.G, seed=seed, temperature=rc.temperature)
        sampled = time.perf_counter()
        rewards_PxG, figures = self.score(problems, samples)
        if rc.shuffle_rewards:  # the control: the same rewards, on the wrong samples
            rng = np.random.default_rng([config.seed, index])
            rewards_PxG = rng.permutation(rewards_PxG.ravel()).reshape(rewards_PxG.shape)
        advantages_PxG, degenerate_P = self.advantages(rewards_PxG)
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
        figures = {**figures, "degenerate": float(degenerate_P.mean()), "completion_len": float(np.mean(lengths)),
                   "rollout_s": sampled - ready, "logprob_s": scored - sampled,
                   # From the previous rollout's end until the params it trained are ready: that step's training.
                   "train_s": ready - self.last_end if self.last_end else float("nan"),
                   "step_s": began - previous if previous else float("nan"),
                   "rollout_tok_s": sum(lengths) / max(sampled - ready, 1e-9)}
        A = config.train.grad_accum
        micro = [{k: v.reshape(A, -1, *v.shape[1:])[a] for k, v in rows.items()} for a in range(A)]
        return micro, figures

    def __call__(self, params, step: int):
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
