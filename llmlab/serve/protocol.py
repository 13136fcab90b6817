"""The OpenAI legacy completions API (``POST /v1/completions``): request checks and response bodies.

Reference: OpenAI API reference, "Completions" (legacy) — request fields ``model, prompt, max_tokens,
temperature, top_p, n, stop, stream, stream_options, seed, echo, logprobs, suffix, best_of,
presence_penalty, frequency_penalty, logit_bias, user``; the response object ``text_completion``
and, with ``stream: true``, server-sent events ``data: {chunk}`` ending with ``data: [DONE]``.
vLLM's OpenAI server (spec/anchors.md §3.8) adds sampling extras under their HF names
(``top_k, min_p, repetition_penalty``), as we do.

Everything here is pure (no sockets, no torch): a request body becomes a :class:`CompletionRequest`
(token ids + the engine's ``SamplingParams``) or an :class:`APIError` (HTTP status + OpenAI's error
object), and engine outputs become response dicts. What we do with fields:

* supported: ``prompt`` (a string, a list of strings, a list of token ids, or a list of such lists),
  ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``n``, ``stop`` (a string or a list),
  ``stream``, ``stream_options.include_usage``, ``seed``, and the extras ``top_k``, ``min_p``,
  ``repetition_penalty``, ``no_repeat_ngram_size``; ``model`` and ``user`` are accepted and
  ``model`` is echoed in the response;
* accepted only at their neutral value (anything else is a 400 naming the field, never silently
  ignored): ``echo: false``, ``logprobs: null``, ``suffix: null``, ``best_of`` null or equal to
  ``n``, ``presence_penalty``/``frequency_penalty`` 0, ``logit_bias`` null or ``{}``;
* any other field is a 400 ("Unrecognized request argument supplied: X"), as OpenAI's API answers,
  so a typo (``max_token``) is not silently ignored.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from llmlab.errors import UserError

SUPPORTED = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed", "user",
    "top_k", "min_p", "repetition_penalty", "no_repeat_ngram_size",  # llmlab / vLLM extras (HF names)
)
# OpenAI fields we do not implement: accepted only when they ask for nothing (value -> is it neutral?)
NEUTRAL = {
    "echo": lambda v, body: v is False or v is None,
    "logprobs": lambda v, body: v is None,
    "suffix": lambda v, body: v is None,
    "best_of": lambda v, body: v is None or v == body.get("n", 1),
    "presence_penalty": lambda v, body: v is None or (_is_number(v) and v == 0),
    "frequency_penalty": lambda v, body: v is None or (_is_number(v) and v == 0),
    "logit_bias": lambda v, body: v is None or v == {},
}
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413) before it is read


class APIError(Exception):
    """An HTTP error answered with OpenAI's error object ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error"):  # noqa: A002
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, " ".join(str(message).split()), param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class CompletionRequest:
    """A checked request: what to add to the engine, and how to answer."""

    model: str | None                  # the client's ``model`` (echoed back), None = the served name
    prompts: list[list[int]]           # token ids of each prompt
    params: Any                        # the engine's SamplingParams (shared by every prompt)
    n: int                             # completions per prompt: choice index = prompt index * n + sample
    stream: bool                       # answer with server-sent events
    include_usage: bool = False        # stream_options.include_usage: a last chunk with the token counts
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------- parsing


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 that says why not."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8: send a JSON object encoded as UTF-8") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                          "send a JSON object such as {\"prompt\": \"ROMEO:\", \"max_tokens\": 16}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {_json_type(body)}")
    return body


