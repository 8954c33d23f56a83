"""Training throughput of our sharded train step against two eager PyTorch GPT-2 training loops.

    python -m bench.train_step                       # GPT-2 arch, 4 layers, d_model 256, vocab 50,304, 16 x 256, f32
    python -m bench.train_step --rounds 3            # three alternating rounds, min and median per side
    python -m bench.train_step --only nanogpt        # one side (ours | nanogpt | transformers)
    python -m bench.train_step --compile-only gpt2_124m   # compile time of a full-size step, nothing allocated

All sides run the same model and random batch with AdamW (lr 3e-4, weight decay
0.1) and global-norm clipping at 1.0:

- ours: `llm.train.step.jit_train_step` on all local devices (betas 0.9/0.95,
  decay on matrices only, cosine schedule);
- nanoGPT-style: a small eager PyTorch GPT-2 written here in nanoGPT's manner
  (pre-LN blocks, one fused qkv Linear, `F.scaled_dot_product_attention(is_causal=True)`,
  GELU(tanh), `wte` tied to `lm_head`, N(0, 0.02) init with residual projections
  scaled by 1/sqrt(2 L)), `torch.optim.AdamW` with betas (0.9, 0.95), decay on
  tensors of rank >= 2 only, fused (else foreach) kernels: the loop people
  compare a GPT-2 trainer with;
- transformers: `GPT2LMHeadModel` with `torch.optim.AdamW` at its defaults
  (betas 0.9/0.999, decay on every tensor), its own loss path.

The PyTorch sides run eager, under autocast for 16-bit dtypes (`torch.compile`
is not used: it needs a C++ toolchain at run time, which a laptop may lack).
MFU is measured against a matmul peak the script measures itself on the same
machine and dtype (`bench/model_step.py`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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


def time_ours(cfg: ModelConfig, tokens: np.ndarray, steps: int) -> float:
    """Seconds per optimizer step of the jitted, sharded train step (compile excluded)."""
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
    return (time.perf_counter() - start) / steps


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


SIDES = ("ours", "nanogpt", "transformers")


def _time_in_subprocess(side: str) -> float:
    """Seconds per step of one side, timed by this script in a child process with the same arguments."""
    argv = [a for a in sys.argv[1:]]
    for flag in ("--rounds", "--only"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    out = subprocess.run([sys.executable, "-m", "bench.train_step", *argv, "--only", side, "--rounds", "1"],
                         check=True, capture_output=True, text=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("seconds/step "))
                 .split()[-1])
LABELS = {"ours": "ours (JAX)", "nanogpt": "nanoGPT-style", "transformers": "transformers"}


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
    args = parser.parse_args()
    if args.compile_only:
        compile_time(args.compile_only, args.batch)
        return
    cfg = ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.d_model,
                      n_head=args.heads, n_kv_head=args.heads, mlp_dim=4 * args.d_model, max_seq_len=1024,
                      dtype=args.dtype)
    tokens = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq
    peak = matmul_peak_flops(np.float32 if args.dtype == "float32" else jax.numpy.bfloat16)
    fpt = model.flops_per_token(cfg, args.seq)
    timers = {"ours": lambda: time_ours(cfg, tokens, args.steps),
              "nanogpt": lambda: time_nanogpt(cfg, tokens, args.steps, args.dtype),
              "transformers": lambda: time_torch(cfg, tokens, args.steps, args.dtype)}
    sides = [s for s in SIDES if s in (args.only or SIDES)]
    times: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            # Several sides: each in a fresh process, so no side's thread pool or memory outlives its turn.
            times[side].append(timers[side]() if len(sides) == 1 else _time_in_subprocess(side))
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}); GPT-2 arch "
          f"{args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
          f"{args.dtype}; measured matmul peak {peak / 1e9:,.1f} GFLOP/s per device; "
          f"{args.rounds} round(s) of {args.steps} steps per side")
    median = {s: statistics.median(t) for s, t in times.items()}
    if len(sides) == 1:
        print(f"seconds/step {median[sides[0]]!r}")
    for side in sides:
        seconds = median[side]
        tps = tokens_per_step / seconds
        spread = f"  (min {min(times[side]) * 1e3:.1f}, max {max(times[side]) * 1e3:.1f})" if args.rounds > 1 else ""
        print(f"{LABELS[side]:14} {tps:10,.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
              f"MFU {tps * fpt / (peak * jax.device_count()):6.1%}{spread}")
    for peer in ("nanogpt", "transformers"):
        if "ours" in median and peer in median:
            per_round = sorted(p / o for o, p in zip(times["ours"], times[peer]))
            print(f"ratio ours / {LABELS[peer]}: {median[peer] / median['ours']:.2f}x (throughput; "
                  f"per round {', '.join(f'{r:.2f}' for r in per_round)})")


if __name__ == "__main__":
    main()
