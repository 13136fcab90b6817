"""The HTTP layer of `llmlab serve`: ``ThreadingHTTPServer`` in front of one batching engine.

Design (vLLM's ``AsyncLLMEngine`` + OpenAI server, spec/anchors.md §3.8, in the standard library):
one thread per HTTP connection parses and checks the request (:mod:`llmlab.serve.protocol`), adds
its prompts to the engine with a callback that fills a per-request queue, and answers from that
queue — the whole body at the end, or one server-sent event per new piece of text. A single engine
thread runs ``Engine.serve_forever``: every step decodes all running sequences of all clients as
one batch, so concurrent clients are batched together, and requests join and leave that batch
between steps (continuous batching).

Endpoints: ``POST /v1/completions``; ``GET /health`` (status, model, engine settings and stats);
``GET /v1/models`` (OpenAI's model list, for clients that ask). Every error is OpenAI's JSON error
object; a bad request, a client that hangs up or a bug in one request never stops the server.
"""

from __future__ import annotations

import errno
import json
import queue
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from llmlab.errors import UserError
from llmlab.serve.protocol import (
    MAX_BODY_BYTES,
    APIError,
    CompletionRequest,
    bad_request,
    choice,
    chunk_body,
    completion_body,
    engine_error,
    parse_completion,
    parse_json,
    sse,
    usage_body,
)

POLL_SECONDS = 0.5  # how often a waiting request checks that the engine thread is still alive


