"""A real GGUF model: load time, and greedy decode speed of ours against `transformers.generate` and llama.cpp.

    python -m bench.gguf [--model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --new-tokens 256 --batches 1 8]

All sides read the same file: ours dequantizes it to float32 (`llm.gguf.load_gguf`),
`transformers` too (`gguf_file=`), llama.cpp (`llama-cpp-python`, where installed)
runs it quantized, batch 1 only (its Python API decodes one sequence). Every row
is the same 32-token prompt, greedy, no stop token, so each generates exactly
`--new-tokens`. Decode tokens/s is rows x new tokens over the time of the whole
generation minus a one-token generation (the prefill); compilation is excluded by
a warm-up. `--bf16` also runs ours with the weights cast to bfloat16 (half the
bytes read per token).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from llm import gguf
from llm.generate import Engine, SamplingParams

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _decode_rate(run, rows: int, new_tokens: int) -> float:
    run(1), run(new_tokens)  # warm-up: compile both shapes
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(new_tokens)
    t2 = time.perf_counter()
    return rows * (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sides", nargs="+", default=["ours", "transformers", "llama.cpp"])
    parser.add_argument("--bf16", action="store_true", help="also run ours with bfloat16 weights")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not os.path.exists(args.model):
        raise SystemExit(f"no model at {args.model} (../shared absent?): pass --model FILE.gguf")

    t = time.perf_counter()
    cfg, params, tok = gguf.load_gguf(args.model)
    jax.block_until_ready(params)
    print(f"ours: load {time.perf_counter() - t:.1f} s ({cfg.n_layer} layers, vocab {cfg.vocab_size}), "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus")
    prompt = tok.encode("The history of the Roman Empire is long and complicated. It began when ")[:32]
    rows_of = {b: [prompt] * b for b in args.batches}
    results: dict[str, dict[int, float]] = {}

    if "ours" in args.sides:
        variants = {"ours (f32 weights)": params}
        if args.bf16:
            variants["ours (bf16 weights)"] = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        for name, weights in variants.items():
            engine = Engine(cfg, weights, tok)
            for b, rows in rows_of.items():
                def run(n, rows=rows):
                    engine.generate(rows, SamplingParams(max_new_tokens=n, temperature=0.0))
                results.setdefault(name, {})[b] = _decode_rate(run, b, args.new_tokens)
                print(f"{name}: batch {b}: {results[name][b]:.1f} tok/s", flush=True)

    if "transformers" in args.sides:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        t = time.perf_counter()
        net = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(args.model)), gguf_file=os.path.basename(args.model),
            dtype=torch.float32).eval()
        print(f"transformers: load {time.perf_counter() - t:.1f} s, torch {torch.__version__}")
        for b, rows in rows_of.items():
            ids = torch.tensor(rows)

            def run(n, ids=ids):
                with torch.no_grad():
                    net.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                 attention_mask=torch.ones_like(ids))
            results.setdefault("transformers", {})[b] = _decode_rate(run, b, args.new_tokens)
            print(f"transformers: batch {b}: {results['transformers'][b]:.1f} tok/s", flush=True)

    if "llama.cpp" in args.sides:
        try:
            import llama_cpp
        except ImportError:
            print("llama.cpp: skipped (pip install llama-cpp-python)")
        else:
            t = time.perf_counter()
            llm = llama_cpp.Llama(args.model, n_ctx=512, n_threads=args.threads, verbose=False)
            print(f"llama.cpp: load {time.perf_counter() - t:.1f} s, llama-cpp-python {llama_cpp.__version__}")

            def run(n):
                llm.reset()
                for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
                    if i + 1 == n:
                        break
            results["llama.cpp (Q4_1)"] = {1: _decode_rate(run, 1, args.new_tokens)}
            print(f"llama.cpp (Q4_1): batch 1: {results['llama.cpp (Q4_1)'][1]:.1f} tok/s", flush=True)

    print("\n| engine | " + " | ".join(f"batch {b} tok/s" for b in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    for name, by_batch in results.items():
        print(f"| {name} | " + " | ".join(f"{by_batch[b]:.1f}" if b in by_batch else "-" for b in args.batches) + " |")


if __name__ == "__main__":
    main()
