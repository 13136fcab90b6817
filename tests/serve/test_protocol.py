"""The HTTP layer of `llmlab serve` in-process: request checks -> SamplingParams, OpenAI's error object,
and a server that keeps serving after a bad request, a bug in one request, a failed engine step or a
client that hangs up mid-stream (a scripted fake engine; the real engine is tested end to end in
test_serve_e2e.py)."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import time

import pytest

from llmlab.errors import UserError
from llmlab.inference.engine import RequestOutput, SamplingParams
from llmlab.serve.protocol import APIError, parse_completion, parse_json
from llmlab.serve.server import CompletionServer, bind

VOCAB = "abcdefghijklmnopqrstuvwxyz ."
DEFAULTS = {"max_new_tokens": 16, "temperature": 1.0, "top_k": None, "top_p": None, "seed": None, "num_samples": 1,
            "stop_at_eos": True, "greedy": False}


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def parse(body: dict):
    return parse_completion(body, encode=encode, vocab_size=len(VOCAB),
                            make_params=lambda d: SamplingParams.from_dict(d, DEFAULTS))


def error_of(body) -> APIError:
    with pytest.raises(APIError) as e:
        parse(body) if isinstance(body, dict) else parse(parse_json(body))
    return e.value


# ---------------------------------------------------------------------------- request -> SamplingParams


def test_openai_fields_map_to_sampling_params():
    req = parse({"model": "x", "prompt": "ab c", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "n": 3,
                 "stop": "\n\n", "seed": 7, "top_k": 4, "min_p": 0.1, "stream": True, "user": "u",
                 "echo": False, "logprobs": None, "best_of": 3, "presence_penalty": 0, "logit_bias": {}})
    p = req.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed, p.top_k, p.min_p, p.greedy) == (
        5, 0.7, 0.9, 3, ["\n\n"], 7, 4, 0.1, False)
    assert req.prompts == [encode("ab c")] and req.n == 3 and req.stream and req.model == "x"


def test_defaults_come_from_the_server_and_temperature_zero_is_greedy():
    req = parse({"prompt": "a"})  # OpenAI's defaults (the server's generation group in serve.yaml)
    assert (req.params.max_new_tokens, req.params.temperature, req.params.greedy, req.n, req.stream) == (
        16, 1.0, False, 1, False)
    assert parse({"prompt": "a", "temperature": 0}).params.is_greedy
    assert parse({"prompt": "a", "top_p": 1}).params.top_p is None  # 1 = the whole distribution
    assert parse({"prompt": "a", "stop": ["x", "yz"]}).params.stop == ["x", "yz"]


def test_prompt_forms():
    assert parse({"prompt": ["ab", "c"]}).prompts == [[0, 1], [2]]
    assert parse({"prompt": [3, 4, 5]}).prompts == [[3, 4, 5]]  # token ids
    assert parse({"prompt": [[3], [4, 5]]}).prompts == [[3], [4, 5]]


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens=0"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"prompt": "a", "n": 0}, "n", "n=0"),
    ({"prompt": "a", "n": True}, "n", "n=true"),
    ({"prompt": "a", "temperature": -1}, "temperature", ">= 0"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "hot"),
    ({"prompt": "a", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "a", "top_k": 0}, "top_k", "top_k=0"),
    ({"prompt": "a", "stop": ""}, "stop", "non-empty"),
    ({"prompt": "a", "stop": ["a", 3]}, "stop", "list of non-empty strings"),
    ({"prompt": "a", "stream": "yes"}, "stream", "true or false"),
    ({"prompt": "a", "seed": 1.5}, "seed", "integer"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"prompt": "a", "max_token": 5}, "max_token", "Unrecognized request argument supplied: max_token"),
    ({"prompt": "a", "echo": True}, "echo", "not supported"),
    ({"prompt": "a", "logprobs": 2}, "logprobs", "not supported"),
    ({"prompt": "a", "best_of": 3}, "best_of", "not supported"),
    ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
    ({"max_tokens": 3}, "prompt", "prompt is required"),
    ({"prompt": []}, "prompt", "non-empty list"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": ["a", 5]}, "prompt", "each prompt"),
    ({"prompt": [0, 99]}, "prompt", "token id 99 is outside the vocabulary [0, 28)"),
    ({"prompt": [[0], [1.5]]}, "prompt", "list of token ids"),
])
def test_bad_fields_are_400_naming_the_field(body, param, words):
    e = error_of(body)
    assert (e.status, e.param, e.type) == (400, param, "invalid_request_error")
    assert words in e.message and "\n" not in e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": None}}


@pytest.mark.parametrize("raw, words", [(b'{"prompt": ', "not valid JSON"), (b"[1, 2]", "JSON object, got a JSON array"),
                                        (b"\xff\xfe", "not UTF-8"), (b"", "not valid JSON")])
def test_malformed_bodies_are_400(raw, words):
    e = error_of(raw)
    assert e.status == 400 and words in e.message and e.param is None


# ---------------------------------------------------------------------------- the server, with a fake engine


class FakeEngine:
    """Engine's interface, scripted: the completion of prompt ids P is P's letters uppercased, one
    token per step; a prompt starting with "z" makes the step raise (a bug in the batch)."""

    context_length = 64

    def __init__(self, step_delay: float = 0.0) -> None:
        self.pending: queue.Queue = queue.Queue()
        self.running: dict[str, list] = {}
        self.aborted: list[str] = []
        self.step_delay = step_delay
        self.stats = {"steps": 0, "generated_tokens": 0}

    def add_request(self, prompt, params, request_id=None, on_output=None):
        if len(prompt) + params.max_new_tokens > self.context_length:
            raise UserError(f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                            f"model's context of {self.context_length} tokens")
        self.pending.put((request_id, list(prompt), params, on_output))
        return request_id

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        return self.running.pop(request_id, None) is not None

    def serve_forever(self, stop_event):
        while not stop_event.is_set():
            try:
                while True:
                    rid, prompt, params, cb = self.pending.get_nowait()
                    self.running[rid] = [prompt, params, cb, 0]
            except queue.Empty:
                pass
            if not self.running:
                time.sleep(0.005)
                continue
            time.sleep(self.step_delay)
            self.stats["steps"] += 1
            for rid, state in list(self.running.items()):
                prompt, params, cb, done = state
                if prompt[0] == VOCAB.index("z"):
                    raise RuntimeError("boom")
                state[3] = done = done + 1
                finished = done >= min(params.max_new_tokens, len(prompt))
                if finished:
                    del self.running[rid]
                self.stats["generated_tokens"] += 1
                cb(RequestOutput(rid, 0, [prompt[done - 1]], VOCAB[prompt[done - 1]].upper(), finished,
                                 "length" if finished else None))


@pytest.fixture
def fake_server():
    engine = FakeEngine()
    server = CompletionServer(bind("127.0.0.1", 0), engine, encode=encode, vocab_size=len(VOCAB), model_name="fake",
                              make_params=_make_params, info={"engine": {"max_num_seqs": 4}})
    server.start()
    yield server, engine
    server.stop()


def _make_params(d: dict):
    if d.get("seed") == 666:
        raise KeyError("a bug in the handler")
    return SamplingParams.from_dict(d, DEFAULTS)


def post(server, body, raw: bytes | None = None, path="/v1/completions", method="POST"):
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(method, path, body=data if method == "POST" else None, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("Content-Type"), resp.read()
    conn.close()
    return out


def test_server_answers_errors_as_json_and_keeps_serving(fake_server):
    server, engine = fake_server
    ok = {"prompt": "abc", "max_tokens": 8}
    status, ctype, body = post(server, ok)
    answer = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert answer["choices"] == [{"text": "ABC", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-") and answer["model"] == "fake"
    cases = [
        (None, b"{not json", "/v1/completions", "POST", 400, "invalid_request_error"),
        ({"prompt": "a", "max_tokens": 64}, None, "/v1/completions", "POST", 400, "invalid_request_error"),
        ({"prompt": "a", "seed": 666}, None, "/v1/completions", "POST", 500, "server_error"),  # a handler bug
        ({"prompt": "zz"}, None, "/v1/completions", "POST", 500, "server_error"),  # an engine step that raises
        (None, None, "/v1/nowhere", "GET", 404, "invalid_request_error"),
        (None, None, "/v1/completions", "GET", 405, "invalid_request_error"),
    ]
    for body, raw, path, method, want, kind in cases:
        status, ctype, data = post(server, body, raw, path, method)
        error = json.loads(data)["error"]
        assert (status, ctype, error["type"]) == (want, "application/json", kind), (body, raw, path, data)
        assert error["message"] and "\n" not in error["message"]
        assert json.loads(post(server, ok)[2])["choices"][0]["text"] == "ABC"  # still serving
    too_long = json.loads(post(server, {"prompt": "a", "max_tokens": 64})[2])["error"]
    assert "max_tokens=64" in too_long["message"] and "max_new_tokens" not in too_long["message"]
    assert not engine.running  # the failed step's request was aborted (else every later step would fail too)
    status, _, health = post(server, None, path="/health", method="GET")
    health = json.loads(health)
    assert status == 200 and health["status"] == "ok" and health["requests"]["engine_errors"] == 1
    assert health["requests"]["server_errors"] == 2 and health["engine"] == {"max_num_seqs": 4}


def test_a_client_that_hangs_up_mid_stream_is_aborted(fake_server):
    server, engine = fake_server
    engine.step_delay = 0.05
    body = json.dumps({"prompt": "abcdefghij" * 3, "max_tokens": 30, "stream": True}).encode()
    sock = socket.create_connection(server.address, timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    while (line := reader.readline()) not in (b"\r\n", b""):
        assert not line.lower().startswith(b"content-type") or b"text/event-stream" in line
    assert reader.readline().startswith(b"data: {")
    reader.close()
    sock.close()  # hang up after the first event
    deadline = time.time() + 5
    while not engine.aborted and time.time() < deadline:
        time.sleep(0.02)
    assert len(engine.aborted) == 1 and not engine.running  # its sequence left the batch
    assert json.loads(post(server, {"prompt": "ab"})[2])["choices"][0]["text"] == "AB"
