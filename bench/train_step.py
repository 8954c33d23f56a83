"""Training throughput of our sharded train step against a PyTorch `transformers` training loop, one run.

    python -m bench.train_step                       # GPT-2 arch, 4 layers, d_model 256, vocab 50,304, 16 x 256, f32
    python -m bench.train_step --compile-only gpt2_124m   # compile time of a full-size step, nothing allocated

Both sides run the same model and batch with AdamW (lr 3e-4, weight decay 0.1)
and global-norm clipping at 1.0: ours is `llm.train.step.jit_train_step` on all
local devices, theirs `GPT2LMHeadModel` with `torch.optim.AdamW`
under autocast for 16-bit dtypes (`torch.compile` is not used: it needs a C++
toolchain at run time, which a laptop may lack). MFU is measured against a matmul peak the script measures
itself on the same machine and dtype (`bench/model_step.py`).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.model_step import matmul_peak_flops  # noqa: E402
from llm import model, sharding  # noqa: E402
from llm.config import ModelConfig, base_config, model_config  # noqa: E402
from llm.train.optimizer import make_optimizer  # noqa: E402
from llm.train.step import init_train_state, jit_train_step  # noqa: E402


def _optimizer_config(steps: int):
    opt = base_config("tiny").optimizer
    opt.update(learning_rate=3e-4, warmup_steps=0, total_steps=steps, weight_decay=0.1, grad_clip=1.0)
    return opt


def time_ours(cfg: ModelConfig, tokens: np.ndarray, steps: int) -> float:
    """Seconds per optimizer step of the jitted, sharded train step (compile excluded)."""
    config = base_config("tiny", sharding="fsdp")
    optimizer = make_optimizer(_optimizer_config(steps), cfg)
    mesh = sharding.make_mesh(dict(data=-1))
    rules = dict(config.sharding)
    params, opt_state = init_train_state(cfg, optimizer, mesh, rules, jax.random.key(0))
    step = jit_train_step(cfg, optimizer, mesh, rules)
    batch = {"inputs": tokens[None, :, :-1], "targets": tokens[None, :, 1:]}
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def time_torch(cfg: ModelConfig, tokens: np.ndarray, steps: int, dtype: str) -> float:
    import torch
    import transformers

    from llm.hf import hf_config_from_model

    hf = {k: v for k, v in hf_config_from_model(cfg).items() if k not in ("model_type", "architectures")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.1)
    batch = torch.tensor(tokens, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = net(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def compile_time(preset: str, batch: int) -> None:
    """Lowers and compiles a full-size train step from abstract shapes: no parameter is allocated."""
    config = base_config(preset, sharding="fsdp")
    cfg = model_config(config)
    optimizer = make_optimizer(config.optimizer, cfg)
    mesh = sharding.make_mesh(dict(data=-1))
    rules = dict(config.sharding)
    params = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    opt_state = jax.eval_shape(optimizer.init, params)
    tokens = jax.ShapeDtypeStruct((1, batch, cfg.max_seq_len), np.int32)
    step = jit_train_step(cfg, optimizer, mesh, rules)
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, {"inputs": tokens, "targets": tokens}, jax.random.key(0))
    lowered_s = time.perf_counter() - start
    lowered.compile()
    total = time.perf_counter() - start
    print(f"{preset} ({model.count_params(cfg):,} params, scan_layers={cfg.scan_layers}, batch {batch} x "
          f"{cfg.max_seq_len}) on {jax.devices()[0].device_kind}: trace+lower {lowered_s:.1f} s, "
          f"compile {total - lowered_s:.1f} s, total {total:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
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
    torch_s = time_torch(cfg, tokens, args.steps, args.dtype)
    ours_s = time_ours(cfg, tokens, args.steps)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()}); GPT-2 arch "
          f"{args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
          f"{args.dtype}; measured matmul peak {peak / 1e9:,.1f} GFLOP/s per device")
    for name, seconds in [("ours (JAX)", ours_s), ("transformers", torch_s)]:
        tps = tokens_per_step / seconds
        print(f"{name:14} {tps:10,.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
              f"MFU {tps * fpt / (peak * jax.device_count()):6.1%}")
    print(f"ratio ours / transformers: {torch_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
