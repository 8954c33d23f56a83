"""`python -m launch.serve` as a real subprocess on a free loopback port: it answers 503, then serves."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from launch import cli, serve
from llm.release import save_release
from scripted import TOKENIZER, script, scripted_gpt2

TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_command_serves_a_release(tmp_path):
    prompt = [TOKENIZER.eot, *TOKENIZER.encode("Once upon")]
    cfg, params = scripted_gpt2(script(prompt, [*TOKENIZER.encode(" a time."), TOKENIZER.eot]))
    save_release(str(tmp_path / "release"), cfg, params, TOKENIZER)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "launch.serve", "--checkpoint", str(tmp_path / "release"),
                                "--port", str(port), "--max-slots", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + TIMEOUT, None
        while status != 200:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server never became healthy"
            try:
                status = httpx.get(f"{url}/health", timeout=5).status_code
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        models = httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()
        assert [m["id"] for m in models["data"]] == [tmp_path.name]  # runs/X/release is served as X
        done = httpx.post(f"{url}/v1/completions", json={"prompt": "Once upon", "temperature": 0},
                          timeout=TIMEOUT).json()
        assert done["choices"][0]["text"] == " a time."
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def test_serve_command_reports_a_missing_checkpoint_as_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(serve.main, ["--checkpoint", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exit_.value.code == cli.EXIT_MISTAKE and err.count("error: ") == 1 and "nope" in err, err


def test_the_served_model_is_named_after_the_checkpoint(tmp_path):
    (tmp_path / "tiny" / "release").mkdir(parents=True)
    (tmp_path / "model.gguf").write_bytes(b"")
    assert serve.model_name(str(tmp_path / "tiny" / "release")) == "tiny"
    assert serve.model_name(str(tmp_path / "model.gguf")) == "model"
    assert serve.model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
