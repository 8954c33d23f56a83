"""Training throughput of our sharded train step against PyTorch GPT-2 training loops, eager and compiled.

    python -m bench.train_step                       # GPT-2 arch, 4 layers, d_model 256, vocab 50,304, 16 x 256, f32
    python -m bench.train_step --rounds 3            # three alternating rounds, min and median per side
    python -m bench.train_step --only nanogpt        # one side (ours | nanogpt | transformers | compiled)
    python -m bench.train_step --compile-only gpt2_124m   # compile time of a full-size step, nothing allocated
    python -m bench.train_step --tiny --only ours --only compiled   # seconds on CPU: every code path, tiny shapes

GPU, one invocation: GPT-2 124M, vocab 50,304, 16 x 1024, bf16, ours against the compiled peer,
MFU against the H100/H200 dense bf16 peak:

    python -m bench.train_step --gpt2-124m --only ours --only compiled --rounds 2 --peak-tflops 989
    python -m bench.train_step --gpt2-124m --only ours --loss-chunk 0 --peak-tflops 989   # full logits
    python -m bench.train_step --gpt2-124m --only ours --no-gpu-flags --peak-tflops 989   # XLA's defaults
    python -m bench.train_step --gpt2-124m --only ours --profile runs/profile   # where the step's time goes

All sides run the same model and random batch with AdamW (lr 3e-4, weight decay
0.1) and global-norm clipping at 1.0:

- ours: `llm.train.step.jit_train_step` on all local devices (betas 0.9/0.95,
  decay on matrices only, cosine schedule), `model.loss_chunk` from `--loss-chunk`
  (-1: the platform default, chunked cross-entropy on GPU);
- nanoGPT-style: a small eager PyTorch GPT-2 written here in nanoGPT's manner
  (pre-LN blocks, one fused qkv Linear, `F.scaled_dot_product_attention(is_causal=True)`,
  GELU(tanh), `wte` tied to `lm_head`, N(0, 0.02) init with residual projections
  scaled by 1/sqrt(2 L)), `torch.optim.AdamW` with betas (0.9, 0.95), decay on
  tensors of rank >= 2 only, fused (else foreach) kernels: the loop people
  compare a GPT-2 trainer with;
- transformers: `GPT2LMHeadModel` with `torch.optim.AdamW` at its defaults
  (betas 0.9/0.999, decay on every tensor), its own loss path, eager;
- compiled: nanoGPT's recipe on `transformers`' `GPT2LMHeadModel`: SDPA (flash)
  attention, `torch.compile`, bf16 autocast, TF32 matmuls, fused AdamW with
  betas (0.9, 0.95) and decay on rank >= 2 tensors, f32 cross-entropy.

The eager sides run under autocast for 16-bit dtypes; `torch.compile` needs a C++
toolchain at run time (and Triton on GPU), which a laptop may lack. MFU counts
llm.c's FLOPs per token, 6 N + 6 L D T (N all parameters, the tied table once),
against `--peak-tflops` (989 for H100/H200 dense bf16) or, by default, a matmul
peak the script measures on the same machine and dtype (`bench/model_step.py`).
Peak memory: the device's peak bytes in use (GPU), else the process's peak RSS;
each side runs in its own process when several are timed.

XLA flags: `GPU_XLA_FLAGS` below (JAX's GPU performance tips and NVIDIA's
JAX-Toolbox images set the latency-hiding scheduler, which overlaps collectives
with compute; on one GPU it has nothing to overlap but costs nothing) are added
to `XLA_FLAGS` before JAX starts, unless `--no-gpu-flags`; `--xla-flags="..."`
appends more for a measurement (the `=` form: the value starts with dashes), say
`--xla-flags=--xla_gpu_triton_gemm_any=true`. XLA:CPU accepts and ignores them.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def _set_xla_flags(argv: list[str]) -> None:
    """`GPU_XLA_FLAGS` (unless `--no-gpu-flags`) and `--xla-flags` into XLA_FLAGS: they must precede JAX's start."""
    flags = [] if "--no-gpu-flags" in argv else list(GPU_XLA_FLAGS)
    for arg in argv:
        if arg.startswith("--xla-flags="):
            flags += arg.split("=", 1)[1].split()
    present = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in present}
    os.environ["XLA_FLAGS"] = " ".join(present + [f for f in flags if f.split("=")[0] not in names])


