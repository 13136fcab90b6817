"""`llmlab serve ckpt_path=X [port=8000] [host=127.0.0.1]`: serve a trained GPT over HTTP.

OpenAI's legacy completions API (``POST /v1/completions``, streaming with server-sent events) and
``GET /health``, backed by the continuous-batching engine (:mod:`llmlab.inference.engine`); see
:mod:`llmlab.serve.server`. Runs until SIGINT (Ctrl-C) or SIGTERM, then shuts down cleanly (exit 0).
"""

from __future__ import annotations

import signal
import threading

from omegaconf import DictConfig

from llmlab.checkpoint import load_method, resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.utils import plain


def serve(cfg: DictConfig) -> None:
    from llmlab.serve.server import bind

    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.get("name"))
    httpd = bind(str(cfg.host), int(cfg.port))  # a taken port fails now, not after loading the model
    try:
        server = _build(cfg, path, httpd)
    except BaseException:
        httpd.server_close()
        raise
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    host, port = server.address
    engine = " ".join(f"{k}={v}" for k, v in server.info["engine"].items())
    print(f"serving {path} on http://{host}:{port} (model {server.info['model_summary']}; engine {engine})",
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped serving {path}", flush=True)


def _build(cfg: DictConfig, path, httpd):
    from llmlab.inference.engine import Engine, SamplingParams
    from llmlab.methods.gpt import GPTLM, _start_ids, _unwrap
    from llmlab.models.gpt import GPT
    from llmlab.serve.server import CompletionServer

    method, meta = load_method(path)
    model = _unwrap(getattr(method, "model", None))
    tok = method.tokenizer
    if not isinstance(method, GPTLM) or not isinstance(model, GPT) or tok is None:
        raise UserError(f"{path} is a {meta.get('method', '?')} checkpoint: llmlab serve serves GPT language models "
                        "(method=gpt, sft, dpo, ppo, distill): pass the checkpoint of one")
    engine_cfg = plain(cfg.engine)
    engine = Engine(model, tok, **engine_cfg)
    defaults = plain(cfg.generation)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    settings = {**engine_cfg, "num_blocks": engine.num_blocks}
    info = {
        "model_summary": f"{meta.get('method', 'gpt')} {c.n_layer}L x {c.n_embd}, vocab {tok.vocab_size}, "
                         f"context {engine.context_length}, {n_params / 1e6:.2f}M params",
        "engine": settings,
    }
    return CompletionServer(
        httpd,
        engine,
        encode=lambda text: tok.encode(text) if text else _start_ids(tok),  # "" starts as `llmlab infer` does
        vocab_size=int(tok.vocab_size),
        model_name=str(cfg.get("served_model_name") or path),
        make_params=lambda d: SamplingParams.from_dict(d, defaults),
        info=info,
    )
