"""Export a release for other tools: GGUF (llama.cpp, LM Studio, Ollama) or Hugging Face safetensors.

    python -m launch.export --checkpoint runs/tiny/release --format gguf --out tiny.gguf [--dtype q8_0]
    python -m launch.export --checkpoint runs/tiny/release --format hf --out tiny-hf/

GGUF carries the tokenizer and the chat template, so LM Studio runs the file as
is. A Hugging Face directory gets `config.json` + `model.safetensors` (and our
tokenizer files beside them).
"""

import argparse
import os

from launch import cli
from llm import gguf_export, hf
from llm.release import HF_DIR_TOKENIZER, load_release


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export a release as GGUF or Hugging Face safetensors.")
    parser.add_argument("--checkpoint", required=True, help="a release directory (or anything launch.sample loads)")
    parser.add_argument("--format", required=True, choices=("gguf", "hf"))
    parser.add_argument("--out", required=True, help="the .gguf file, or the Hugging Face directory")
    parser.add_argument("--dtype", default="f32", choices=gguf_export.WRITE_TYPES, help="GGUF weight type")
    parser.add_argument("--name", help="the model's name in the GGUF metadata (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.format == "gguf":  # before the model is loaded: a bad --out fails in a second, not after the load
        cli.writable_file(args.out, "--out")
    else:
        cli.writable_dir(args.out, "--out")
    cfg, params, tokenizer = load_release(args.checkpoint)
    if args.format == "gguf":
        name = args.name or os.path.basename(os.path.normpath(args.checkpoint))
        gguf_export.save_gguf(args.out, cfg, params, tokenizer, dtype=args.dtype, name=name)
    else:
        hf.save_hf(cfg, params, args.out)
        tokenizer.save(os.path.join(args.out, HF_DIR_TOKENIZER))
    print(f"wrote {args.out} ({cfg.family}, {cfg.n_layer} layers, vocab {cfg.vocab_size}"
          f"{', ' + args.dtype if args.format == 'gguf' else ''})")


if __name__ == "__main__":
    cli.main(main)
