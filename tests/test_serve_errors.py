"""The server's errors, OpenAI-shaped, from real requests: bad bodies (400), unknown model (404), missing key
(401), a full queue (429 with Retry-After), an engine error after streaming began (an error event, not a hang),
and a client that disconnects mid-stream (its request cancelled, counted in /metrics).

The server is test_serve's (a scripted model, max_slots=2, max_queue=1, its engine held at will).
"""

import json
import socket
import threading

import httpx
import openai
import pytest

from scripted import TOKENIZER
from test_serve import KEY, MODEL, TIMEOUT, client, served  # noqa: F401  (fixtures)

AUTH = {"Authorization": f"Bearer {KEY}"}


def post(served, path, body=None, headers=AUTH, **kwargs):
    return httpx.post(f"{served.url}{path}", json=body, headers=headers, timeout=TIMEOUT, **kwargs)


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 3}, "n"),  # more samples than --max-slots runs at once
    ({"model": MODEL, "prompt": [TOKENIZER.n_vocab + 7]}, "prompt"),
    ({"model": MODEL, "prompt": " word" * 200}, "prompt"),  # longer than the context of 128
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": MODEL, "prompt": 7}, "prompt"),
])
def test_bad_completion_requests_are_400(served, body, param):
    error = error_of(post(served, "/v1/completions", body), 400)
    assert error["type"] == "invalid_request_error" and (error["param"] or "").startswith(param), error


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": " word" * 200}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -2},
     "max_completion_tokens"),
])
def test_bad_chat_requests_are_400(served, body, param):
    error = error_of(post(served, "/v1/chat/completions", body), 400)
    assert (error["param"] or "").startswith(param), error


def test_malformed_json_is_400(served):
    response = httpx.post(f"{served.url}/v1/chat/completions", content=b'{"model": ', timeout=TIMEOUT,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert "JSON" in error_of(response, 400)["message"]


def test_unknown_model_is_404_and_a_wrong_key_401(served, client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-5", prompt="x")
    assert missing.value.body["code"] == "model_not_found"
    wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    error_of(post(served, "/v1/completions", {"prompt": "x"}, headers={}), 401)
    error_of(post(served, "/tokenize", {"prompt": "x"}, headers={}), 401)
    assert httpx.get(f"{served.url}/health", timeout=TIMEOUT).status_code == 200  # health needs no key


def test_a_full_queue_is_429_with_retry_after(served):
    body = {"model": MODEL, "prompt": "Once upon", "temperature": 0, "max_tokens": 8}
    replies = []
    run = lambda b: replies.append(post(served, "/v1/completions", b).status_code)
    served.engine.gate.clear()
    try:
        running = threading.Thread(target=run, args=(body,))
        running.start()
        served.wait_until(lambda: served.metric("llm_requests_running") == 1, "the first request to run")
        waiting = threading.Thread(target=run, args=({**body, "temperature": 0.5},))
        waiting.start()
        served.wait_until(lambda: served.metric("llm_requests_waiting") == 1, "the second request to wait")
        rejected_before = served.metric("llm_requests_rejected_total")
        full = post(served, "/v1/completions", body)
        assert error_of(full, 429)["type"] == "rate_limit_error" and full.headers["retry-after"] == "1"
        error_of(post(served, "/v1/completions", {**body, "stream": True}), 429)  # before any byte of a stream
        assert served.metric("llm_requests_rejected_total") == rejected_before + 2
    finally:
        served.engine.gate.set()
    running.join(TIMEOUT), waiting.join(TIMEOUT)
    assert replies == [200, 200]


def test_a_disconnect_mid_stream_cancels_the_request(served):
    before = served.metric("llm_requests_cancelled_total")
    body = {"model": MODEL, "prompt": "Once upon", "temperature": 0, "max_tokens": 16, "stream": True}
    served.engine.gate.clear()
    try:
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # the first text arrived; the engine is held at its first token
        served.wait_until(lambda: served.metric("llm_requests_cancelled_total") == before + 1, "the cancellation")
    finally:
        served.engine.gate.set()
    served.wait_until(lambda: served.metric("llm_requests_running") == 0, "the batch to end")
    again = post(served, "/v1/completions", {**body, "stream": False})  # the server goes on
    assert again.json()["choices"][0]["text"] == " a time, the end."


def test_a_disconnect_before_a_whole_reply_cancels_it_too(served):
    before = served.metric("llm_requests_cancelled_total")
    body = json.dumps({"model": MODEL, "prompt": "Once upon", "temperature": 0, "max_tokens": 16}).encode()
    host, port = served.url.removeprefix("http://").split(":")
    served.engine.gate.clear()
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            served.wait_until(lambda: served.metric("llm_requests_running") == 1, "the request to run")
        served.wait_until(lambda: served.metric("llm_requests_cancelled_total") == before + 1, "the cancellation")
    finally:
        served.engine.gate.set()
    served.wait_until(lambda: served.metric("llm_requests_running") == 0, "the batch to end")


def test_an_engine_error_after_streaming_began_is_an_error_event(served):
    body = {"model": MODEL, "prompt": "Once upon", "temperature": 0, "max_tokens": 16}
    served.engine.fail = True
    try:
        with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                          timeout=TIMEOUT) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "failed on purpose" in json.loads(events[-2])["error"]["message"]
        assert json.loads(events[0])["choices"][0]["text"] == " a"  # streaming had begun
        error_of(post(served, "/v1/completions", body), 500)
    finally:
        served.engine.fail = False


def test_metrics_count_tokens_and_latencies(served):
    post(served, "/v1/completions", {"model": MODEL, "prompt": "Once upon", "temperature": 0, "max_tokens": 16})
    assert served.metric("llm_prompt_tokens_total") >= 3 and served.metric("llm_generation_tokens_total") >= 7
    assert served.metric("llm_time_to_first_token_seconds_count") >= 1
    assert served.metric("llm_inter_token_latency_seconds_count") >= 6
