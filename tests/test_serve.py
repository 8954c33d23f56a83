"""The HTTP server (`llm.serve`, `launch.serve`) for real: uvicorn on a free loopback port, the official
`openai` SDK and httpx as clients, a scripted GPT-2 (tests/scripted.py) whose output is known in advance.

One server per module: it loads the release only when the test lets it (so /health is seen 503 first),
runs the calculator (`tools=True`), needs an API key, and its engine can be held at its first token
(`GatedEngine`) so a full queue, a disconnect and an error after streaming began are seen without timing.
"""

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from launch import sample
from llm.chat_format import IM_END, tool_tokens
from llm.generate import engine_for
from llm.release import load_release, save_release
from llm.serve.app import create_app
from scripted import TOKENIZER, script, scripted_gpt2

KEY = "sekret"
MODEL = "scripted"
TIMEOUT = 60.0
EOT, IM_END_ID = TOKENIZER.eot, TOKENIZER.token_id(IM_END)
COMPLETION_PROMPT = [EOT, *TOKENIZER.encode("Once upon")]
COMPLETION = [*TOKENIZER.encode(" a time, the end."), EOT]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|>"}]
E_ACUTE = [TOKENIZER.encoding.encode_single_token(bytes([b])) for b in "é".encode()]  # two byte tokens
CHAT_REPLY = [*TOKENIZER.encode("Hello there, caf"), *E_ACUTE, *TOKENIZER.encode("!"), IM_END_ID]
TOOL_CHAT = [{"role": "system", "content": "You are a careful assistant who uses the calculator for every sum "
                                           "that a user asks about, and you answer in one short sentence."},
             {"role": "user", "content": "What is 2+3?"}]
CALL = tool_tokens("python")


def _scripts():
    """One model for every test: the three continuations sit at positions that do not overlap."""
    call_start, call_end, out_start, out_end = (TOKENIZER.token_id(t) for t in CALL)
    tool_reply = [call_start, *TOKENIZER.encode("2+3"), call_end, *[None] * (2 + len(TOKENIZER.encode("5"))),
                  *TOKENIZER.encode(" It is 5."), IM_END_ID]
    parts = [script(COMPLETION_PROMPT, COMPLETION), script(TOKENIZER.render_for_completion(CHAT), CHAT_REPLY),
             script(TOKENIZER.render_for_completion(TOOL_CHAT), tool_reply)]
    spans = sorted((min(p), max(p)) for p in parts)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans
    return {k: v for p in parts for k, v in p.items()}


class GatedEngine:
    """The real engine, which can be held after each sample's first token (`gate`) or fail there (`fail`)."""

    def __init__(self, engine):
        self.engine, self.gate, self.fail = engine, threading.Event(), False
        self.gate.set()

    def generate(self, prompts, sampling, on_token=None):
        def hook(i, j, token):
            on_token(i, j, token)
            assert self.gate.wait(TIMEOUT), "the test never opened the gate"
            if self.fail:
                raise RuntimeError("the engine failed on purpose")
        return self.engine.generate(prompts, sampling, hook if on_token else None)


class Server:
    """uvicorn in a thread on a free loopback port; `close` stops it and the worker."""

    def __init__(self, app):
        self.app, sock = app, socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def wait_until(self, predicate, what: str):
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=TIMEOUT).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def close(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("release"))
    cfg, params = scripted_gpt2(_scripts(), max_seq_len=128)
    save_release(directory, cfg, params, TOKENIZER)
    may_load, engines = threading.Event(), []

    def load():
        assert may_load.wait(TIMEOUT)
        return load_release(directory)

    def make_engine(*args):
        engines.append(GatedEngine(engine_for(*args)))
        return engines[0]

    server = Server(create_app(load, model_name=MODEL, tools=True, api_key=KEY, max_slots=2, max_queue=1,
                               make_engine=make_engine))
    early = [httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code,
             httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=TIMEOUT,
                        headers={"Authorization": f"Bearer {KEY}"}).status_code]
    may_load.set()
    server.wait_until(lambda: httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200, "health 200")
    server.early, server.engine, server.release = early, engines[0], directory
    yield server
    server.engine.gate.set()
    server.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def test_health_is_503_until_the_model_is_loaded_and_warm(served):
    assert served.early == [503, 503]
    assert httpx.get(f"{served.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_greedy_completion_equals_launch_sample(served, client, capsys):
    sample.main(["--checkpoint", served.release, "--prompt", "Once upon", "--temperature", "0"])
    printed = capsys.readouterr().out
    done = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=32)
    assert printed == f"Once upon{done.choices[0].text}\n[stop, {done.usage.completion_tokens} tokens]\n"
    assert done.choices[0].text == " a time, the end." and done.choices[0].finish_reason == "stop"
    assert done.usage.prompt_tokens == len(COMPLETION_PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, temperature=0, max_tokens=32)
    assert by_ids.choices[0].text == done.choices[0].text
    several = client.completions.create(model=MODEL, prompt=[COMPLETION_PROMPT, COMPLETION_PROMPT], temperature=0,
                                        max_tokens=32)
    assert [c.index for c in several.choices] == [0, 1] and {c.text for c in several.choices} == {done.choices[0].text}