def bind(host: str, port: int) -> ThreadingHTTPServer:
    """Listen on host:port now (port 0 = a free one), so a taken port fails before the model loads."""
    try:
        httpd = _HTTPServer((host, port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use: pass another port=... "
                            "(port=0 picks a free one) or stop the program using it") from None
        if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass host=127.0.0.1 (this "
                            "machine only), host=0.0.0.0 (every interface) or a port >= 1024") from None
        raise
    return httpd


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True   # an open keep-alive or streaming connection never blocks shutdown
    block_on_close = False
    app: "CompletionServer"


class CompletionServer:
    """The engine, its thread, and what the request handlers need to talk to it.

    ``engine`` follows :class:`llmlab.inference.engine.Engine`'s interface (``add_request`` with
    ``on_output``, ``abort_request``, ``serve_forever(stop_event)``, ``stats``, ``context_length``);
    ``make_params(d)`` builds its SamplingParams from the fields a request set (the server's
    generation defaults fill in the rest); ``encode`` tokenizes a prompt string.
    """

    def __init__(
        self,
        httpd: ThreadingHTTPServer,
        engine: Any,
        *,
        encode: Callable[[str], list[int]],
        vocab_size: int,
        model_name: str,
        make_params: Callable[[dict], Any],
        info: dict | None = None,
    ) -> None:
        self.httpd, self.engine, self.encode, self.vocab_size = httpd, engine, encode, vocab_size
        self.model_name, self.make_params = model_name, make_params
        self.info = info or {}  # shown by GET /health (model and engine settings)
        self.httpd.app = self
        self.engine_error: str | None = None  # set once the engine loop gave up: requests then get a 503
        self.counts = {"requests": 0, "completions": 0, "bad_requests": 0, "server_errors": 0, "active": 0,
                       "engine_errors": 0}
        self._lock = threading.Lock()
        self._inflight: dict[str, queue.Queue] = {}  # engine request id -> its handler's queue
        self._stop_engine = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._engine_loop, name="llmlab-engine", daemon=True),
            threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="llmlab-http",
                             daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting connections, stop the engine loop, close the socket."""
        self.httpd.shutdown()
        self._stop_engine.set()
        for t in self._threads:
            t.join(timeout)
        self.httpd.server_close()

    def _engine_loop(self, max_consecutive_errors: int = 3) -> None:
        """Run the engine; a step that raises fails the requests in flight (500) and the loop goes on.

        A bug in one step must not hang every client nor kill the server; the requests that were in
        the batch are aborted (their blocks freed) since their state may be half-updated. After a few
        failures in a row, with nothing succeeding in between, the engine is declared broken (503)."""
        failures, steps_at_failure = 0, None
        while not self._stop_engine.is_set():
            try:
                self.engine.serve_forever(self._stop_engine)
                return
            except Exception as e:  # noqa: BLE001
                self.count("engine_errors")
                message = f"{type(e).__name__}: {e}"
                print(f"llmlab serve: an engine step failed, failing the requests in flight: {message}",
                      file=sys.stderr, flush=True)
                traceback.print_exc()
                steps = self.engine.stats.get("steps")
                failures = failures + 1 if steps == steps_at_failure else 1
                steps_at_failure = steps
                self._fail_inflight(e)
                if failures >= max_consecutive_errors:
                    self.engine_error = message
                    return

    def _fail_inflight(self, error: Exception) -> None:
        with self._lock:
            inflight = list(self._inflight.items())
        for rid, q in inflight:
            self.engine.abort_request(rid)
            q.put((None, error))

    def count(self, key: str, delta: int = 1) -> None:
        with self._lock:
            self.counts[key] += delta

    # ------------------------------------------------------------------ endpoints
    def health(self) -> tuple[int, dict]:
        body = {"status": "ok" if self.engine_error is None else "error", "model": self.model_name,
                "context_length": int(self.engine.context_length), **self.info, "stats": self.stats(),
                "requests": dict(self.counts)}
        if self.engine_error is not None:
            body["error"] = self.engine_error
            return 503, body
        return 200, body

    def stats(self) -> dict:
        stats = dict(self.engine.stats)
        steps = stats.get("steps") or 0
        if steps and "generated_tokens" in stats:  # > 1: sequences were decoded side by side
            stats["tokens_per_step"] = round(stats["generated_tokens"] / steps, 3)
        return stats

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "llmlab"}]}

    def parse(self, raw: bytes) -> CompletionRequest:
        return parse_completion(parse_json(raw), encode=self.encode, vocab_size=self.vocab_size,
                                make_params=self.make_params)

    def submit(self, req: CompletionRequest) -> Iterator[tuple[int, str, int, str | None]]:
        """Add the request's prompts to the engine; yield ``(choice index, new text, new tokens,
        finish_reason or None)`` as the engine produces them, until every choice finished.

        A generator: nothing reaches the engine before the first ``next()``; closing it early (the
        client hung up) aborts what is still running, so its blocks go to other requests."""
        if self.engine_error is not None:
            raise APIError(503, f"the engine stopped ({self.engine_error}): restart llmlab serve", type="server_error")
        outputs: queue.Queue = queue.Queue()
        ids: list[str] = []
        remaining = len(req.prompts) * req.n
        try:
            for i, prompt in enumerate(req.prompts):
                rid = f"{req.id}-{i}"
                with self._lock:
                    self._inflight[rid] = outputs
                ids.append(rid)
                try:
                    self.engine.add_request(prompt, req.params, request_id=rid,
                                            on_output=lambda out, i=i: outputs.put((i, out)))
                except UserError as e:  # the engine's checks: context length, n vs the pool ...
                    raise engine_error(e, "prompt") from None
            while remaining:
                try:
                    i, out = outputs.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if self.engine_error is not None:
                        raise APIError(500, f"the engine stopped ({self.engine_error})", type="server_error") from None
                    continue
                if isinstance(out, BaseException):  # the engine loop failed this request
                    raise APIError(500, f"generation failed: {type(out).__name__}: {out}", type="server_error")
                remaining -= bool(out.finished)
                yield (i * req.n + int(out.index), out.text or "", len(out.token_ids or ()),
                       (out.finish_reason or "stop") if out.finished else None)
        finally:
            with self._lock:
                for rid in ids:
                    self._inflight.pop(rid, None)
            if remaining:  # the client hung up or we failed: free the engine's blocks for others
                for rid in ids:
                    self.engine.abort_request(rid)

    def response_model(self, req: CompletionRequest) -> str:
        return req.model or self.model_name  # echo the client's name (OpenAI clients require one)


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection (HTTP/1.1 keep-alive; streams close the connection when done)."""

    protocol_version = "HTTP/1.1"
    server_version = "llmlab-serve"
    timeout = 300  # seconds a connection may sit idle (keep-alive) before its thread lets it go
    server: _HTTPServer

    # ------------------------------------------------------------------ routing
    def do_GET(self) -> None:  # noqa: N802 — http.server's naming
        self._handle({"/health": self._health, "/v1/models": self._models}, allowed={"/v1/completions": "POST"})

    def do_POST(self) -> None:  # noqa: N802
        self._handle({"/v1/completions": self._completions}, allowed={"/health": "GET", "/v1/models": "GET"})

    def do_PUT(self) -> None:  # noqa: N802
        self._handle({}, allowed={"/v1/completions": "POST", "/health": "GET", "/v1/models": "GET"})

    do_DELETE = do_PATCH = do_PUT

    def _handle(self, routes: dict[str, Callable[[], None]], allowed: dict[str, str]) -> None:
        app = self.server.app
        self._started = False  # response headers sent: an error can no longer change the status
        path = urlsplit(self.path).path
        try:
            if path in routes:
                routes[path]()
            elif path in allowed:
                self._drain()
                raise APIError(405, f"{self.command} {path} is not allowed: use {allowed[path]} {path}")
            else:
                self._drain()
                raise APIError(404, f"no route {self.command} {path}: use POST /v1/completions, GET /health or "
                                    "GET /v1/models")
        except APIError as e:
            app.count("bad_requests" if e.status < 500 else "server_errors")
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up: nothing to answer
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 — a bug in one request must not take the server down
            app.count("server_errors")
            traceback.print_exc()
            self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    # ------------------------------------------------------------------ endpoints
    def _health(self) -> None:
        status, body = self.server.app.health()
        self._json(status, body)

    def _models(self) -> None:
        self._json(200, self.server.app.models())

    def _completions(self) -> None:
        app = self.server.app
        app.count("requests")
        req = app.parse(self._body())
        app.count("active")
        try:
            if req.stream:
                self._stream(app, req)
            else:
                self._complete(app, req)
            app.count("completions")
        finally:
            app.count("active", -1)

    def _complete(self, app: CompletionServer, req: CompletionRequest) -> None:
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str] = {}
        completion_tokens = 0
        for index, text, n_tokens, reason in app.submit(req):
            texts.setdefault(index, []).append(text)
            completion_tokens += n_tokens
            if reason is not None:
                reasons[index] = reason
        choices = [choice(i, "".join(parts), reasons.get(i, "stop")) for i, parts in texts.items()]
        usage = usage_body(sum(len(p) for p in req.prompts), completion_tokens)
        self._json(200, completion_body(req, app.response_model(req), choices, usage))

    def _stream(self, app: CompletionServer, req: CompletionRequest) -> None:
        events = app.submit(req)  # a generator: nothing is added to the engine before the first next()
        model = app.response_model(req)
        completion_tokens = 0
        try:
            first = next(events, None)  # errors before any output still get a proper status code
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the body ends when the connection closes
            self.end_headers()
            self._started, self.close_connection = True, True
            pending = [first] if first is not None else []
            for event in _chain(pending, events):
                index, text, n_tokens, reason = event
                completion_tokens += n_tokens
                if text or reason is not None:
                    self._write(sse(chunk_body(req, model, [choice(index, text, reason)])))
            if req.include_usage:
                usage = usage_body(sum(len(p) for p in req.prompts), completion_tokens)
                self._write(sse(chunk_body(req, model, [], usage)))
            self._write(sse("[DONE]"))
        finally:
            events.close()  # a client that hung up: abort its sequences in the engine

    # ------------------------------------------------------------------ I/O
    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported: send a Content-Length header")
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a POST needs a Content-Length header (and a JSON body)")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise bad_request(f"Content-Length {length!r} is not a number") from None
        if n < 0 or n > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"the request body has {n} bytes, more than the {MAX_BODY_BYTES} allowed")
        return self.rfile.read(n)

    def _drain(self) -> None:
        """Read (and drop) a body we will not use, so the next request on this connection parses."""
        length = self.headers.get("Content-Length")
        if length is None:
            return
        try:
            n = int(length)
        except ValueError:
            n = -1
        if 0 <= n <= MAX_BODY_BYTES:
            self.rfile.read(n)
        else:
            self.close_connection = True

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._started = True
        self._write(data)

    def _error(self, e: APIError) -> None:
        if not self._started:
            try:
                self._json(e.status, e.body())
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return
        try:  # mid-stream: the status is sent; tell the client in the stream, then close
            self._write(sse(e.body()))
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — http.server's signature
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message or HTTPStatus(code).phrase)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest
