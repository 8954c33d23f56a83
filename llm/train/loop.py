"""The stage-agnostic driver: a `Stage` (params, loss, batches, hooks) -> sharded steps, logs, checkpoints, release.

    summary = run("pretrain", build_stage, config, workdir)   # resumes from workdir/checkpoints

Every stage (pretraining, SFT, the reward model, DPO, GRPO, RLHF) is a `build_stage(config,
workdir) -> Stage` and this one loop: step n+1 is dispatched before step n's
metrics are read, so the host never waits on the device except to log; a NaN or
Inf loss or parameter stops the run before it is checkpointed; every
`checkpoint_every` steps the state, the config, the tokenizer, the stage's
data position and its own state (`Stage.state`) are saved; every `log_every` steps a line (and `metrics.jsonl`,
TensorBoard) reports loss, learning rate, gradient norm, tokens/s, MFU and ETA;
every `eval_every` and `sample_every` steps the stage's hooks run; at the end the
stage's release, `loss.png` and `report.md` are written, then its `finish` hook.

Resuming cannot lose work: before anything is built or written the newest
checkpoint's config and run identity are compared with this run's
(`check_resumable`), and a difference (another model, another stage, another
process count) stops with `ResumeMismatch`, every file untouched.

MFU = tokens/s * FLOPs per token / (devices * peak FLOP/s per device), with the
stage's FLOPs per token (`model.flops_per_token`, llm.c's count, for language modelling).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from llm import sharding
from llm.checkpoint import Checkpointer
from llm.config import EXECUTION_FIELDS, ModelConfig
from llm.errors import UserError
from llm.release import save_release
from llm.tokenizer import Tokenizer
from llm.train.logs import Writers, duration, first_logged, write_report
from llm.train.optimizer import learning_rate_schedule, make_optimizer
from llm.train.step import LossFn, StateLayout, init_opt_state, init_train_state, jit_train_step, place_params, \
    split_frozen

# Dense bf16 peak FLOP/s per device, for MFU; `train.peak_flops` overrides it.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass
class Stage:
    """What a stage gives the driver; the loop, logging, checkpoints and release are shared.

    A stage trains either on `batches` (an iterator of this process's
    micro-batches, saved and restored with each checkpoint) or, on-policy, on
    `rollout(params, step)`: the step's micro-batches made from the current
    params. Its own state (`state(step)` -> JSON, `restore(state, step)`) is saved in
    every checkpoint step and given back on resume with that step, so nothing it
    remembers can come from steps a resumed run replays.
    """

    cfg: ModelConfig  # the Transformer inside the params (samples, MFU, the default release)
    tokenizer: Tokenizer
    axes: Any  # logical axes of every parameter, in the params tree layout
    init_params: Callable[[jax.Array], Any]  # fresh params from a key; its shapes define the state
    loss_fn: LossFn
    batches: Iterator[dict[str, np.ndarray]] | None = None  # this process's micro-batches; get_state/set_state
    # On-policy stages: (sharded params, step) -> (the step's micro-batches, host figures to log).
    rollout: Callable[[Any, int], tuple[list[dict[str, np.ndarray]], dict[str, float]]] | None = None
    initial_params: Any = None  # host params to start from (`init_from`), with a fresh optimizer state
    frozen: tuple[str, ...] = ()  # subtrees that are not trained ("backbone")
    tokens_per_step: int = 0  # global tokens per optimizer step, for tokens/s and MFU; 0 leaves them out
    flops_per_token: float = 0.0
    evaluate: Callable[[Any, int], dict[str, float]] | None = None  # (sharded params, step) -> figures
    sample: Callable[[Any], list[str]] | None = None  # host params -> texts, every sample_every (process 0)
    release: Callable[[str, Any], None] | None = None  # (directory, host params); default: `save_release`
    finish: Callable[[str, "Summary"], None] | None = None  # (workdir, summary) after the report (process 0): plots
    describe: str = ""  # one line for the report: the data the stage trains on
    step_figures: Callable[[dict[str, float]], dict[str, float]] | None = None  # summed step metrics -> ratios to log
    # Checked after each evaluation: True ends the run there (checkpoint, release, report), e.g. RLHF's monitor.
    should_stop: Callable[[], bool] | None = None
    state: Callable[[int], dict[str, Any]] | None = None  # step -> the stage's own state, saved with that step
    restore: Callable[[dict[str, Any], int], None] | None = None  # (saved state, its step) on resume

    def __post_init__(self):
        if (self.batches is None) == (self.rollout is None):
            raise ValueError("a stage trains on batches or on rollouts: give exactly one")
        if (self.state is None) != (self.restore is None):
            raise ValueError("a stage with its own state gives both state() and restore()")


@dataclasses.dataclass
class Summary:
    step: int
    train_loss: float
    evals: dict[str, float]  # the last evaluation
    first_evals: dict[str, float]  # the first one (step 0 of the run that started the workdir)


class ResumeMismatch(ValueError):
    """The workdir holds checkpoints of another run; nothing was written."""


# ----------------------------------------------------------------------------- resume safety


def run_identity(stage_name: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields a resumed run must share with the checkpoint: the model, the stage, the data stream.

    Execution knobs (remat, dtype, scan_layers, attention kernel), the step count, the
    schedule and logging may change between runs of one workdir; what defines the
    parameters or the data position may not.
    """
    identity = {"stage": stage_name, "init_from": config.get("init_from", ""), "seed": config.seed}
    identity |= {f"model.{k}": v for k, v in config.model.items() if k not in EXECUTION_FIELDS}
    # Every data field shapes the stream the saved position points into, except how it is read.
    for key, value in config.get("data", {}).items():
        if key not in ("worker_count", "num_shards"):  # num_shards: compared as effective, with the process count
            identity |= _flat(f"data.{key}", value)
    return identity


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """A nested config section as dotted keys, so a difference names its field."""
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        return {k: v for name, child in value.items() for k, v in _flat(f"{prefix}.{name}", child).items()}
    return {prefix: value}