_set_xla_flags(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.model_step import matmul_peak_flops  # noqa: E402
from llm import model, sharding  # noqa: E402
from llm.config import ModelConfig, base_config, model_config  # noqa: E402
from llm.train.losses import lm_loss  # noqa: E402
from llm.train.optimizer import make_optimizer  # noqa: E402
from llm.train.step import StateLayout, init_train_state, jit_train_step  # noqa: E402


def _optimizer_config(steps: int):
    opt = base_config("tiny").optimizer
    opt.update(learning_rate=3e-4, warmup_steps=0, total_steps=steps, weight_decay=0.1, grad_clip=1.0)
    return opt


def _layout(cfg: ModelConfig, optimizer) -> StateLayout:
    """FSDP rules on a data mesh over every local device, as the pretraining configs use."""
    abstract = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    return StateLayout.create(model.param_axes(cfg), abstract, optimizer, sharding.make_mesh(dict(data=-1)),
                              dict(base_config("tiny", sharding="fsdp").sharding))


def time_ours(cfg: ModelConfig, tokens: np.ndarray, steps: int, profile: str = "") -> float:
    """Seconds per optimizer step of the jitted, sharded train step (compile excluded); `profile`: trace 3 more."""
    optimizer = make_optimizer(_optimizer_config(steps), model.param_axes(cfg))
    layout = _layout(cfg, optimizer)
    params, opt_state = init_train_state(functools.partial(model.init_params, cfg), optimizer, layout,
                                         jax.random.key(0))
    step = jit_train_step(functools.partial(lm_loss, cfg), optimizer, layout)
    batch = {"inputs": tokens[None, :, :-1], "targets": tokens[None, :, 1:]}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    if profile:
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for i in range(3):
                params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
            jax.block_until_ready(metrics)
        print_profile(profile)
    return seconds


def print_profile(trace_dir: str, top: int = 25) -> None:
    """Where the traced steps' device time goes: the ops with the most summed time in the Perfetto trace."""
    import collections
    import glob
    import gzip
    import json

    path = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
               key=os.path.getmtime)
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    # A device's "XLA Ops" line has one event per HLO op; its streams hold the kernels, and the
    # "XLA Modules"/"Steps" lines span whole steps, so only one kind of line is summed.
    devices = {pid for pid, name in processes.items() if "/device:" in name}  # none on CPU: everything is summed
    lines = {k for k, name in threads.items() if k[0] in devices and name == "XLA Ops"} or \
        {k for k, name in threads.items() if k[0] in devices and name.startswith("Stream")}
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and ((e["pid"], e["tid"]) in lines if lines else True):
            totals[e["name"]] += e.get("dur", 0)
    whole = sum(totals.values()) or 1
    print(f"profile: {path}; {'device' if lines else 'all'} time {whole / 1e3:,.1f} ms over 3 steps; top ops:")
    for name, dur in totals.most_common(top):
        print(f"  {dur / 1e3:10,.2f} ms  {dur / whole:6.1%}  {name[:100]}")


