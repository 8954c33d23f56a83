"""Serve a model over the OpenAI API (chat completions, completions) on FastAPI + uvicorn.

    python -m launch.serve --checkpoint runs/sft/release [--host 127.0.0.1] [--port 8000] [--max-slots 8]
                           [--max-queue 64] [--api-key KEY] [--tools] [--model-name NAME]

The checkpoint is anything `load_release` reads (a release directory, a Hugging Face
directory or hub id, a .gguf file or hub id); it loads and compiles after the server
is up, with `/health` answering 503 until then. It binds 127.0.0.1 unless told
otherwise. Clients: `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "none")`.
"""

import argparse
import os
import sys

from launch import cli
from llm.release import load_release


def model_name(checkpoint: str) -> str:
    """The id clients name the model by: a path's last part (a `release/`'s run, a .gguf's stem), or the hub id."""
    if not os.path.exists(checkpoint):  # a hub id names itself, as vLLM serves it
        return checkpoint
    parts = [p for p in checkpoint.rstrip("/").split("/") if p]
    if len(parts) > 1 and parts[-1] == "release":
        return parts[-2]
    name = parts[-1] if parts else checkpoint
    return name.removesuffix(".gguf")


def _local_looking(path: str) -> bool:
    """Whether a missing --checkpoint can only be a local path (a hub id is owner/name or owner/name/file.gguf)."""
    return path.startswith((".", "/", "~")) or path.count("/") not in (1, 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve a model over the OpenAI API.")
    parser.add_argument("--checkpoint", required=True,
                        help="a release directory, a Hugging Face GPT-2/Llama one, a .gguf file or a hub id")
    parser.add_argument("--tokenizer", help="an encoding overriding the checkpoint's own")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-slots", type=int, default=8, help="sample rows the engine runs at once")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more are refused (429)")
    parser.add_argument("--api-key", default=os.environ.get("LLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLM_API_KEY, else no key)")
    parser.add_argument("--tools", action="store_true", help="run the calculator tool server-side")
    parser.add_argument("--model-name", help="the model's id in the API (default: from --checkpoint)")
    args = parser.parse_args(argv)
    if args.max_slots < 1 or args.max_queue < 1:
        parser.error("--max-slots and --max-queue must be at least 1")
    if not os.path.exists(args.checkpoint) and _local_looking(args.checkpoint):
        raise cli.UserError(f"--checkpoint {args.checkpoint}: no such file or directory")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)

    import uvicorn

    from llm.serve.app import create_app

    app = create_app(lambda: load_release(args.checkpoint, tokenizer=args.tokenizer),
                     model_name=args.model_name or model_name(args.checkpoint), tools=args.tools,
                     api_key=args.api_key, max_slots=args.max_slots, max_queue=args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    cli.main(main)
