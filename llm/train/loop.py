"""The pretraining loop: data -> sharded train step -> logs, evaluation, samples, checkpoints.

    train(config, workdir)    # resumes from workdir/checkpoints when it holds a step

Step n+1 is dispatched before step n's metrics are read, so the host never waits
on the device except to log. Every `log_every` steps one line reports loss,
learning rate, gradient norm, tokens/s, MFU and ETA; every `eval_every` steps
the validation loss and bits per byte; every `sample_every` steps text samples
from fixed prompts (as llm.c does). Outputs in `workdir`: `metrics.jsonl`,
TensorBoard events, `checkpoints/`, and at the end `loss.png`, `report.md` and a
`release/` directory that `launch.sample` loads.

MFU = tokens/s * FLOPs per token / (devices * peak FLOP/s per device), with
FLOPs per token = 6 N + 12 L D T (N parameters, L layers, D width, T sequence;
llm.c's count, attention's causal half not discounted).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from llm import model, sharding
from llm.checkpoint import Checkpointer
from llm.config import model_config
from llm.data.pipeline import HostBatches, make_pipeline
from llm.data.sources import open_source, training_texts
from llm.generate import Engine, SamplingParams
from llm.release import save_release
from llm.tokenizer import Tokenizer, train_bpe
from llm.train.optimizer import learning_rate_schedule, make_optimizer
from llm.train.step import init_train_state, jit_train_step, lm_loss, state_shardings

# Dense bf16 peak FLOP/s per device, for MFU; `train.peak_flops` overrides it.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12}


@dataclasses.dataclass
class Summary:
    step: int
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    first_val_bpb: float | None


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """`data.tokenizer` by name or path; `train:VOCAB` trains our BPE on the training split once, into workdir."""
    spec = config.data.tokenizer
    if not spec.startswith("train:"):
        return Tokenizer.load(spec)
    path = os.path.join(workdir, "tokenizer.tiktoken")
    if os.path.exists(path):
        return Tokenizer.load(path)
    source = open_source(config.data.source)
    tokenizer = train_bpe(training_texts(source, config.data.val_fraction), int(spec.split(":")[1]), name="bpe")
    tokenizer.save(path)
    return tokenizer


class _Writers:
    """metrics.jsonl and TensorBoard, written only by process 0."""

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self.active = jax.process_index() == 0
        if self.active:
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def train(config: ml_collections.ConfigDict, workdir: str) -> Summary:
    """Runs (or resumes) pretraining as configured; returns the final losses."""
    os.makedirs(workdir, exist_ok=True)
    cfg = model_config(config)
    tc, dc = config.train, config.data
    tokenizer = load_or_train_tokenizer(config, workdir)
    if tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids but model.vocab_size is "
                         f"{cfg.vocab_size}; set --config.model.vocab_size={tokenizer.n_vocab} or larger")
    mesh = sharding.make_mesh(config.mesh)
    rules = dict(config.sharding)
    optimizer = make_optimizer(config.optimizer, cfg)
    schedule = learning_rate_schedule(config.optimizer)
    if dc.batch_size % tc.grad_accum:
        raise ValueError(f"data.batch_size={dc.batch_size} is not divisible by train.grad_accum={tc.grad_accum}")
    micro_batch = dc.batch_size // tc.grad_accum

    num_shards = dc.num_shards or jax.process_count()

    def pipeline(split: str) -> HostBatches:
        def shard(index: int, count: int):
            return make_pipeline(dc.source, tokenizer, seq_len=dc.seq_len, batch_size=micro_batch,
                                 seed=config.seed, split=split, packing=dc.packing, val_fraction=dc.val_fraction,
                                 worker_count=dc.worker_count, process_index=index, process_count=count)

        return HostBatches(shard, num_shards, jax.process_index(), jax.process_count())

    train_iter = pipeline("train")
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    param_sh, opt_sh = state_shardings(cfg, optimizer, mesh, rules)
    params, opt_state = init_train_state(cfg, optimizer, mesh, rules, jax.random.key(config.seed))
    start = 0
    restored = checkpointer.restore_latest(*_abstract((params, opt_state), (param_sh, opt_sh)), data_iterator=train_iter)
    if restored is not None:
        params, opt_state, start = restored.params, restored.opt_state, restored.step
        print(f"resumed from step {start} in {workdir}")
    step_fn = jit_train_step(cfg, optimizer, mesh, rules)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec((None, "batch", None), rules))
    eval_fn = _jit_eval(cfg, tokenizer, mesh, rules)

    writers = _Writers(workdir)
    fpt = model.flops_per_token(cfg, dc.seq_len)
    peak = tc.peak_flops or _device_peak_flops()
    tokens_per_step = dc.batch_size * dc.seq_len
    summary = Summary(start, math.nan, None, None, None)
    pending = None  # (step, metrics on device) of the step dispatched last
    clock, clock_step = time.perf_counter(), start
    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)

    def finish_step(step: int, device_metrics: dict) -> None:
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
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * (step - clock_step) / max(now - clock, 1e-9)
            clock, clock_step = now, step
            metrics |= {"learning_rate": float(schedule(step - 1)), "tokens_per_s": tokens_per_s}
            line = (f"step {step:6d} | loss {metrics['loss']:.4f} | lr {metrics['learning_rate']:.2e} | "
                    f"grad norm {metrics['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s")
            if peak:
                metrics["mfu"] = tokens_per_s * fpt / (peak * jax.device_count())
                line += f" | MFU {metrics['mfu']:.1%}"
            eta = (tc.steps - step) * tokens_per_step / max(tokens_per_s, 1e-9)
            bar.write(line + f" | ETA {_duration(eta)}")
            writers.write(step, metrics)

    if start > 0:  # the baseline figure was logged by the run that started this workdir
        summary.first_val_bpb = _first_logged(workdir, "val_bpb")
    if start == 0:  # the untrained model's figure, the baseline learning is measured against
        val_loss, summary.first_val_bpb = evaluate(eval_fn, params, pipeline("validation"), tc.eval_batches,
                                                   tc.grad_accum, batch_sharding)
        bar.write(f"step {0:6d} | validation loss {val_loss:.4f} | bits per byte {summary.first_val_bpb:.4f}")
        writers.write(0, {"val_loss": val_loss, "val_bpb": summary.first_val_bpb})
    for step in range(start + 1, tc.steps + 1):
        local = [next(train_iter) for _ in range(tc.grad_accum)]
        batch_local = {k: np.stack([b[k] for b in local]) for k in local[0]}
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), batch_local)
        params, opt_state, device_metrics = step_fn(params, opt_state, batch, jax.random.key(step))
        if pending is not None:
            finish_step(*pending)
        pending = (step, device_metrics)
        if step % tc.eval_every == 0 or step == tc.steps:
            finish_step(*pending)
            pending = None
            val_loss, val_bpb = evaluate(eval_fn, params, pipeline("validation"), tc.eval_batches, tc.grad_accum,
                                         batch_sharding)
            summary.val_loss, summary.val_bpb = val_loss, val_bpb
            bar.write(f"step {step:6d} | validation loss {val_loss:.4f} | bits per byte {val_bpb:.4f}")
            writers.write(step, {"val_loss": val_loss, "val_bpb": val_bpb})
        if tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps):
            if pending is not None:
                finish_step(*pending)
                pending = None
            for text in sample_texts(cfg, params, tokenizer, list(tc.sample_prompts), tc.sample_tokens):
                bar.write(f"step {step:6d} | sample | {text!r}")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            if pending is not None:  # never checkpoint a step whose loss was not checked
                finish_step(*pending)
                pending = None
            checkpointer.save(step, params, opt_state, config=config, tokenizer=tokenizer, data_iterator=train_iter)
    if pending is not None:
        finish_step(*pending)
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writers.close()
    if jax.process_index() == 0:
        save_release(os.path.join(workdir, "release"), cfg, jax.device_get(params), tokenizer)
        write_report(workdir, config, summary)
    return summary


def _first_logged(workdir: str, key: str) -> float | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return next((row[key] for row in map(json.loads, f) if key in row), None)


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _jit_eval(cfg, tokenizer: Tokenizer, mesh, rules):
    """(summed loss over byte-carrying targets, their count, their UTF-8 bytes) of one micro-batch."""
    # Special tokens carry no text bytes and are left out of bits per byte, as nanochat does.
    token_bytes = np.zeros(cfg.vocab_size, np.float32)
    for i in range(tokenizer.n_vocab):
        if i not in tokenizer.encoding._special_tokens.values():
            token_bytes[i] = len(tokenizer.decode_bytes([i]))
    token_bytes_V = jnp.asarray(token_bytes)

    def eval_step(params, batch):
        with sharding.use_rules(mesh, rules):
            bytes_BxT = token_bytes_V[batch["targets"]]
            loss_sum, count, _ = lm_loss(cfg, params, {**batch, "loss_mask": (bytes_BxT > 0).astype(jnp.float32)})
            return loss_sum, count, bytes_BxT.sum()

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate(eval_fn, params, val_pipeline, max_batches: int, grad_accum: int, batch_sharding) -> tuple[float, float]:
    """Mean validation loss (nats per token) and bits per byte over the first `max_batches` micro-batches."""
    loss_sum = count = n_bytes = 0.0
    single = NamedSharding(batch_sharding.mesh, PartitionSpec(*batch_sharding.spec[1:]))
    for i, local in enumerate(val_pipeline):
        if i >= max_batches:
            break
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(single, x), local)
        s, c, b = jax.device_get(eval_fn(params, batch))
        loss_sum, count, n_bytes = loss_sum + s, count + c, n_bytes + b
    if not count:
        raise ValueError("the validation split yielded no batch; lower data.batch_size or raise data.val_fraction")
    return float(loss_sum / count), float(loss_sum / math.log(2) / n_bytes)


def sample_texts(cfg, params, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of fixed prompts from the current params (gathered to one device)."""
    engine = Engine(cfg, jax.device_put(jax.device_get(params), jax.devices()[0]), tokenizer)
    encoded = [[tokenizer.eot, *tokenizer.encode(p)] for p in prompts]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eot,))
    return [p + s.text for p, [s] in zip(prompts, engine.generate(encoded, sampling))]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def write_report(workdir: str, config: ml_collections.ConfigDict, summary: Summary) -> None:
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
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=100)
    plt.close(fig)
    cfg = model_config(config)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(
            f"# Training report\n\n"
            f"- model: {cfg.family}, {model.count_params(cfg):,} parameters, {cfg.n_layer} layers, width {cfg.n_embd}\n"
            f"- data: {config.data.source}, sequence {config.data.seq_len}, batch {config.data.batch_size}\n"
            f"- steps: {summary.step}\n- final train loss: {summary.train_loss:.4f}\n"
            f"- validation loss: {_fmt(summary.val_loss)}\n"
            f"- validation bits per byte: {_fmt(summary.val_bpb)} (first evaluation: {_fmt(summary.first_val_bpb)})\n\n"
            f"![loss](loss.png)\n"
        )
