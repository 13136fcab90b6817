"""`llmlab serve` end to end: the real CLI started as a subprocess on a free port, a tiny trained char
GPT, the real continuous-batching engine, and a plain HTTP client (http.client) talking to it."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY, cli_env, run_dirs

pytestmark = pytest.mark.slow

CONTEXT = 128  # the model's block_size
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we", "KING", "JULIET:\nO Romeo, Romeo! wherefore"]
GREEDY_TOKENS = 48  # long enough that concurrent requests overlap for many steps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_corpus) -> Path:
    """A tiny char GPT trained for a few steps (enough that greedy argmaxes are not near-ties)."""
    root = tmp_path_factory.mktemp("serve_train")
    tiny = [o for o in TINY if not o.startswith("model.block_size=")]
    subprocess.run([sys.executable, "-m", "llmlab.cli", "train", "data=text", f"data.path={small_corpus}", *tiny,
                    f"model.block_size={CONTEXT}", "debug=limit", "trainer.max_steps=20",
                    "trainer.val_check_interval=20", "test=false", "callbacks.samples=null"],
                   cwd=root, env=cli_env(root), check=True, capture_output=True, text=True, timeout=600)
    return run_dirs(root)[-1] / "checkpoints" / "last.ckpt"


class Server:
    def __init__(self, proc: subprocess.Popen, out: Path, err: Path, host: str, port: int) -> None:
        self.proc, self.out, self.err, self.host, self.port = proc, out, err, host, port

    def request(self, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict, str]:
        """(status, headers, body text) of one request on a fresh connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, text

    def complete(self, **body) -> dict:
        status, _, text = self.request("POST", "/v1/completions", body)
        assert status == 200, text
        return json.loads(text)

    def stream(self, **body) -> tuple[dict, list[str]]:
        """(headers, the data: payloads in order) of a streamed completion."""
        status, headers, text = self.request("POST", "/v1/completions", {**body, "stream": True})
        assert status == 200, text
        events = text.split("\n\n")
        assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1]), text
        return headers, [e[len("data: "):] for e in events[:-1]]

    def health(self) -> dict:
        status, _, text = self.request("GET", "/health")
        assert status == 200, text
        return json.loads(text)


@pytest.fixture(scope="module")
def started(ckpt, tmp_path_factory) -> tuple[subprocess.Popen, Path, Path]:
    """`llmlab serve ckpt_path=X port=0` booting in the background (stdout/stderr to files)."""
    root = tmp_path_factory.mktemp("serve")
    out, err = root / "stdout.txt", root / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "serve", f"ckpt_path={ckpt}", "port=0",
                                 "engine.block_size=8", "engine.max_num_seqs=8"],
                                cwd=root, env=cli_env(root), stdout=fo, stderr=fe)
    yield proc, out, err
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(started) -> Server:
    """The started server once it printed its "serving ... on http://host:port" line."""
    proc, out, err = started
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and proc.poll() is None:
        line = next((ln for ln in out.read_text().splitlines() if ln.startswith("serving ")), "")
        if line:
            break
        time.sleep(0.1)
    assert line, f"no 'serving' line: exit {proc.poll()}\n{out.read_text()}\n{err.read_text()[-3000:]}"
    host, port = line.split(" on http://", 1)[1].split(" ", 1)[0].rsplit(":", 1)
    return Server(proc, out, err, host, int(port))


@pytest.fixture(scope="module")
def greedy(ckpt, started) -> dict[str, str]:
    """`llmlab`'s own generate of each prompt alone (no engine): the greedy references (computed while
    the server boots)."""
    from llmlab.checkpoint import load_method

    method, _ = load_method(ckpt)
    return {p: method.sample(p, max_new_tokens=GREEDY_TOKENS, greedy=True)[0] for p in PROMPTS}


