"""Sampling speed of our engine against `transformers.generate`, same model, same settings, one run.

    python -m bench.generate [--layers 4 --d-model 256 --new-tokens 128 --prompt-len 128]

Both sides sample a GPT-2-architecture model (4 layers, d_model 256, 4 heads,
vocab 50,304, random weights) with temperature 0.8 and top-k 50, no stop token,
so every row generates exactly `--new-tokens`. Prefill tokens/s is the prompt
tokens over the time of a one-token generation; decode tokens/s is the generated
tokens over the rest of the time. Compilation is excluded (one warm-up run each);
each time is the best of REPEATS runs, so a noisy shared machine slows both sides less.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from llm import hf, model
from llm.config import ModelConfig
from llm.generate import Engine, SamplingParams


REPEATS = 3


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_ours(cfg: ModelConfig, params, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
    engine = Engine(cfg, params)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_k=50)
    one = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=50)
    engine.generate(prompts.tolist(), sampling)  # compile both the prefill and the decode step
    prefill_s = min(_timed(lambda: engine.generate(prompts.tolist(), one)) for _ in range(REPEATS))
    total_s = min(_timed(lambda: engine.generate(prompts.tolist(), sampling)) for _ in range(REPEATS))
    return prefill_s, total_s


def bench_transformers(cfg: ModelConfig, params, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
    import tempfile

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        hf.save_hf(cfg, params, directory)
        net = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)

    def run(n: int):
        with torch.no_grad():
            out = net.generate(input_ids, do_sample=True, temperature=0.8, top_k=50, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0, attention_mask=torch.ones_like(input_ids))
        assert out.shape[1] == prompts.shape[1] + n

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed_run(n: int) -> float:
        return _timed(lambda: (run(n), sync()))

    run(4)
    prefill_s = min(timed_run(1) for _ in range(REPEATS))
    total_s = min(timed_run(new_tokens) for _ in range(REPEATS))
    return prefill_s, total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    cfg = ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.d_model,
                      n_head=args.heads, n_kv_head=args.heads, mlp_dim=4 * args.d_model, max_seq_len=1024,
                      dtype="float32")
    params = model.init_params(cfg, jax.random.key(0))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); GPT-2 arch {args.layers} layers, "
          f"d_model {args.d_model}, vocab {args.vocab}; prompt {args.prompt_len}, new {args.new_tokens}; "
          "temperature 0.8, top-k 50")
    print(f"{'batch':>5} {'':14} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for batch in args.batches:
        prompts = np.random.RandomState(batch).randint(0, args.vocab, (batch, args.prompt_len))
        rows = {}
        for name, fn in [("ours (JAX)", bench_ours), ("transformers", bench_transformers)]:
            prefill_s, total_s = fn(cfg, params, prompts, args.new_tokens)
            decode_tps = batch * (args.new_tokens - 1) / (total_s - prefill_s)
            rows[name] = (batch * args.prompt_len / prefill_s, decode_tps)
            print(f"{batch:5d} {name:14} {rows[name][0]:14,.0f} {rows[name][1]:13,.0f}")
        ours, theirs = rows["ours (JAX)"], rows["transformers"]
        print(f"{batch:5d} {'ratio':14} {ours[0] / theirs[0]:13.2f}x {ours[1] / theirs[1]:12.2f}x")


if __name__ == "__main__":
    main()