def time_torch(cfg: ModelConfig, tokens: np.ndarray, steps: int, dtype: str) -> float:
    """Seconds per step of `transformers`' GPT2LMHeadModel with `torch.optim.AdamW` at its defaults."""
    import torch
    import transformers

    from llm.hf import hf_config_from_model

    hf = {k: v for k, v in hf_config_from_model(cfg).items() if k not in ("model_type", "architectures")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.1)
    batch = torch.tensor(tokens, dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def make_step():
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = net(batch[:, :-1], labels=batch[:, :-1]).loss  # the model shifts labels itself
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()

        return step

    return _torch_timed(make_step, steps, device)


def nanogpt_style(cfg: ModelConfig):
    """An eager PyTorch GPT-2 in nanoGPT's manner, the same shapes as `cfg` (written for this bench)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    D, N, L, V = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D)
            self.proj = nn.Linear(D, D)
            self.proj.residual = True

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, N, D // N).transpose(1, 2) for t in self.qkv(x).split(D, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(B, T, D))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D, eps=cfg.norm_eps), nn.LayerNorm(D, eps=cfg.norm_eps)
            self.attn = Attention()
            self.fc, self.proj = nn.Linear(D, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, D)
            self.proj.residual = True

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(cfg.max_seq_len, D)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(D, eps=cfg.norm_eps)
            self.lm_head = nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.wte.weight  # tied
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    std = 0.02 / math.sqrt(2 * L) if getattr(m, "residual", False) else 0.02
                    nn.init.normal_(m.weight, 0.0, std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))

    return GPT()


def _torch_timed(make_step, steps: int, device: str) -> float:
    """Seconds per step of `make_step()` after two warm-up steps."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step = make_step()
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def time_nanogpt(cfg: ModelConfig, tokens: np.ndarray, steps: int, dtype: str) -> float:
    """Seconds per step of the nanoGPT-style loop: forward, loss, backward, clip 1.0, AdamW."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = nanogpt_style(cfg).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]  # the tied table once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), foreach=True)
    batch = torch.tensor(tokens, dtype=torch.long, device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def make_step():
        def step():
            with autocast:
                loss = net(inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return _torch_timed(make_step, steps, device)


def time_compiled(cfg: ModelConfig, tokens: np.ndarray, steps: int, dtype: str) -> float:
    """Seconds per step of nanoGPT's recipe on `transformers`' GPT2LMHeadModel (see the module docstring)."""
    import torch
    import transformers
    from torch.nn import functional as F

    from llm.hf import hf_config_from_model

    hf = {k: v for k, v in hf_config_from_model(cfg).items() if k not in ("model_type", "architectures")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in f32, as nanoGPT
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf, attn_implementation="sdpa")).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]  # the tied table once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
    batch = torch.tensor(tokens, dtype=torch.long, device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    amp = dict(device_type=device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    @torch.compile
    def loss_fn(inputs, targets):
        with torch.autocast(**amp):  # made inside the compiled function: one graph, no break at the context
            logits = net(input_ids=inputs).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def make_step():
        def step():
            loss_fn(inputs, targets).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    return _torch_timed(make_step, steps, device)


def llmc_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """llm.c's training FLOPs per token: 6 N + 6 L D T (N every parameter, the tied table once)."""
    return 6 * model.count_params(cfg) + 6 * cfg.n_layer * cfg.n_embd * seq_len


def peak_memory_mib(side: str) -> float:
    """This process's peak memory for `side`: the accelerator's peak bytes in use (device 0), else peak RSS."""
    if side == "ours":
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    else:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compile_time(preset: str, batch: int) -> None:
    """Lowers and compiles a full-size train step from abstract shapes: no parameter is allocated."""
    config = base_config(preset, sharding="fsdp")
    cfg = model_config(config)
    optimizer = make_optimizer(config.optimizer, model.param_axes(cfg))
    layout = _layout(cfg, optimizer)
    params, opt_state = layout.abstract()
    tokens = jax.ShapeDtypeStruct((1, batch, cfg.max_seq_len), np.int32)
    step = jit_train_step(functools.partial(lm_loss, cfg), optimizer, layout)
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, {"inputs": tokens, "targets": tokens}, jax.random.key(0))
    lowered_s = time.perf_counter() - start
    lowered.compile()
    total = time.perf_counter() - start
    print(f"{preset} ({model.count_params(cfg):,} params, scan_layers={cfg.scan_layers}, batch {batch} x "
          f"{cfg.max_seq_len}) on {jax.devices()[0].device_kind}: trace+lower {lowered_s:.1f} s, "
          f"compile {total - lowered_s:.1f} s, total {total:.1f} s")


SIDES = ("ours", "nanogpt", "transformers", "compiled")