def test_serving_line_and_health(greedy, server, ckpt):
    line = server.out.read_text().splitlines()[0]
    assert line.startswith(f"serving {ckpt} on http://127.0.0.1:{server.port} (model gpt 1L x 32")
    assert "block_size=8" in line and "max_num_seqs=8" in line
    health = server.health()
    assert health["status"] == "ok" and health["context_length"] == CONTEXT and health["model"] == str(ckpt)
    assert health["engine"]["max_num_seqs"] == 8 and "steps" in health["stats"]
    status, _, text = server.request("GET", "/v1/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == str(ckpt)


def test_concurrent_clients_are_batched_and_equal_generate_alone(server, greedy):
    server.complete(prompt="warm up", max_tokens=2)  # first-call costs are not part of the race below
    before = server.health()["stats"]
    barrier = threading.Barrier(len(PROMPTS))
    answers: dict[str, dict] = {}

    def client(prompt: str) -> None:
        barrier.wait()
        answers[prompt] = server.complete(model="tiny", prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0)

    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = server.health()["stats"]
    for prompt in PROMPTS:
        answer = answers[prompt]
        assert answer["object"] == "text_completion" and answer["model"] == "tiny"
        assert answer["choices"] == [{"text": greedy[prompt], "index": 0, "logprobs": None, "finish_reason": "length"}]
        assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": GREEDY_TOKENS,
                                   "total_tokens": len(prompt) + GREEDY_TOKENS}
    generated = after["generated_tokens"] - before["generated_tokens"]
    steps = after["steps"] - before["steps"]
    assert generated == len(PROMPTS) * GREEDY_TOKENS
    # one at a time would be ~1 token per step; the clients shared the engine's decode steps
    assert generated / steps > 2, (generated, steps)


