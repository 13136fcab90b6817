"""`llmlab serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

:mod:`llmlab.serve.protocol` turns request bodies into engine requests and engine outputs into
response bodies (pure functions, no sockets); :mod:`llmlab.serve.server` is the HTTP layer
(``http.server.ThreadingHTTPServer``, one thread per client) and the engine's loop in a background
thread, so concurrent clients are decoded in the same batch.
"""
