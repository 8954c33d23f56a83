"""Chat with a fine-tuned model in the terminal, with the calculator (and optional search) tools.

    python -m launch.chat --checkpoint runs/sft/release [--system "You are..."] [--search-docs docs.jsonl]
    python -m launch.chat --checkpoint ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --temperature 0

A real model chats in its own format (its chat template, its end-of-turn token);
a model whose tokenizer has no tool tokens chats without tools. A tool call shows
as its expression and its result, `[python] 2**10 -> 1024`, never as control tokens.

Type a message and press enter; an empty line or Ctrl-D ends the chat. The
conversation is kept as token ids, so the model sees exactly what it wrote,
tool calls and their outputs included.
"""

import argparse
import sys

from launch import cli, sampling_flags
from llm.bpe import read_texts
from llm.chat_format import tool_tokens
from llm.generate import Engine
from llm.serve.stream import TextDeltas, final_text
from llm.tools import Calculator, Search


def tool_display(tokenizer, tools) -> dict[int, str]:
    """Terminal text for each tool's control tokens: the call and its output on one line, `[python] 2+3 -> 5`."""
    shown = {}
    for name in tools:
        call_start, call_end, out_start, out_end = (tokenizer.token_id(t) for t in tool_tokens(name))
        shown |= {call_start: f"\n[{name}] ", call_end: " -> ", out_start: "", out_end: "\n"}
    return shown


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Chat with a fine-tuned model.")
    sampling_flags.add_arguments(parser, max_new_tokens=512)
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--search-docs", help="the search tool's corpus: .jsonl(.gz), one document per line in its 'text' field")
    args = parser.parse_args(argv)
    cfg, params, tokenizer = sampling_flags.load(args)
    if tokenizer.chat_template is None:
        raise cli.UserError(f"{args.checkpoint}: its tokenizer has no chat format this project can render; "
                            f"try launch.sample")
    if args.system:
        try:
            tokenizer.chat_template.role_header("system")
        except ValueError as e:  # Gemma's and Mistral's templates refuse a system message
            raise cli.UserError(f"{args.checkpoint}: {e}; leave out --system") from None
    tools = {"python": Calculator()}
    if args.search_docs:
        tools["search"] = Search(list(read_texts(args.search_docs)))
    if not all(tokenizer.has_tool(name) for name in tools):
        print(f"note: {tokenizer.name} has no tool tokens; chatting without tools", file=sys.stderr)
        tools = {}
    engine = Engine(cfg, params, tokenizer, tools=tools)
    shown = tool_display(tokenizer, tools)
    with cli.user_input():  # only checks the sampling flags
        sampling = sampling_flags.sampling_params(args, stop_token_ids=tokenizer.chat_stop_ids)

    history: list[int] = []
    pending = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            user = input("\nuser> ").strip()
        except EOFError:
            break
        if not user:
            break
        turn = [*pending, {"role": "user", "content": user}]
        prompt = history + tokenizer.render_for_completion(turn, start=not history)
        pending = []
        if len(prompt) >= cfg.max_seq_len:
            raise cli.UserError(f"the conversation has reached the model's context of {cfg.max_seq_len} tokens")
        print("assistant> ", end="", flush=True)
        # Streamed as the server streams (whole characters, nothing of a stop string), tool tokens shown as text.
        hide = frozenset(sampling.stop_token_ids)
        deltas = TextDeltas(tokenizer, sampling.stop_strings, hide, shown)
        [[sample]] = engine.generate([prompt], sampling, on_token=lambda i, j, token, d=deltas: _write(d.push(token)))
        _write(deltas.finish(final_text(tokenizer, sample.tokens, sampling.stop_strings, hide, shown)))
        # The turn ends with the format's closing tokens however it stopped, so the next turn is well formed.
        stopped = bool(sample.tokens) and sample.tokens[-1] in tokenizer.chat_stop_ids
        reply = sample.tokens[:-1] if stopped else sample.tokens
        history = prompt + reply + tokenizer.turn_end_ids
        print()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    cli.main(main)
