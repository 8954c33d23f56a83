"""`launch.chat` on a scripted model: tool calls show as their expression and result, not as control tokens."""

import builtins

import pytest

from launch import chat
from llm.chat_format import IM_END, tool_tokens
from llm.release import save_release
from llm.tools import Calculator
from scripted import TOKENIZER, script, scripted_gpt2


@pytest.mark.slow  # ~14 s on 2 cores: the scripted model's engine compiles
def test_chat_shows_a_tool_call_as_its_expression_and_result(tmp_path, capsys, monkeypatch):
    call_start, call_end, out_start, out_end = (TOKENIZER.token_id(t) for t in tool_tokens("python"))
    output = Calculator()("2**10")
    prompt = TOKENIZER.render_for_completion([{"role": "user", "content": "What is 2**10?"}])
    call = [*TOKENIZER.encode("Let me compute."), call_start, *TOKENIZER.encode("2**10"), call_end]
    forced = [out_start, *TOKENIZER.encode(output), out_end]  # the engine writes these: the model's script skips them
    answer = [*TOKENIZER.encode("It is 1024."), TOKENIZER.token_id(IM_END)]
    cfg, params = scripted_gpt2(script(prompt, call + [None] * len(forced) + answer))
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    typed = iter(["What is 2**10?", ""])
    monkeypatch.setattr(builtins, "input", lambda _: next(typed))
    chat.main(["--checkpoint", str(tmp_path), "--temperature", "0"])
    out = capsys.readouterr().out
    assert "assistant> Let me compute.\n[python] 2**10 -> 1024\nIt is 1024.\n" in out
    assert "<|" not in out


def test_tool_display_covers_every_tool_token():
    shown = chat.tool_display(TOKENIZER, ["python", "search"])
    assert {TOKENIZER.token_id(t) for tool in ("python", "search") for t in tool_tokens(tool)} == set(shown)
    assert chat.tool_display(TOKENIZER, []) == {}


def test_system_message_for_a_format_without_a_system_turn_is_one_error_line(tmp_path, monkeypatch):
    import dataclasses

    from launch import cli, sampling_flags
    from llm.chat_format import OUR_CHAT

    no_system = dataclasses.replace(OUR_CHAT, name="gemma-like", headers={"user": "<|im_start|>user<|im_sep|>",
                                                                          "assistant": "<|im_start|>model<|im_sep|>"})
    tokenizer = TOKENIZER.__class__(TOKENIZER.encoding, no_system)
    cfg, params = scripted_gpt2({0: 5})
    monkeypatch.setattr(sampling_flags, "load", lambda args: (cfg, params, tokenizer))
    with pytest.raises(cli.UserError, match="'gemma-like' has no system turn .* leave out --system"):
        chat.main(["--checkpoint", "x", "--system", "Be brief."])
