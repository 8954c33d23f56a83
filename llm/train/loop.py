"""The stage-agnostic driver: a `Stage` (params, loss, batches, hooks) -> sharded steps, logs, checkpoints, release.

    summary = run("pretrain", build_stage, config, workdir)   # resumes from workdir/checkpoints

Every stage (pretraining, SFT, the reward model, GRPO, DPO) is a `build_stage(config,
workdir) -> Stage` and this one loop: step n+1 is dispatched before step n's
metrics are read, so the host never waits on the device except to log; a NaN or
Inf loss or parameter stops the run before it is checkpointed; every
`checkpoint_every` steps the state, the config, the tokenizer and the stage's
data position are saved; every `log_every` steps a line (and `metrics.jsonl`,
TensorBoard) reports loss, learning rate, gradient norm, tokens/s, MFU and ETA;
every `eval_every` and `sample_every` steps the stage's hooks run; at the end the
stage's release, `loss.png` and `report.md` are written.

Resuming cannot lose work: before anything is built or written the newest
checkpoint's config and run identity are compared with this run's
(`check_resumable`), and a difference (another model, another stage, another
process count) stops with `ResumeMismatch`, every file untouched.

MFU = tokens/s * FLOPs per token / (devices * peak FLOP/s per device), with the
stage's FLOPs per token (`model.flops_per_token`, llm.c's count, for language modelling).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from llm import model, sharding
from llm.checkpoint import Checkpointer
from llm.config import EXECUTION_FIELDS, ModelConfig, model_config
from llm.release import load_release, save_release
from llm.tokenizer import Tokenizer
from llm.train.optimizer import learning_rate_schedule, make_optimizer
from llm.train.step import LossFn, StateLayout, init_opt_state, init_train_state, jit_train_step, place_params, \
    split_frozen

# Dense bf16 peak FLOP/s per device, for MFU; `train.peak_flops` overrides it.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass
class Stage:
    """What a stage gives the driver; the loop, logging, checkpoints and release are shared."""

    cfg: ModelConfig  # the Transformer inside the params (samples, MFU, the default release)
    tokenizer: Tokenizer
    axes: Any  # logical axes of every parameter, in the params tree layout
    init_params: Callable[[jax.Array], Any]  # fresh params from a key; its shapes define the state
    loss_fn: LossFn
    batches: Iterator[dict[str, np.ndarray]]  # this process's micro-batches; get_state/set_state to resume
    initial_params: Any = None  # host params to start from (`init_from`), with a fresh optimizer state
    frozen: tuple[str, ...] = ()  # subtrees that are not trained ("backbone")
    tokens_per_step: int = 0  # global tokens per optimizer step, for tokens/s and MFU; 0 leaves them out
    flops_per_token: float = 0.0
    evaluate: Callable[[Any], dict[str, float]] | None = None  # sharded params -> figures, every eval_every
    sample: Callable[[Any], list[str]] | None = None  # host params -> texts, every sample_every (process 0)
    release: Callable[[str, Any], None] | None = None  # (directory, host params); default: `save_release`
    describe: str = ""  # one line for the report: the data the stage trains on
    # On-policy stages (GRPO): (params, step) -> (the step's micro-batches, host figures to log), called with the
    # current sharded params in place of `batches`; `batches` then only carries the data position for checkpoints.
    rollout: Callable[[Any, int], tuple[list[dict[str, np.ndarray]], dict[str, float]]] | None = None
    step_figures: Callable[[dict[str, float]], dict[str, float]] | None = None  # summed step metrics -> ratios to log
    # Checked after each evaluation: True ends the run there (checkpoint, release, report), e.g. RLHF's monitor.
    should_stop: Callable[[], bool] | None = None


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


# ----------------------------------------------------------------------------- logs


class _Writers:
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


# ----------------------------------------------------------------------------- the driver


def step_key(seed: int, step: int) -> jax.Array:
    """The step's random key: from the config's seed and the step, so a resumed run draws the same keys."""
    return jax.random.fold_in(jax.random.key(seed), step)


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
    elif stage.initial_params is not None:
        _check_shapes(stage.initial_params, layout.abstract()[0], config.init_from)
        params = place_params(stage.initial_params, layout)
        opt_state, start = init_opt_state(optimizer, params, layout), 0
    else:
        params, opt_state = init_train_state(stage.init_params, optimizer, layout, jax.random.key(config.seed))
        start = 0
    step_fn = jit_train_step(stage.loss_fn, optimizer, layout)
    run_item = {"stage": stage_name, **_process_identity(config)}

    writers = _Writers(workdir, start)
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
        if step % tc.log_every == 0 or step == tc.steps:
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
            bar.write(line + f" | ETA {_duration((tc.steps - step) / max(steps_per_s, 1e-9))}")
            writers.write(step, metrics)

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            finish_step(*pending)
            pending = None

    def evaluate(step: int) -> None:
        figures = stage.evaluate(params)
        summary.evals = figures
        bar.write(f"step {step:6d} | " + " | ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        writers.write(step, figures)

    if stage.evaluate is not None:
        if start == 0:  # the starting model's figures, the baseline the stage is measured against
            evaluate(0)
            summary.first_evals = dict(summary.evals)
        else:  # logged by the run that started this workdir
            summary.first_evals = _first_logged(workdir)
    for step in range(start + 1, tc.steps + 1):
        if stage.rollout is not None:  # sampled from the params of this moment: waits for the previous step
            micro_batches, host_figures = stage.rollout(params, step)
        else:
            micro_batches, host_figures = [next(stage.batches) for _ in range(tc.grad_accum)], {}
        batch = _global_batch(micro_batches, layout)
        params, opt_state, device_metrics = step_fn(params, opt_state, batch, step_key(config.seed, step))
        flush()
        pending = (step, device_metrics, host_figures)
        if stage.evaluate is not None and (step % tc.eval_every == 0 or step == tc.steps):
            flush()
            evaluate(step)
        if stage.sample is not None and tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps):
            flush()
            host = sharding.gather_to_host(params)  # every process takes part; process 0 samples
            if jax.process_index() == 0:
                for text in stage.sample(host):
                    bar.write(f"step {step:6d} | sample | {text!r}")
        stop = stage.should_stop is not None and stage.should_stop()
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
            flush()  # never checkpoint a step whose loss was not checked
            checkpointer.save(step, params, opt_state, config=config, tokenizer=stage.tokenizer,
                              data_iterator=stage.batches, run=run_item)
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
    return summary


def load_init_from(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Any, Tokenizer]:
    """(model config, host params, tokenizer) of `config.init_from`: params only, no optimizer or data state.

    A training workdir gives its newest readable checkpoint; anything else goes to
    `load_release` (our release directories, Hugging Face directories and hub ids).
    The released model is used as it is, with this config's execution knobs
    (`model.remat`, `dtype`, ...) and the release's own tokenizer.
    """
    source = config.init_from
    knobs = {k: config.model[k] for k in EXECUTION_FIELDS}
    if os.path.isdir(os.path.join(source, "checkpoints")):
        checkpointer = Checkpointer(os.path.join(source, "checkpoints"), keep=1_000_000)
        try:
            saved = checkpointer.saved_run()
            if saved is None:
                raise FileNotFoundError(f"init_from={source!r}: the workdir has no readable checkpoint")
            _, saved_config, _ = saved
            cfg = dataclasses.replace(model_config(saved_config), **knobs)
            abstract = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
            single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            step, params = checkpointer.restore_params(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), abstract))
            tokenizer = checkpointer.restore_tokenizer(step)
        finally:
            checkpointer.close()
        print(f"init_from: step {step} of {source}")
    else:
        cfg, params, tokenizer = load_release(source)
        cfg = dataclasses.replace(cfg, **knobs)
        print(f"init_from: {source}")
    return cfg, jax.tree.map(np.asarray, params), tokenizer


def _global_batch(micro_batches: list[dict[str, np.ndarray]], layout: StateLayout) -> dict[str, jax.Array]:
    """This process's micro-batches stacked [A, B_local, ...] into global arrays split along `batch`."""
    local = {k: np.stack([b[k] for b in micro_batches]) for k in micro_batches[0]}
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(layout.batch_sharding, x), local)


def _check_shapes(host_params: Any, abstract_params: Any, source: str) -> None:
    if jax.tree.structure(host_params) != jax.tree.structure(abstract_params) or any(
            np.shape(x) != w.shape for x, w in zip(jax.tree.leaves(host_params), jax.tree.leaves(abstract_params))):
        raise ValueError(f"init_from={source!r}: its parameters do not have the shapes this stage's model has")


def _first_logged(workdir: str) -> dict[str, float]:
    """The evaluation logged at step 0 by the run that started the workdir."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        row = next((row for row in map(json.loads, f) if row["step"] == 0), {"step": 0})
    return {k: v for k, v in row.items() if k != "step"}


def _device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def write_report(workdir: str, stage_name: str, stage: Stage, summary: Summary) -> None:
    """loss.png from metrics.jsonl and a short report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)
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
