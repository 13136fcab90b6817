"""`llmlab infer ckpt_path=X prompts=FILE.jsonl [out=F]`: offline batch inference on the
continuous-batching engine (:mod:`llmlab.inference.engine`; Yu et al. 2022 "Orca", Kwon et al. 2023
"PagedAttention").

``prompts`` is a JSONL file, one request a line: ``{"prompt": "...", "id": ..., <settings>}``, the
settings named as in the ``generation`` group (``max_new_tokens, temperature, top_k, top_p, min_p,
greedy, seed, num_samples, stop_strings, stop_at_eos, repetition_penalty, no_repeat_ngram_size``); a
setting a line leaves out comes from the ``generation`` group (the command line). A file whose name
does not end in ``.jsonl`` / ``.json`` is read as plain text, one prompt a line (as
:mod:`llmlab.alignment.preferences` reads it). Every line is checked before anything runs: a bad
line is one error naming the file, the line and the key, exit code 2, nothing written.

Output (written atomically): one JSON line per request, in input order,
``{"id", "prompt", "completions": [{"text", "finish_reason", "num_tokens"}, ...]}`` (one completion per
sample), to ``out`` (default ``<run dir>/completions.jsonl``), and a one-line summary: requests,
tokens, tokens/s, peak KV blocks, preemptions. The engine's sizes are the ``engine`` keys.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmlab.errors import UserError
from llmlab.inference.engine import GENERATION_NAMES, SamplingParams
from llmlab.utils import atomic_write_text, plain

# what a request line may set: the prompt, an id, and the generation group's per-request settings
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "greedy", "seed", "num_samples",
            "stop_strings", "stop_at_eos", "repetition_penalty", "no_repeat_ngram_size")
REQUEST_KEYS = ("prompt", "id", *SETTINGS)
# generation-group keys that ask for something the engine does not do
UNSUPPORTED = {"num_beams": 1, "draft": None}


@dataclass
class BatchRequest:
    id: Any  # the line's "id", else its 1-based line number
    prompt: str
    params: SamplingParams
    source: str  # FILE:LINE for messages
    own_max_new_tokens: bool = False  # the line sets max_new_tokens (else the group's default applies)


def read_requests(path: str | Path, defaults: dict | None = None) -> list[BatchRequest]:
    """Parse and check every request of a prompts file (module docstring)."""
    path = Path(str(path)).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts={path}: no such file: pass a JSONL file of {{\"prompt\": ...}} lines") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"prompts={path} cannot be read ({type(e).__name__}: {e}): pass a UTF-8 JSONL file") from None
    defaults = {k: v for k, v in (defaults or {}).items() if k in SETTINGS}
    jsonl = path.suffix in (".jsonl", ".json")
    requests = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not a JSON object ({e.msg}): write one {{\"prompt\": ...}} per line"
                                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: a request is a JSON object like {{\"prompt\": \"ROMEO:\"}}, "
                                f"got {line.strip()[:40]}")
        else:
            row = {"prompt": line.strip()}
        unknown = [k for k in row if k not in REQUEST_KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}: a request may set {', '.join(REQUEST_KEYS)}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{where}: \"prompt\" must be a non-empty string, got {json.dumps(prompt)}")
        settings = {k: v for k, v in row.items() if k in SETTINGS}
        try:
            params = SamplingParams.from_dict(settings, defaults)
        except UserError as e:
            raise UserError(f"{where}: {_generation_name(str(e))}") from None
        requests.append(BatchRequest(row.get("id", number), prompt, params, where, "max_new_tokens" in row))
    if not requests:
        raise UserError(f"prompts={path} has no requests: write one {{\"prompt\": ...}} per line")
    return requests


def infer_batch(method, cfg) -> dict:
    """Run the requests of ``cfg.prompts`` through the engine; write the completions (module docstring)."""
    from llmlab.inference.engine import Engine

    generation = dict(plain(cfg.get("generation")) or {})
    for key, neutral in UNSUPPORTED.items():
        if generation.get(key, neutral) != neutral:
            raise UserError(f"generation.{key}={generation[key]} does not apply to prompts=FILE (the "
                            "continuous-batching engine samples): drop it, or use prompt=\"...\" for one prompt")
    tok = method.tokenizer
    if tok is None:
        raise UserError("this checkpoint has no tokenizer attached: load a run of llmlab train")
    requests = read_requests(str(cfg.prompts), generation)
    out = Path(str(cfg.get("out") or Path(str(cfg.paths.output_dir)) / "completions.jsonl")).expanduser()
    model = getattr(method.model, "_orig_mod", method.model)
    engine = Engine(model, tok, **(plain(cfg.get("engine")) or {}))
    capped = _cap_default_lengths(requests, tok, model.config.block_size)
    ids = []
    for r in requests:  # all checked (context, pool) before anything runs
        try:
            ids.append(engine.add_request(r.prompt, r.params, collect=True))
        except UserError as e:
            raise UserError(f"{r.source}: {e}") from None
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    done = engine.take_completions(ids)
    lines = []
    for r, c in zip(requests, done):
        completions = [{"text": o["text"], "finish_reason": o["finish_reason"], "num_tokens": len(o["token_ids"])}
                       for o in c.outputs]
        lines.append(json.dumps({"id": r.id, "prompt": r.prompt, "completions": completions}, ensure_ascii=False))
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    stats = engine.stats
    tokens = stats["generated_tokens"]
    samples = sum(len(c.outputs) for c in done)
    print(f"wrote {samples} completions of {len(requests)} requests to {out}: {tokens} tokens in {elapsed:.2f} s "
          f"({tokens / max(elapsed, 1e-9):.1f} tokens/s), peak {stats['peak_blocks_in_use']}/{stats['num_blocks']} "
          f"KV blocks of {stats['block_size']} tokens, {stats['preemptions']} preemptions, {stats['steps']} steps"
          + (f"; {capped} requests without their own max_new_tokens stopped at the model's context of "
             f"{model.config.block_size} tokens (generation.max_new_tokens={generation.get('max_new_tokens')})"
             if capped else ""))
    return {"requests": len(requests), "completions": samples, "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / max(elapsed, 1e-9), "peak_blocks_in_use": stats["peak_blocks_in_use"],
            "preemptions": stats["preemptions"], "path": str(out)}


def _cap_default_lengths(requests: list[BatchRequest], tok, context: int) -> int:
    """A request that leaves max_new_tokens to the group's default (200, meant for `infer prompt=...`, which
    slides its window) generates up to the model's context; one that sets it explicitly must fit (one line
    otherwise, as OpenAI's max_tokens). Returns how many requests were capped."""
    capped = 0
    for r in requests:
        room = context - len(tok.encode(r.prompt))
        if not r.own_max_new_tokens and 0 < room < r.params.max_new_tokens:
            r.params = replace(r.params, max_new_tokens=room)
            capped += 1
    return capped


def _generation_name(message: str) -> str:
    """Engine messages name SamplingParams fields (n=, stop=); a request file uses the group's names."""
    for group_name, field_name in GENERATION_NAMES.items():
        if message.startswith(f"{field_name}="):
            return group_name + message[len(field_name):]
    return message