def _process_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The data position is saved per process: resuming it needs the same processes and data shards."""
    shards = config.get("data", {}).get("num_shards", 0) or jax.process_count()
    return {"process_count": jax.process_count(), "data.num_shards": shards}


def check_resumable(stage_name: str, config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The newest checkpoint step if this run may resume it, None if there is none; else `ResumeMismatch`."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    checkpointer = Checkpointer(directory, keep=1_000_000)  # never deletes: it saves nothing
    try:
        saved = checkpointer.saved_run()
    finally:
        checkpointer.close()
    if saved is None:
        return None
    step, saved_config, saved_run = saved
    mine, theirs = run_identity(stage_name, config), run_identity(saved_run.get("stage", stage_name), saved_config)
    if saved_run:  # checkpoints from before the run item had one stage and did not record processes
        mine |= _process_identity(config)
        theirs |= {k: saved_run.get(k) for k in _process_identity(config)}
    differ = [f"{k}: {theirs.get(k, 'unset')!r} there, {mine.get(k, 'unset')!r} here"
              for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if differ:
        raise ResumeMismatch(
            f"{workdir} holds checkpoints (newest: step {step}) of a different run, so this run cannot resume "
            f"them; nothing was written.\n  " + "\n  ".join(differ) + "\n"
            f"Use a new --workdir for this run, or resume with the saved config "
            f"({os.path.join(directory, str(step), 'config')})."
        )
    return step


# ----------------------------------------------------------------------------- the driver


def step_key(seed: int, step: int) -> jax.Array:
    """The step's random key: from the config's seed and the step, so a resumed run draws the same keys."""
    return jax.random.fold_in(jax.random.key(seed), step)


def runner(stage_name: str, build_stage: Callable[[ml_collections.ConfigDict, str], Stage], doc: str
           ) -> Callable[[ml_collections.ConfigDict, str], Summary]:
    """A stage module's `run(config, workdir) -> Summary`: `run(stage_name, build_stage, ...)`, documented by `doc`."""

    def run_stage(config: ml_collections.ConfigDict, workdir: str) -> Summary:
        return run(stage_name, build_stage, config, workdir)

    run_stage.__doc__, run_stage.__name__ = doc, "run"
    return run_stage


