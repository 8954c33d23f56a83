"""Release directories and the `launch.sample` / `launch.chat` commands, run for real on a scripted model."""

import builtins
import json

import jax
import numpy as np
import pytest

from launch import chat, sample, sampling_flags
from llm.chat_format import IM_END, tool_tokens
from llm.release import load_release, save_release
from llm.tools import Search
from scripted import TOKENIZER, script, scripted_gpt2


def test_release_round_trip(tmp_path):
    cfg, params = scripted_gpt2({0: 5})
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    cfg2, params2, tokenizer2 = load_release(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert tokenizer2.encode("round trip <|im_end|>") == TOKENIZER.encode("round trip <|im_end|>")


def test_truncated_release_is_a_clear_error(tmp_path):
    cfg, params = scripted_gpt2({0: 5})
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match="(?i)incomplete|invalid|truncat|deserializ"):
        load_release(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a release"):
        load_release(str(tmp_path / "missing"))
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    (tmp_path / "tokenizer.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match="no tiktoken rank file at .*tokenizer.tiktoken"):
        load_release(str(tmp_path))


def test_sample_command_continues_the_prompt(tmp_path, capsys):
    prompt = [TOKENIZER.eot, *TOKENIZER.encode("Once upon")]
    cfg, params = scripted_gpt2(script(prompt, [*TOKENIZER.encode(" a time, the end."), TOKENIZER.eot]))
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    sample.main(["--checkpoint", str(tmp_path), "--prompt", "Once upon", "--temperature", "0"])
    assert capsys.readouterr().out == "Once upon a time, the end.\n[stop, 7 tokens]\n"
    sample.main(["--checkpoint", str(tmp_path), "--prompt", "Once upon", "--temperature", "0", "--n", "2"])
    assert capsys.readouterr().out == "".join(
        f"--- sample {i}/2\nOnce upon a time, the end.\n[stop, 7 tokens]\n" for i in (1, 2))


def test_sample_command_streams_nothing_from_a_stop_string_on(tmp_path, capsys):
    prompt = [TOKENIZER.eot, *TOKENIZER.encode("Once upon")]
    cfg, params = scripted_gpt2(script(prompt, TOKENIZER.encode(" a time, the end, the moral.")))
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    sample.main(["--checkpoint", str(tmp_path), "--prompt", "Once upon", "--temperature", "0", "--stop", " the"])
    # " the" is streamed token by token (" a", " time", ",", " the"); it stops the sample at its start.
    assert capsys.readouterr().out == "Once upon a time,\n[stop, 4 tokens]\n"


def test_sample_and_chat_report_a_users_mistake_as_one_error_line(tmp_path, capsys):
    from launch import chat, cli

    prompt = [TOKENIZER.eot, *TOKENIZER.encode("Once upon")]
    cfg, params = scripted_gpt2(script(prompt, TOKENIZER.encode(" a time, the end.")))
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    long = " ".join(["word"] * (2 * cfg.max_seq_len))
    for entry, argv, wanted in [
        (sample.main, ["--checkpoint", str(tmp_path), "--prompt", long], f"and the model's context {cfg.max_seq_len}"),
        (sample.main, ["--checkpoint", str(tmp_path), "--prompt", "x", "--temperature", "-1"], "temperature"),
        (sample.main, ["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "nope"),
        (chat.main, ["--checkpoint", str(tmp_path / "nope")], "nope"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(entry, argv)
        err = capsys.readouterr().err
        assert exit_.value.code == cli.EXIT_MISTAKE and err.count("error: ") == 1 and "Traceback" not in err, err
        assert wanted in err, err


def test_streamed_text_waits_for_whole_characters_before_judging_a_stop_string(capsys):
    """"é" arrives as two byte tokens; "xa" must wait for it, since "aé" stops the sample at "x"."""
    tokens = [*TOKENIZER.encode("xa"), *(TOKENIZER.encoding.encode_single_token(bytes([b])) for b in "é".encode())]
    stream = sampling_flags.Printer(TOKENIZER, stop_strings=("aé",))
    for token in tokens:
        stream(0, 0, token)
    stream.finish("x")
    assert capsys.readouterr().out == "x"


def test_chat_command_answers_in_the_chat_format(tmp_path, capsys, monkeypatch):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = TOKENIZER.render_for_completion(messages)
    cfg, params = scripted_gpt2(script(prompt, [*TOKENIZER.encode("Hello there!"), TOKENIZER.token_id(IM_END)]))
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    typed = iter(["hi", ""])
    monkeypatch.setattr(builtins, "input", lambda _: next(typed))
    chat.main(["--checkpoint", str(tmp_path), "--system", "Be brief.", "--temperature", "0"])
    assert "assistant> Hello there!\n" in capsys.readouterr().out


def test_chat_keeps_a_well_formed_history_across_turns(tmp_path, capsys, monkeypatch):
    """The first reply ends at <|endoftext|>, not <|im_end|>; the second turn's prompt (where the
    scripted model answers by position) must still be the history closed by exactly one <|im_end|>."""
    im_end = TOKENIZER.token_id(IM_END)
    first = TOKENIZER.render_for_completion([{"role": "user", "content": "hi"}])
    reply = TOKENIZER.encode("Hello!")
    second = first + reply + [im_end] + TOKENIZER.render_for_completion([{"role": "user", "content": "bye"}])
    cfg, params = scripted_gpt2({**script(first, [*reply, TOKENIZER.eot]),
                                 **script(second, [*TOKENIZER.encode("Goodbye."), im_end])}, max_seq_len=128)
    save_release(str(tmp_path), cfg, params, TOKENIZER)
    typed = iter(["hi", "bye", ""])
    monkeypatch.setattr(builtins, "input", lambda _: next(typed))
    chat.main(["--checkpoint", str(tmp_path), "--temperature", "0"])
    assert "assistant> Hello!\nassistant> Goodbye.\n" in capsys.readouterr().out


def test_chat_searches_its_documents(tmp_path, capsys, monkeypatch):
    documents = ["The Eiffel Tower is in Paris.", "Mount Fuji is the highest mountain in Japan.", "JAX is fast."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    output = Search(documents)("highest mountain Japan")
    assert output == documents[1]
    call_start, call_end, out_start, out_end = (TOKENIZER.token_id(t) for t in tool_tokens("search"))
    prompt = TOKENIZER.render_for_completion([{"role": "user", "content": "Which mountain?"}])
    call = [call_start, *TOKENIZER.encode("highest mountain Japan"), call_end]
    forced = [out_start, *TOKENIZER.encode(output), out_end]
    answer = [*TOKENIZER.encode(" Fuji."), TOKENIZER.token_id(IM_END)]
    cfg, params = scripted_gpt2(script(prompt, call + [None] * len(forced) + answer), max_seq_len=128)
    save_release(str(tmp_path / "release"), cfg, params, TOKENIZER)
    typed = iter(["Which mountain?", ""])
    monkeypatch.setattr(builtins, "input", lambda _: next(typed))
    chat.main(["--checkpoint", str(tmp_path / "release"), "--temperature", "0", "--search-docs", str(tmp_path / "docs.jsonl")])
    assert f"\n[search] highest mountain Japan -> {output}\n Fuji.\n" in capsys.readouterr().out  # the call, as text