def test_streamed_completion_joins_to_the_same_text(client):
    done = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=32, stop=[" the"])
    assert done.choices[0].text == " a time," and done.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=32,
                                            stop=[" the"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    cut = client.completions.create(model=MODEL, prompt="Once upon", temperature=0, max_tokens=3)
    assert cut.choices[0].text == " a time," and cut.choices[0].finish_reason == "length"


def test_chat_answers_in_the_chat_format_and_streams_the_same_text(client):
    done = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, n=2, seed=1)
    assert [c.message.content for c in done.choices] == ["Hello there, café!"] * 2
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens == 2 * len(CHAT_REPLY)
    # The user's spelled-out "<|im_end|>" was text: the prompt (and so the reply) is the scripted one.
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=50,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == "Hello there, café!" and not any("\ufffd" in d for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(CHAT_REPLY)


def test_chat_with_tools_shows_the_call_and_its_result_as_text(client):
    done = client.chat.completions.create(model=MODEL, messages=TOOL_CHAT, temperature=0)
    text = done.choices[0].message.content
    assert text == "\n```python\n2+3\n```\n```output\n5\n```\n It is 5." and "<|" not in text
    streamed = client.chat.completions.create(model=MODEL, messages=TOOL_CHAT, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_echo_logprobs_equal_launch_evals_scores(served):
    from llm.evals.multiple_choice import score
    from llm.tasks import MultipleChoice

    cfg, params, _ = load_release(served.release)
    item = MultipleChoice("Once upon a", (" time", " hill"), 0)
    [expected] = score(cfg, params, TOKENIZER, [item])
    context = TOKENIZER.encode(item.context)
    for choice, loglik in zip(item.choices, expected.logliks):
        continuation = TOKENIZER.encode(item.context + choice)[len(context):]
        body = {"model": MODEL, "prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 1}
        reply = httpx.post(f"{served.url}/v1/completions", json=body, timeout=TIMEOUT,
                           headers={"Authorization": f"Bearer {KEY}"}).json()
        lp = reply["choices"][0]["logprobs"]
        assert lp["tokens"] == [TOKENIZER.decode([t]) for t in context + continuation]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert sum(lp["token_logprobs"][-len(continuation):]) == pytest.approx(loglik, rel=1e-5, abs=1e-5)
        tokens = context + continuation
        assert lp["text_offset"] == [len(TOKENIZER.decode(tokens[:k])) for k in range(len(tokens))]
        assert reply["choices"][0]["text"] == item.context + choice
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])


def test_lm_eval_remote_tokenizer_endpoints(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(f"{served.url}/tokenizer_info", headers=auth, timeout=TIMEOUT).json()
    assert info["eos_token"] == "<|endoftext|>" and "im_start" in info["chat_template"]
    tokenize = lambda text: httpx.post(f"{served.url}/tokenize", json={"prompt": text, "add_special_tokens": False},
                                       headers=auth, timeout=TIMEOUT).json()["tokens"]
    assert tokenize(info["eos_token"]) == [EOT]  # how lm-eval's RemoteTokenizer finds the EOS id
    assert tokenize("hi <|im_end|>") == TOKENIZER.encode("hi <|im_end|>")  # text inside text stays text
    back = httpx.post(f"{served.url}/detokenize", json={"tokens": TOKENIZER.encode("héllo")}, headers=auth,
                      timeout=TIMEOUT).json()
    assert back == {"prompt": "héllo"}


def test_logprobs_cover_the_completion_and_with_echo_the_prompt_too(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Once upon", "temperature": 0, "max_tokens": 3, "logprobs": 2}
    plain = httpx.post(f"{served.url}/v1/completions", json=body, headers=auth, timeout=TIMEOUT).json()["choices"][0]
    echoed = httpx.post(f"{served.url}/v1/completions", json={**body, "echo": True}, headers=auth,
                        timeout=TIMEOUT).json()["choices"][0]
    generated = COMPLETION[:3]
    assert plain["text"] == " a time," and plain["logprobs"]["tokens"] == [TOKENIZER.decode([t]) for t in generated]
    assert echoed["text"] == TOKENIZER.decode(COMPLETION_PROMPT) + plain["text"]
    assert echoed["logprobs"]["tokens"][len(COMPLETION_PROMPT):] == plain["logprobs"]["tokens"]
    assert echoed["logprobs"]["token_logprobs"][len(COMPLETION_PROMPT):] == plain["logprobs"]["token_logprobs"]
    for t, (token, top) in enumerate(zip(plain["logprobs"]["tokens"], plain["logprobs"]["top_logprobs"])):
        assert len(top) == 2 and max(top, key=top.get) == token  # greedy: the sampled token is the likeliest
        assert top[token] == pytest.approx(plain["logprobs"]["token_logprobs"][t])
    assert plain["logprobs"]["text_offset"] == [0, 2, 7]


def test_streamed_samples_are_told_apart_by_index(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, n=2, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == {0: "Hello there, café!", 1: "Hello there, café!"}
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")]