def _time_in_subprocess(side: str) -> tuple[float, float]:
    """(seconds per step, peak MiB) of one side, timed by this script in a child process with the same arguments."""
    argv = [a for a in sys.argv[1:]]
    for flag in ("--rounds", "--only"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    out = subprocess.run([sys.executable, "-m", "bench.train_step", *argv, "--only", side, "--rounds", "1"],
                         check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    timed = next(i for i, line in enumerate(lines) if line.startswith("seconds/step "))
    for line in lines[:timed]:  # the child's profile (`--profile`), printed while it timed
        if line.startswith(("profile:", "  ")):
            print(line)
    seconds = float(next(line for line in lines if line.startswith("seconds/step ")).split()[-1])
    return seconds, float(next(line for line in lines if line.startswith("peak_mib ")).split()[-1])


LABELS = {"ours": "ours (JAX)", "nanogpt": "nanoGPT-style", "transformers": "transformers",
          "compiled": "transformers+compile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds in which the sides take turns")
    parser.add_argument("--only", choices=SIDES, action="append", help="time only these sides (repeatable)")
    parser.add_argument("--compile-only", metavar="PRESET", help="only time compiling this preset's train step")
    parser.add_argument("--gpt2-124m", action="store_true",
                        help="GPT-2 124M: 12 layers, d_model 768, 12 heads, vocab 50,304, 16 x 1024, bfloat16")
    parser.add_argument("--tiny", action="store_true", help="2 layers, d_model 64, vocab 512, 2 x 32, 2 steps")
    parser.add_argument("--loss-chunk", type=int, default=-1, help="ours: model.loss_chunk (-1: platform default)")
    parser.add_argument("--remat", default="none", help="ours: model.remat")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="MFU against this peak per device (989: H100/H200 dense bf16); 0: measure a matmul")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="ours: trace 3 more steps into DIR (Perfetto) and print the ops with the most time")
    parser.add_argument("--no-gpu-flags", action="store_true", help="leave out GPU_XLA_FLAGS (read before JAX)")
    parser.add_argument("--xla-flags", default="",
                        help="more XLA flags for this run, as --xla-flags='--a=1 --b=2' (read before JAX)")
    args = parser.parse_args()
    if args.compile_only:
        compile_time(args.compile_only, args.batch)
        return
    if args.gpt2_124m:
        args.layers, args.d_model, args.heads, args.vocab, args.batch, args.seq, args.dtype = (
            12, 768, 12, 50304, 16, 1024, "bfloat16")
    if args.tiny:
        args.layers, args.d_model, args.heads, args.vocab, args.batch, args.seq, args.steps = 2, 64, 2, 512, 2, 32, 2
    cfg = ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.d_model,
                      n_head=args.heads, n_kv_head=args.heads, mlp_dim=4 * args.d_model, max_seq_len=1024,
                      dtype=args.dtype, loss_chunk=args.loss_chunk, remat=args.remat)
    tokens = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq
    fpt = llmc_flops_per_token(cfg, args.seq)
    timers = {"ours": lambda: time_ours(cfg, tokens, args.steps, args.profile),
              "nanogpt": lambda: time_nanogpt(cfg, tokens, args.steps, args.dtype),
              "transformers": lambda: time_torch(cfg, tokens, args.steps, args.dtype),
              "compiled": lambda: time_compiled(cfg, tokens, args.steps, args.dtype)}
    sides = [s for s in SIDES if s in (args.only or SIDES)]
    times: dict[str, list[float]] = {s: [] for s in sides}
    peaks: dict[str, float] = {s: 0.0 for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            # Several sides: each in a fresh process, so no side's thread pool or memory outlives its turn.
            if len(sides) == 1:
                seconds, peak_mib = timers[side](), peak_memory_mib(side)
            else:
                seconds, peak_mib = _time_in_subprocess(side)
            times[side].append(seconds)
            peaks[side] = max(peaks[side], peak_mib)
    if len(sides) == 1 and args.rounds == 1 and args.only:
        # A child's answer to `_time_in_subprocess`; printed before anything that could fail.
        print(f"seconds/step {times[sides[0]][0]!r}")
        print(f"peak_mib {peaks[sides[0]]!r}")
    peak = args.peak_tflops * 1e12 or matmul_peak_flops(np.float32 if args.dtype == "float32" else jax.numpy.bfloat16)
    from llm.train.xent import loss_chunk

    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}), JAX "
          f"{jax.__version__}; GPT-2 arch {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, batch "
          f"{args.batch} x {args.seq}, {args.dtype}; ours: loss_chunk {loss_chunk(cfg)}, remat {args.remat}, "
          f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}; "
          f"{'stated' if args.peak_tflops else 'measured matmul'} peak {peak / 1e12:,.1f} TFLOP/s per device; "
          f"MFU by llm.c's 6N + 6LDT = {fpt / 1e6:,.0f} MFLOP/token; "
          f"{args.rounds} round(s) of {args.steps} steps per side")
    median = {s: statistics.median(t) for s, t in times.items()}
    for side in sides:
        seconds = median[side]
        tps = tokens_per_step / seconds
        spread = f"  (min {min(times[side]) * 1e3:.1f}, max {max(times[side]) * 1e3:.1f})" if args.rounds > 1 else ""
        print(f"{LABELS[side]:20} {tps:10,.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
              f"MFU {tps * fpt / (peak * jax.device_count()):6.1%}  peak memory {peaks[side]:9,.0f} MiB{spread}")
    for peer in ("nanogpt", "transformers", "compiled"):
        if "ours" in median and peer in median:
            per_round = sorted(p / o for o, p in zip(times["ours"], times[peer]))
            print(f"ratio ours / {LABELS[peer]}: {median[peer] / median['ours']:.2f}x (throughput; "
                  f"per round {', '.join(f'{r:.2f}' for r in per_round)})")


if __name__ == "__main__":
    main()