def test_streaming_concatenates_to_the_greedy_text(server, greedy):
    prompt = PROMPTS[1]
    headers, events = server.stream(prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0)
    assert headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2  # one event per new piece of text, not one at the end
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy[prompt]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]

    _, events = server.stream(prompt=[prompt, PROMPTS[2]], max_tokens=5, temperature=0,
                              stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert texts == {0: greedy[prompt][:5], 1: greedy[PROMPTS[2]][:5]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_n_samples_and_prompt_lists(server):
    body = {"prompt": ["ROMEO:", "KING"], "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 3}
    answer = server.complete(**body)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]  # prompt i, sample j -> index i * n + j
    assert all(len(c["text"]) == 8 and c["finish_reason"] == "length" for c in choices)
    assert len({c["text"] for c in choices}) > 1  # the samples differ
    assert answer["usage"] == {"prompt_tokens": 6 + 4, "completion_tokens": 32, "total_tokens": 42}
    assert server.complete(**body)["choices"] == choices  # a seed makes it reproducible


def test_stop_strings(server, greedy):
    prompt = PROMPTS[0]
    ref = greedy[prompt]
    stop = ref[6:8]
    cut = ref.index(stop)
    answer = server.complete(prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, stop=[stop, "\x00never"])
    assert answer["choices"][0]["text"] == ref[:cut] and answer["choices"][0]["finish_reason"] == "stop"
    _, events = server.stream(prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, stop=stop)
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref[:cut]  # held back, never sent then taken back
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_llmlab_extras_reach_the_engine(server, greedy):
    prompt = PROMPTS[3]
    answer = server.complete(prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, no_repeat_ngram_size=2)
    text = prompt + answer["choices"][0]["text"]  # char tokenizer: one token per character
    bigrams = [text[i:i + 2] for i in range(len(text) - 1)]
    generated = bigrams[len(prompt) - 1:]
    assert all(bigrams[:i + len(prompt) - 1].count(b) == 0 for i, b in enumerate(generated))  # never repeated
    assert len(set(greedy[prompt][i:i + 2] for i in range(GREEDY_TOKENS - 1))) < GREEDY_TOKENS - 1  # plain greedy does


@pytest.mark.parametrize("method, path, body, status, param, words", [
    ("POST", "/v1/completions", b'{"prompt": "ROMEO:", ', 400, None, "not valid JSON"),
    ("POST", "/v1/completions", {"prompt": "A" * (CONTEXT - 8)}, 400, "prompt",  # + max_tokens 16 > context
     f"prompt of {CONTEXT - 8} tokens + max_tokens=16 exceeds the model's context of {CONTEXT} tokens"),
    ("POST", "/v1/completions", {"prompt": "A" * (CONTEXT + 1), "max_tokens": 1}, 400, "prompt", f"{CONTEXT + 1} tokens"),
    ("POST", "/v1/completions", {"prompt": "ROMEO:", "n": 0}, 400, "n", "n=0"),
    ("POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 0}, 400, "max_tokens", "max_tokens=0"),
    ("POST", "/v1/completions", {"prompt": "ROMEO:", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("POST", "/v1/completions", {"prompt": "ROMEO:", "stream": "yes"}, 400, "stream", "true or false"),
    ("POST", "/v1/completions", {"prompt": "ROMEO:", "maxtokens": 5}, 400, "maxtokens", "Unrecognized"),
    ("POST", "/v1/completions", {"prompt": "ROMEO:", "n": 9}, 400, "n", "max_num_seqs=8"),
    ("POST", "/v1/chat/completions", {"messages": []}, 404, None, "no route POST /v1/chat/completions"),
    ("GET", "/v1/completions", None, 405, None, "use POST /v1/completions"),
])
def test_bad_requests_are_json_errors_and_the_server_keeps_serving(server, greedy, method, path, body, status, param,
                                                                   words):
    got, headers, text = server.request(method, path, body)
    assert (got, headers["content-type"]) == (status, "application/json"), text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] is None
    assert words in error["message"] and "\n" not in error["message"]
    answer = server.complete(prompt=PROMPTS[2], max_tokens=GREEDY_TOKENS, temperature=0)
    assert answer["choices"][0]["text"] == greedy[PROMPTS[2]]


def test_bad_command_lines_are_one_line(ckpt, tmp_path, server):
    cases = {
        "no ckpt_path": (["serve"], "ckpt_path is required"),
        "missing checkpoint": (["serve", f"ckpt_path={tmp_path / 'nope.ckpt'}"], "does not exist"),
        "port in use": (["serve", f"ckpt_path={ckpt}", f"port={server.port}"],  # the running server's port
                        f"port {server.port} on 127.0.0.1 is already in use"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "llmlab.cli", *args], cwd=tmp_path, env=cli_env(tmp_path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert "serving" not in out


@pytest.mark.parametrize("override, words", [
    ("port=70000", "port=70000 is not a TCP port in [0, 65535]"),
    ("port=http", "port=http is not a TCP port"),
    ("engine.max_num_seqs=0", "engine.max_num_seqs=0 is not an integer >= 1"),
    ("engine.enable_prefix_caching=maybe", "engine.enable_prefix_caching=maybe is not true or false"),
    ("generation.temperature=-1", "generation.temperature=-1 is not a number >= 0"),
])
def test_bad_settings_fail_before_anything_loads(ckpt, override, words):
    from hydra import compose, initialize_config_dir

    from llmlab.cli import CONF_DIR
    from llmlab.errors import UserError
    from llmlab.schema import validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt_path={ckpt}", override])
    with pytest.raises(UserError, match=re.escape(words)):
        validate(cfg, "serve")


def test_sigterm_stops_cleanly(server):
    """Last: the module's server is stopped here (SIGTERM, as a service manager does; SIGINT = Ctrl-C is the same)."""
    assert server.health()["requests"]["active"] == 0
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.err.read_text()[-3000:]
    assert server.out.read_text().splitlines()[-1].startswith("stopped serving ")
    with pytest.raises(OSError):
        socket.create_connection((server.host, server.port), timeout=2).close()