def parse_completion(
    body: dict,
    *,
    encode: Callable[[str], list[int]],
    vocab_size: int,
    make_params: Callable[[dict], Any],
) -> CompletionRequest:
    """Check an OpenAI completions body and turn it into engine inputs (or raise a 400 APIError).

    ``encode`` tokenizes a prompt string; ``make_params(d)`` builds the engine's SamplingParams from
    ``d`` (keys in SamplingParams' names, only those the client set; the server's generation defaults
    fill the rest) and raises :class:`UserError` naming a bad key. Whether a prompt fits the context
    (with ``max_tokens``) is the engine's check, when the request is added.
    """
    for key in body:
        if key not in SUPPORTED and key not in NEUTRAL:
            raise bad_request(f"Unrecognized request argument supplied: {key}", key)
    for key, neutral in NEUTRAL.items():
        if key in body and not neutral(body[key], body):
            raise bad_request(f"{key}={json.dumps(body[key])} is not supported by llmlab serve: leave {key} out", key)

    model = _get(body, "model", lambda v: isinstance(v, str), "a string")
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false") or False
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object such as {\"include_usage\": true}")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise bad_request(f"Unrecognized stream_options argument supplied: {unknown[0]}", "stream_options")
        include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false",
                             "stream_options.include_usage") or False
    n = _get(body, "n", _int_at_least(1), "an integer >= 1")
    n = 1 if n is None else n

    d: dict[str, Any] = {"n": n}  # SamplingParams' names from here on
    max_tokens = _get(body, "max_tokens", _int_at_least(1), "an integer >= 1")
    if max_tokens is not None:
        d["max_new_tokens"] = max_tokens
    temperature = _get(body, "temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)")
    if temperature is not None:  # the request decides greedy vs sampling, whatever the server default
        d["temperature"], d["greedy"] = temperature, temperature == 0
    top_p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    if top_p is not None:
        d["top_p"] = None if top_p == 1 else top_p  # 1 = the whole distribution: no nucleus filter
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_request(f"stop={json.dumps(stop)} must be a non-empty string or a list of non-empty strings",
                              "stop")
        d["stop"] = list(stops)
    for key, check, must in (
        ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        ("top_k", _int_at_least(1), "an integer >= 1 (null = off)"),
        ("min_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1] (null = off)"),
        ("repetition_penalty", lambda v: _is_number(v) and v > 0, "a number > 0 (1 = off)"),
        ("no_repeat_ngram_size", _int_at_least(0), "an integer >= 0 (0 = off)"),
    ):
        if key in body:  # null is meaningful here (= off), so it overrides the server default
            value = body[key]
            if value is not None and not check(value):
                raise bad_request(f"{key}={json.dumps(value)} is not {must}", key)
            d[key] = value
    try:
        params = make_params(d)
    except UserError as e:  # the engine's own checks (they name the key)
        raise engine_error(e) from None

    return CompletionRequest(model, _prompt_ids(body, encode, vocab_size), params, n, stream, include_usage)


def _prompt_ids(body: dict, encode: Callable[[str], list[int]], vocab_size: int) -> list[list[int]]:
    """``prompt`` as token ids per prompt: a string, a list of strings, token ids, or lists of token ids."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt is required: e.g. {\"prompt\": \"ROMEO:\"}", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        items = [prompt]  # one prompt given as token ids
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad_request(f"prompt must be a string, a non-empty list of strings or of token ids, got "
                          f"{_short(prompt)}", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                ids = encode(item)
            except UserError as e:  # e.g. a character outside an old char vocabulary
                raise bad_request(str(e), "prompt") from None
        elif isinstance(item, list) and all(_is_token(t) for t in item):
            ids = list(item)
        else:
            raise bad_request(f"each prompt must be a string or a list of token ids, got {_short(item)}", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        out.append(ids)
    return out


# ---------------------------------------------------------------------------- responses


def completion_body(req: CompletionRequest, model: str, choices: list[dict], usage: dict) -> dict:
    """The non-streamed response: one choice per (prompt, sample), ordered by index."""
    return {"id": req.id, "object": "text_completion", "created": req.created, "model": model,
            "choices": sorted(choices, key=lambda c: c["index"]), "usage": usage}


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_body(req: CompletionRequest, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    """One streamed chunk (OpenAI: ``object`` is ``text_completion`` for chunks too)."""
    body = {"id": req.id, "object": "text_completion", "created": req.created, "model": model, "choices": choices}
    if req.include_usage:  # OpenAI: usage is null on every chunk but the last, extra one
        body["usage"] = usage
    return body


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")


# ---------------------------------------------------------------------------- helpers


def _get(body: dict, key: str, check: Callable[[Any], bool], must: str, name: str | None = None) -> Any:
    """``body[key]`` checked (None when absent or null)."""
    value = body.get(key)
    if value is not None and not check(value):
        raise bad_request(f"{name or key}={_short(value)} is not {must}", name or key)
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_type(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


_OPENAI_NAME = {"max_new_tokens": "max_tokens"}  # SamplingParams' name -> the request field


def engine_error(e: UserError, default_param: str | None = None) -> APIError:
    """A 400 from the engine's UserError, in the API's names (``max_tokens``, not ``max_new_tokens``)."""
    message = str(e)
    for ours, theirs in _OPENAI_NAME.items():
        message = message.replace(ours, theirs)
    return bad_request(message, named_param(message, default_param))


def named_param(message: str, default: str | None = None) -> str | None:
    """The request field an engine error names (its messages start with ``key=value``)."""
    head = message.split("=", 1)[0].strip()
    if not head.isidentifier():
        return default
    return _OPENAI_NAME.get(head, head)
