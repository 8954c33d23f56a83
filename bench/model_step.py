"""Forward+backward throughput of our Transformer against PyTorch `transformers`, same model, same batch.

    python bench/model_step.py --preset gpt2_124m --batch 16 --seq 1024 --dtype bfloat16

Times `value_and_grad` of the mean next-token cross-entropy (no optimizer) for
our JAX model and for `transformers.GPT2LMHeadModel` / `LlamaForCausalLM` built
from the same config, on whatever accelerator each framework sees, and reports
tokens/s, the ratio, and MFU against a bf16 matmul peak the script measures.

FLOPs per token (llm.c / PaLM appendix B): 6 * n_params for the matmuls of the
forward and backward pass, plus 12 * n_layer * n_embd * seq for attention scores
and values (the causal mask's halving is not credited, as in llm.c).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

# JAX would otherwise reserve 75% of GPU memory up front, beside what PyTorch still holds.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from llm import model
from llm.config import ModelConfig, base_config, model_config


def matmul_peak_flops(dtype, n: int = 8192 if jax.default_backend() != "cpu" else 2048, reps: int = 10) -> float:
    """Measured FLOP/s of one large square matmul, the ceiling MFU is reported against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = matmul(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _loss(cfg, params, tokens_BxT):
    logits, _ = model.forward(cfg, params, tokens_BxT[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1).mean()


def time_ours(cfg: ModelConfig, tokens: np.ndarray, steps: int) -> tuple[float, float, float]:
    """(seconds per step, compile seconds, loss) of our jitted value_and_grad."""
    params = jax.jit(functools.partial(model.init_params, cfg))(jax.random.key(0))
    step = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))
    batch = jnp.asarray(tokens)
    start = time.perf_counter()
    compiled = step.lower(params, batch).compile()
    compile_s = time.perf_counter() - start
    loss, grads = compiled(params, batch)
    jax.block_until_ready(grads)
    start = time.perf_counter()
    for _ in range(steps):
        loss, grads = compiled(params, batch)
    jax.block_until_ready(grads)
    return (time.perf_counter() - start) / steps, compile_s, float(loss)


def time_torch(cfg: ModelConfig, tokens: np.ndarray, steps: int, dtype: str) -> tuple[float, float, str]:
    """(seconds per step, loss, device) of `transformers` forward+backward under autocast."""
    import torch
    import transformers

    from llm.hf import hf_config_from_model

    hf_config = hf_config_from_model(dataclasses.replace(cfg, dtype="float32"))
    config_cls = transformers.GPT2Config if cfg.family == "gpt2" else transformers.LlamaConfig
    model_cls = transformers.GPT2LMHeadModel if cfg.family == "gpt2" else transformers.LlamaForCausalLM
    config = config_cls(**{k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = model_cls(config).to(device).train()
    batch = torch.tensor(tokens, dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def step():
        net.zero_grad(set_to_none=True)
        with autocast:
            loss = net(batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step().detach()
    sync()
    return (time.perf_counter() - start) / steps, float(loss), device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2_124m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="auto", help="model.attention_impl: auto, xla or cudnn")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()

    config = base_config(args.preset)
    config.model.update(dtype=args.dtype, remat=args.remat, attention_impl=args.attention)
    cfg = model_config(config)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq
    peak = matmul_peak_flops(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    fpt = model.flops_per_token(cfg, args.seq)

    if not args.no_torch:  # first, so PyTorch hands its cached memory back before JAX runs
        torch_s, torch_loss, device = time_torch(cfg, tokens, args.steps, args.dtype)
        if device == "cuda":  # the model died with time_torch's frame; hand its cached memory back
            import torch

            torch.cuda.empty_cache()
    step_s, compile_s, loss = time_ours(cfg, tokens, args.steps)
    ours_tps = tokens_per_step / step_s
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: {args.preset} ({model.count_params(cfg):,} params), batch {args.batch} x {args.seq}, "
          f"{args.dtype}, remat={args.remat}, attention={args.attention}")
    print(f"measured {args.dtype} matmul peak: {peak / 1e12:.1f} TFLOP/s; {fpt / 1e6:.1f} MFLOP per token")
    print(f"ours (JAX):          {ours_tps:12,.0f} tokens/s  {step_s * 1e3:8.1f} ms/step  "
          f"MFU {ours_tps * fpt / peak:6.1%}  compile {compile_s:.1f} s  loss {loss:.3f}")
    if not args.no_torch:
        torch_tps = tokens_per_step / torch_s
        print(f"transformers ({device}): {torch_tps:12,.0f} tokens/s  {torch_s * 1e3:8.1f} ms/step  "
              f"MFU {torch_tps * fpt / peak:6.1%}  loss {torch_loss:.3f}")
        print(f"ratio ours / transformers: {ours_tps / torch_tps:.2f}x")


if __name__ == "__main__":
    main()
