"""Sampling speed of our engine against `transformers.generate`, same model, same settings, one run.

    python -m bench.generate [--layers 4 --d-model 256 --new-tokens 128 --prompt-len 128 --repeats 5]
    python -m bench.generate --batches 8 --samples 8    # one prompt, 8 samples (`num_return_sequences`)

Both sides sample a GPT-2-architecture model (4 layers, d_model 256, 4 heads,
vocab 50,304, random weights) with temperature 0.8 and top-k 50, no stop token,
so every row generates exactly `--new-tokens`. Prefill tokens/s is the prompt
tokens over the time of a one-token generation; decode tokens/s is the generated
tokens over the rest of the time. Compilation is excluded (one warm-up run each);
each time is the best of `--repeats` rounds in which the two sides take turns, so
a noisy shared machine weighs on both alike. With `--samples n`, a batch of b rows
is b / n prompts sampled n times each; prefill tokens/s still counts all b rows.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import numpy as np

from llm import hf, model
from llm.config import ModelConfig
from llm.generate import Engine, SamplingParams


def ours(cfg: ModelConfig, params, prompts: np.ndarray, samples: int) -> Callable[[int], None]:
    """Generates n tokens per row with our engine (returns when the tokens are on the host)."""
    engine = Engine(cfg, params)

    def run(n: int) -> None:
        engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=n, temperature=0.8, top_k=50, n=samples))

    return run


def theirs(cfg: ModelConfig, params, prompts: np.ndarray, samples: int) -> Callable[[int], None]:
    """Generates n tokens per row with `transformers.generate` on the same weights."""
    import tempfile

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        hf.save_hf(cfg, params, directory)
        net = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(n: int) -> None:
        with torch.no_grad():
            out = net.generate(input_ids, do_sample=True, temperature=0.8, top_k=50, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0, attention_mask=torch.ones_like(input_ids),
                               num_return_sequences=samples)
        sync()
        assert out.shape == (len(prompts) * samples, prompts.shape[1] + n)

    return run


def measure(runs: dict[str, Callable[[int], None]], new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (prefill s, total s) of `repeats` rounds per side, the sides taking turns within each round."""
    for run in runs.values():  # compile / warm up both lengths (they may fall in different cache buckets)
        run(1)
        run(new_tokens)
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            prefill_s, total_s = _timed(lambda: run(1)), _timed(lambda: run(new_tokens))
            best[name] = (min(best[name][0], prefill_s), min(best[name][1], total_s))
    return best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt (each batch a multiple of it)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per side; each time is the best")
    args = parser.parse_args()
    if args.samples < 1 or any(batch % args.samples for batch in args.batches):
        parser.error(f"every batch must be a multiple of --samples {args.samples}, got {args.batches}")
    cfg = ModelConfig(family="gpt2", vocab_size=args.vocab, n_layer=args.layers, n_embd=args.d_model,
                      n_head=args.heads, n_kv_head=args.heads, mlp_dim=4 * args.d_model, max_seq_len=1024,
                      dtype="float32")
    params = model.init_params(cfg, jax.random.key(0))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); GPT-2 arch {args.layers} layers, "
          f"d_model {args.d_model}, vocab {args.vocab}; prompt {args.prompt_len}, new {args.new_tokens}; "
          f"temperature 0.8, top-k 50; {args.samples} sample(s) per prompt")
    print(f"{'batch':>5} {'':14} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for batch in args.batches:
        prompts = np.random.RandomState(batch).randint(0, args.vocab, (batch // args.samples, args.prompt_len))
        sides = {"ours (JAX)": ours(cfg, params, prompts, args.samples),
                 "transformers": theirs(cfg, params, prompts, args.samples)}
        times = measure(sides, args.new_tokens, args.repeats)
        rows = {}
        for name, (prefill_s, total_s) in times.items():
            rows[name] = (batch * args.prompt_len / prefill_s, batch * (args.new_tokens - 1) / (total_s - prefill_s))
            print(f"{batch:5d} {name:14} {rows[name][0]:14,.0f} {rows[name][1]:13,.0f}")
        ours_tps, theirs_tps = rows["ours (JAX)"], rows["transformers"]
        print(f"{batch:5d} {'ratio':14} {ours_tps[0] / theirs_tps[0]:13.2f}x {ours_tps[1] / theirs_tps[1]:12.2f}x")


if __name__ == "__main__":
    main()