def run(stage_name: str, build_stage: Callable[[ml_collections.ConfigDict, str], Stage],
        config: ml_collections.ConfigDict, workdir: str) -> Summary:
    """Runs (or resumes) one stage as configured; returns the final losses and evaluations."""
    check_resumable(stage_name, config, workdir)  # before anything is built or written
    os.makedirs(workdir, exist_ok=True)
    stage = build_stage(config, workdir)
    tc = config.train
    mesh = sharding.make_mesh(config.mesh)
    rules = dict(config.sharding)
    optimizer = make_optimizer(config.optimizer, split_frozen(stage.axes, stage.frozen)[0])
    schedule = learning_rate_schedule(config.optimizer)
    layout = StateLayout.create(stage.axes, jax.eval_shape(stage.init_params, jax.random.key(0)), optimizer, mesh,
                                rules, stage.frozen)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    restored = checkpointer.restore_latest(*layout.abstract(), data_iterator=stage.batches)
    if restored is not None:
        params, opt_state, start = restored.params, restored.opt_state, restored.step
        print(f"resumed from step {start} in {workdir}")
        if stage.restore is not None:
            if restored.stage_state is None:
                raise UserError(f"checkpoint step {start} in {workdir} holds no {stage_name} state to resume "
                                f"(written before stages saved theirs); use a new --workdir")
            stage.restore(restored.stage_state, start)
    elif stage.initial_params is not None:
        _check_shapes(stage.initial_params, layout.abstract()[0], config.init_from)
        params = place_params(stage.initial_params, layout)
        opt_state, start = init_opt_state(optimizer, params, layout), 0
    else:
        params, opt_state = init_train_state(stage.init_params, optimizer, layout, jax.random.key(config.seed))
        start = 0
    step_fn = jit_train_step(stage.loss_fn, optimizer, layout)
    run_item = {"stage": stage_name, **_process_identity(config)}

    writers = Writers(workdir, start)
    peak = tc.peak_flops or _device_peak_flops()
    summary = Summary(start, math.nan, {}, {})
    pending = None  # (step, metrics on device, host figures) of the step dispatched last
    clock, clock_step = time.perf_counter(), start
    bar = tqdm(total=tc.steps, initial=start, desc=stage_name, disable=jax.process_index() != 0, dynamic_ncols=True)

    def finish_step(step: int, device_metrics: dict, host_figures: dict) -> None:
        nonlocal clock, clock_step
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not math.isfinite(metrics["loss"]) or not metrics.pop("params_finite"):
            checkpointer.wait()
            what = f"loss is {metrics['loss']}" if not math.isfinite(metrics["loss"]) else "non-finite parameters"
            raise FloatingPointError(
                f"{what} at step {step}; stopping. The last good checkpoint is step "
                f"{checkpointer.latest_step()} in {workdir}/checkpoints (lower optimizer.learning_rate and resume)"
            )
        summary.step, summary.train_loss = step, metrics["loss"]
        extra = {**host_figures, **(stage.step_figures(metrics) if stage.step_figures else {})}
        metrics |= extra
        bar.update(1)
        if _every(step, tc.log_every, tc.steps):
            now = time.perf_counter()
            steps_per_s = (step - clock_step) / max(now - clock, 1e-9)
            clock, clock_step = now, step
            metrics["learning_rate"] = float(schedule(step - 1))
            line = (f"step {step:6d} | loss {metrics['loss']:.4f} | lr {metrics['learning_rate']:.2e} | "
                    f"grad norm {metrics['grad_norm']:.3f}")
            if stage.tokens_per_step:
                metrics["tokens_per_s"] = stage.tokens_per_step * steps_per_s
                line += f" | {metrics['tokens_per_s']:,.0f} tok/s"
                if peak and stage.flops_per_token:
                    metrics["mfu"] = metrics["tokens_per_s"] * stage.flops_per_token / (peak * jax.device_count())
                    line += f" | MFU {metrics['mfu']:.1%}"
            line += "".join(f" | {k} {v:.4g}" for k, v in extra.items())
            bar.write(line + f" | ETA {duration((tc.steps - step) / max(steps_per_s, 1e-9))}")
            writers.write(step, metrics)

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            finish_step(*pending)
            pending = None

    def evaluate(step: int) -> None:
        figures = stage.evaluate(params, step)
        summary.evals = figures
        bar.write(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        writers.write(step, figures)

    if stage.evaluate is not None:
        if start == 0:  # the starting model's figures, the baseline the stage is measured against
            evaluate(0)
            summary.first_evals = dict(summary.evals)
        else:  # logged by the run that started this workdir
            summary.first_evals = first_logged(workdir)
    for step in range(start + 1, tc.steps + 1):
        if stage.rollout is not None:  # sampled from the params of this moment: waits for the previous step
            micro_batches, host_figures = stage.rollout(params, step)
        else:
            micro_batches, host_figures = [next(stage.batches) for _ in range(tc.grad_accum)], {}
        batch = _global_batch(micro_batches, layout)
        params, opt_state, device_metrics = step_fn(params, opt_state, batch, step_key(config.seed, step))
        flush()
        pending = (step, device_metrics, host_figures)
        if stage.evaluate is not None and _every(step, tc.eval_every, tc.steps):
            flush()
            evaluate(step)
        if stage.sample is not None and tc.sample_every and _every(step, tc.sample_every, tc.steps):
            flush()
            host = sharding.gather_to_host(params)  # every process takes part; process 0 samples
            if jax.process_index() == 0:
                for text in stage.sample(host):
                    bar.write(f"step {step:6d} | sample | {text!r}")
        stop = stage.should_stop is not None and stage.should_stop()
        if _every(step, tc.checkpoint_every, tc.steps) or stop:
            flush()  # never checkpoint a step whose loss was not checked
            checkpointer.save(step, params, opt_state, config=config, tokenizer=stage.tokenizer,
                              data_iterator=stage.batches, run=run_item,
                              stage_state=stage.state(step) if stage.state is not None else None)
        if stop:
            bar.write(f"step {step:6d} | stopped early by the stage (see the log above)")
            break
    flush()
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writers.close()
    host = sharding.gather_to_host(params)
    if jax.process_index() == 0:
        release_dir = os.path.join(workdir, "release")
        if stage.release is not None:
            stage.release(release_dir, host)
        else:
            save_release(release_dir, stage.cfg, host, stage.tokenizer)
        write_report(workdir, stage_name, stage, summary)
        if stage.finish is not None:
            stage.finish(workdir, summary)
    return summary


def _every(step: int, every: int, last: int) -> bool:
    """Whether a hook that runs every `every` steps runs at `step`: always at the last step; 0: only then."""
    return step == last or bool(every) and step % every == 0


def _global_batch(micro_batches: list[dict[str, np.ndarray]], layout: StateLayout) -> dict[str, jax.Array]:
    """This process's micro-batches stacked [A, B_local, ...] into global arrays split along `batch`."""
    local = {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(layout.batch_sharding, x), local)


def _check_shapes(host_params: Any, abstract_params: Any, source: str) -> None:
    if jax.tree.structure(host_params) != jax.tree.structure(abstract_params) or any(
            np.shape(x) != w.shape for x, w in zip(jax.tree.leaves(host_params), jax.tree.leaves(abstract_params))):
        raise ValueError(f"init_from={source!r}: its parameters do not have the shapes this stage's model has")


def _device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


