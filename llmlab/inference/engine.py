"""Continuous batching on a paged KV cache: the engine behind ``llmlab infer prompts=FILE.jsonl`` and
``llmlab serve``.

Iteration-level scheduling (Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based
Generative Models", OSDI, §3.1-3.2): the batch is re-formed at *every* decoding step. Requests join as
soon as there is room and leave the moment they finish, so a short request never waits for the longest
one of its batch, and nothing is padded to a common output length. Memory comes from a paged KV cache
(Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention",
SOSP, §4.2-4.5; the vLLM scheduler, spec/anchors.md §3.8): blocks are taken as sequences grow, the
``n`` samples of a prompt share its blocks (fork + copy-on-write), and when the pool runs dry a
request is preempted instead of crashing.

One :meth:`Engine.step`:

1. **admit** waiting requests first-come-first-served while ``max_num_seqs`` and the free blocks
   allow, and **prefill** each (one forward over its prompt; a fresh request with ``n > 1`` is
   prefilled once and forked ``n`` times: the samples share the prompt's blocks);
2. **decode**: ONE forward with ``T = 1`` for every running sequence. Rows have different lengths:
   the paged view right-aligns each row's cached keys/values and the attention mask hides the left
   padding (positions count real tokens only), so each row computes exactly what it would alone;
3. per-row **logits processing** with each request's own settings (repetition penalty / no-repeat
   n-gram, then :func:`~llmlab.inference.sampling.warp_logits`); rows with equal settings are warped
   together. Every sample has its own ``torch.Generator`` (seeded ``seed + index``), so what a request
   draws does not depend on which other requests share its batch;
4. **stop checks** (EOS, ``max_new_tokens``, stop strings), incremental detokenisation
   (:mod:`llmlab.inference.detokenize`: a multi-byte character split over two BPE tokens is emitted
   once whole), and finished sequences free their blocks.

**Preemption** (vLLM's ``preemption_mode="recompute"``, Kwon et al. §4.5): when the decode step finds
the pool short (:class:`~llmlab.inference.paged.KVCacheOOM`, raised before anything is written), the
running request that arrived last is preempted: its blocks are freed and it goes back to the *front*
of the waiting queue with its generated tokens appended to its prompt. Re-admitted, it is prefilled
on prompt + generated tokens, whose next-token logits are the ones its decode would have computed, so
it resumes exactly (greedy outputs are unchanged; samplers keep their generator state). The earliest
request is never the victim while others run, so the engine always makes progress.

Sizing: ``num_blocks=None`` gives the pool room for ``max_num_seqs`` full contexts
(``max_num_seqs * ceil(block_size_of_model / block_size)`` blocks: no preemption ever, and the most
memory); a smaller number trades memory for preemptions. A request is refused up front
(:class:`~llmlab.errors.UserError`) if its prompt plus ``max_new_tokens`` exceeds the model's context,
or if its ``n`` full sequences could not fit the whole pool.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import torch

from llmlab.errors import UserError
from llmlab.inference.detokenize import IncrementalDetokenizer
from llmlab.inference.generate import eval_mode
from llmlab.inference.processors import apply_processors, processors_active, validate_processor_args
from llmlab.inference.sampling import validate_sampling_args, warp_logits
from llmlab.inference.stopping import StopStrings

# request keys as the `generation` group names them -> SamplingParams fields
GENERATION_NAMES = {"num_samples": "n", "stop_strings": "stop"}


@dataclass
class SamplingParams:
    """How one request is decoded; the names are the ``generation`` group's (``n`` = ``num_samples``,
    ``stop`` = ``stop_strings``, as in vLLM / OpenAI)."""

    max_new_tokens: int = 16  # tokens to generate (prompt + max_new_tokens must fit the model's block_size)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens (None = all)
    top_p: float | None = None  # nucleus sampling (None = off)
    min_p: float | None = None  # drop tokens below min_p x the top token's probability (None = off)
    greedy: bool = False  # argmax (ignores temperature / top-k / top-p / min-p / seed)
    seed: int | None = None  # sample i of the request draws from torch.Generator().manual_seed(seed + i)
    n: int = 1  # samples of the prompt (they share its KV blocks)
    stop: list[str] = field(default_factory=list)  # stop strings: the text ends before the first one
    stop_at_eos: bool = True  # end a sample at the tokenizer's end-of-text token
    repetition_penalty: float | None = None  # CTRL's penalty on tokens already in the context (None / 1 = off)
    no_repeat_ngram_size: int | None = None  # never repeat an n-gram of this size (None / 0 = off)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Raise :class:`UserError` starting with ``key=value`` for the first bad value."""
        def bad(key: str, must: str) -> UserError:
            return UserError(f"{key}={getattr(self, key)!r} {must}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        validate_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)  # messages start with key=
        if not isinstance(self.greedy, bool):
            raise bad("greedy", "must be true or false")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or null")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1 (samples of the prompt)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        self.stop = list(self.stop)
        if not isinstance(self.stop_at_eos, bool):
            raise bad("stop_at_eos", "must be true or false")
        validate_processor_args(self.repetition_penalty, self.no_repeat_ngram_size)  # messages start with key=

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """Keys a request may set: the field names and the ``generation`` group's names for them."""
        return [f.name for f in fields(cls)] + list(GENERATION_NAMES)

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: dict[str, Any] | None = None) -> SamplingParams:
        """``d`` (a request's settings) over ``defaults`` (e.g. the ``generation`` group, whose other keys
        are ignored). Unknown keys in ``d`` and bad values raise :class:`UserError` naming the key."""
        allowed = cls.allowed_keys()
        unknown = [k for k in d if k not in allowed]
        if unknown:
            raise UserError(f"unknown key {unknown[0]!r}: a request may set {', '.join(allowed)}")
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for source in (defaults or {}, d):
            for key, value in source.items():
                name = GENERATION_NAMES.get(key, key)
                if name in names:
                    values[name] = value
        if values.get("stop") is None:
            values["stop"] = []
        return cls(**values)


@dataclass
class RequestOutput:
    """What one step produced for one sample: the NEW tokens and text since its previous output."""

    request_id: str
    index: int  # sample number, < n
    token_ids: list[int]  # new token ids (an EOS that ended the sample included)
    text: str  # new text (whole characters only; text that may begin a stop string is held back)
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop string) | "length" (max_new_tokens) | None


@dataclass
class Completion:
    """A finished request (``Engine.run``): every sample's text, token ids and finish reason."""

    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[dict]  # per sample: {"text", "token_ids", "finish_reason"}
    arrival_time: float  # time.perf_counter() at add_request
    first_token_time: float | None  # ... when the first token was sampled
    finish_time: float | None  # ... when the last sample finished

    @property
    def ttft(self) -> float | None:
        """Time to first token (seconds), queueing included."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


# ---------------------------------------------------------------------------- per-request state


class _Sample:
    """One sequence of a request: its tokens, generator, text and stop state."""

    def __init__(self, request: _Request, index: int, seq_id: int, device: torch.device, tokenizer) -> None:
        self.request = request
        self.index = index
        self.seq_id = seq_id
        self.tokens: list[int] = []  # generated so far; the last one is not in the KV cache yet
        self.generator: torch.Generator | None = None
        params = request.params
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            self.generator = torch.Generator(device=device).manual_seed(int(seed) + index)
        self.finished = False
        self.finish_reason: str | None = None
        self.text = ""  # decoded generated text (whole characters), cut at a stop string
        self.detokenizer = IncrementalDetokenizer(tokenizer)  # fed every token but an EOS that ends the sample
        self.stop = StopStrings(params.stop) if params.stop else None
        self._sent_tokens = 0  # tokens already handed out in a RequestOutput
        self._sent_chars = 0  # characters of self.text already handed out

    @property
    def context(self) -> list[int]:
        return self.request.prompt_ids + self.tokens


class _Request:
    def __init__(self, request_id: str, prompt: str | list[int], prompt_ids: list[int], params: SamplingParams,
                 on_output: Callable[[RequestOutput], None] | None, arrival: int, collect: bool) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_output = on_output
        self.arrival = arrival  # FCFS order; the latest arrival is preempted first
        self.collect = collect  # keep the Completion for run()
        self.samples: list[_Sample] = []  # filled when first admitted
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def running(self) -> list[_Sample]:
        return [s for s in self.samples if not s.finished]

    def completion(self) -> Completion:
        return Completion(self.request_id, self.prompt, self.prompt_ids,
                          [{"text": s.text, "token_ids": list(s.tokens), "finish_reason": s.finish_reason}
                           for s in self.samples],
                          self.arrival_time, self.first_token_time, self.finish_time)


# ---------------------------------------------------------------------------- the engine


class Engine:
    """Continuous batching of a causal LM (:class:`~llmlab.models.gpt.GPT`'s interface) on a
    :class:`~llmlab.inference.paged.PagedKVCache`; see the module docstring.

    Thread-safety: :meth:`add_request` and :meth:`abort_request` may be called from any thread while
    another runs :meth:`serve_forever` (or :meth:`step`); ``on_output`` callbacks run on the stepping
    thread, outside the engine's lock.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 32,
        enable_prefix_caching: bool = True,
        preemption_mode: str = "recompute",
    ) -> None:
        from llmlab.inference.paged import PagedKVCache

        model = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module
        if int(getattr(model, "num_virtual_tokens", 0) or 0):
            raise UserError("the continuous-batching engine does not run models with a soft prompt or prefix "
                            "(prompt/prefix tuning): merge or drop the tuner, or use llmlab infer prompt=...")
        if preemption_mode != "recompute":
            raise UserError(f"preemption_mode={preemption_mode!r} is not supported: use recompute")
        for key, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs)):
            if not _is_int(value) or value < 1:
                raise UserError(f"{key}={value!r} must be an integer >= 1")
        config = model.config
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(config.block_size)  # the model's context (block_size = positions)
        self.block_size = block_size  # tokens per KV block
        self.max_num_seqs = max_num_seqs
        if num_blocks is None:  # every running sequence can reach the full context: never preempts
            num_blocks = max_num_seqs * math.ceil(self.context_length / block_size)
        if not _is_int(num_blocks) or num_blocks < 1:
            raise UserError(f"num_blocks={num_blocks!r} must be an integer >= 1 (or null = room for max_num_seqs "
                            "full contexts)")
        ref = next(model.parameters())
        self.device = ref.device
        self.cache = PagedKVCache(config.n_layer, config.n_head, config.n_embd // config.n_head, num_blocks,
                                  block_size, device=ref.device, dtype=ref.dtype,
                                  enable_prefix_caching=enable_prefix_caching)
        self.num_blocks = num_blocks
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._cond = threading.Condition(threading.RLock())
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # admitted, in admission order
        self._requests: dict[str, _Request] = {}  # every unfinished request by id
        self._finished: dict[str, Completion] = {}  # collected completions (run())
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._stats = {"steps": 0, "generated_tokens": 0, "prefill_tokens": 0, "preemptions": 0,
                       "prefix_cache_hit_tokens": 0, "finished_requests": 0}

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        *,
        collect: bool = False,
    ) -> str:
        """Queue a request (thread-safe); returns its id. Raises :class:`UserError` for an empty prompt,
        a prompt that does not fit the context with ``max_new_tokens``, or ``n`` sequences that could
        not fit the whole block pool. ``collect``: keep its :class:`Completion` for :meth:`take_completions`."""
        if not isinstance(params, SamplingParams):
            raise UserError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise UserError("the prompt is empty (no tokens): pass some text")
        total = len(ids) + params.max_new_tokens
        if total > self.context_length:
            raise UserError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                            f"model's context of {self.context_length} tokens: shorten the prompt or lower "
                            "max_new_tokens")
        if params.n > self.max_num_seqs:
            raise UserError(f"n={params.n} samples exceed max_num_seqs={self.max_num_seqs}: lower n or raise "
                            "max_num_seqs")
        need = params.n * math.ceil(total / self.block_size)
        if need > self.num_blocks:
            raise UserError(f"n={params.n} sequence(s) of up to {total} tokens need {need} KV blocks of "
                            f"{self.block_size} tokens but the pool has num_blocks={self.num_blocks}: raise "
                            "num_blocks or lower max_new_tokens / n")
        with self._cond:
            if request_id is None:
                request_id = f"req-{next(self._arrivals)}"
                while request_id in self._requests:
                    request_id = f"req-{next(self._arrivals)}"
            elif request_id in self._requests:
                raise UserError(f"request_id {request_id!r} is already queued or running: use a unique id")
            request = _Request(str(request_id), prompt, ids, params, on_output, next(self._arrivals), collect)
            self._requests[request.request_id] = request
            self._waiting.append(request)
            self._cond.notify_all()
        return request.request_id

    def abort_request(self, request_id: str) -> bool:
        """Drop a queued or running request (e.g. its client went away); False if unknown/finished."""
        with self._cond:
            request = self._requests.pop(request_id, None)
            if request is None:
                return False
            if request in self._waiting:
                self._waiting.remove(request)
            if request in self._running:
                self._running.remove(request)
                for s in request.running():
                    self.cache.free(s.seq_id)
            return True

    def has_unfinished(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._running)

    @property
    def stats(self) -> dict:
        """steps, generated_tokens, prefill_tokens, peak_blocks_in_use, preemptions,
        prefix_cache_hit_tokens (prompt tokens whose K/V came from the prefix cache), finished_requests,
        plus num_blocks, block_size, blocks_in_use, running and waiting now."""
        with self._cond:
            return {**self._stats, "num_blocks": self.num_blocks, "block_size": self.block_size,
                    "peak_blocks_in_use": self.cache.peak_blocks_in_use, "blocks_in_use": self.cache.blocks_in_use,
                    "running": self._num_running(), "waiting": len(self._waiting)}

    # ------------------------------------------------------------------ loops
    def run(self, prompts: Iterable[str | list[int]], params: SamplingParams | Iterable[SamplingParams]
            ) -> list[Completion]:
        """Offline: run every prompt to completion (one ``params`` for all, or one per prompt);
        completions in the order of ``prompts``."""
        prompts = list(prompts)
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(plist)} SamplingParams: pass one, or one per prompt")
        ids = [self.add_request(p, sp, collect=True) for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return self.take_completions(ids)

    def take_completions(self, request_ids: Iterable[str]) -> list[Completion]:
        """The finished requests added with ``collect=True`` (each handed out once)."""
        with self._cond:
            return [self._finished.pop(i) for i in request_ids]

    def serve_forever(self, stop_event: threading.Event, idle_wait: float = 0.05) -> None:
        """Step while there is work, sleep on a condition otherwise (add_request wakes it) until
        ``stop_event`` is set. For a server's background thread."""
        while not stop_event.is_set():
            with self._cond:
                if not (self._waiting or self._running):
                    self._cond.wait(timeout=idle_wait)
                    continue
            self.step()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One scheduling step (module docstring): admit + prefill, one batched decode, stop checks."""
        with self._cond:
            self._step_finished: list[_Request] = []  # requests that finish in this step
            # eval mode (dropout off) for the step; a model already in eval mode skips the module walk
            with eval_mode(self.model) if self.model.training else contextlib.nullcontext():
                self._admit()
                self._decode()
            outputs, callbacks = self._collect_outputs()
            self._stats["steps"] += 1
        for callback, out in callbacks:  # outside the lock: a callback may add requests
            callback(out)
        return outputs

    def _admit(self) -> None:
        """Move waiting requests (FCFS) to running while seats and blocks allow, then prefill them."""
        from llmlab.inference.paged import KVCacheOOM

        seats = self.max_num_seqs - self._num_running()
        # blocks left once the running sequences have taken what their next decode needs
        free = self.cache.num_free_blocks - self.cache.blocks_needed([s.seq_id for s in self._running_samples()])
        admitted: list[tuple[_Request, list[_Sample], list[list[int]]]] = []
        while self._waiting:
            request = self._waiting[0]
            fresh = not request.samples
            n = request.params.n if fresh else len(request.running())
            if n > seats:
                break
            contexts = [request.prompt_ids] if fresh else [s.context for s in request.running()]
            # the prompt blocks (no prefix-cache hit assumed) + one block per sample for its first decode
            need = sum(math.ceil(len(c) / self.block_size) for c in contexts) + n
            if need > free and (self._running or admitted):
                break  # wait for running requests to free blocks (alone, it may still fit: add_request checked)
            samples = ([_Sample(request, i, next(self._seq_ids), self.device, self.tokenizer) for i in range(n)]
                       if fresh else request.running())
            added = []
            try:
                for sample, context in zip(samples, contexts):
                    self.cache.add_sequence(sample.seq_id, context)
                    added.append(sample.seq_id)
            except KVCacheOOM:
                for seq_id in added:
                    self.cache.free(seq_id)
                if not (self._running or admitted):
                    raise RuntimeError("the block pool cannot hold one request although add_request checked it")
                break
            self._waiting.popleft()
            seats -= n
            free -= need
            admitted.append((request, samples, contexts))
        if admitted:
            self._prefill(admitted)

    def _prefill(self, admitted: list[tuple[_Request, list[_Sample], list[list[int]]]]) -> None:
        """ONE forward over the uncached part of every admitted context (ragged: left-padded, the pads
        not stored), then fork fresh requests' samples and sample each sample's next token."""
        rows = [(sample, context) for _, samples, contexts in admitted for sample, context in zip(samples, contexts)]
        seq_ids = [sample.seq_id for sample, _ in rows]
        new = [len(c) - self.cache.length(sample.seq_id) for sample, c in rows]  # prefix-cache hits are skipped
        T = max(new)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for i, ((_, context), t) in enumerate(zip(rows, new)):
            x[i, T - t :] = torch.tensor(context[len(context) - t :])
        view = self.cache.view(seq_ids, new)
        logits = self.model(x.to(self.device), kv_cache=view, last_only=True,
                            attention_mask=view.attention_mask(T) if len(rows) > 1 else None)[:, -1]  # (rows, V)
        self._stats["prefill_tokens"] += sum(new)
        self._stats["prefix_cache_hit_tokens"] += sum(len(c) for _, c in rows) - sum(new)
        samples, index, row = [], [], 0  # row: the request's first row of logits
        for request, request_samples, contexts in admitted:
            if not request.samples:  # fresh: the n samples share the prompt's blocks (copy-on-write)
                for sample in request_samples[1:]:
                    self.cache.fork(request_samples[0].seq_id, sample.seq_id)
                request.samples = request_samples
                index += [row] * len(request_samples)
            else:  # resumed after a preemption: one row per sample
                index += list(range(row, row + len(request_samples)))
            row += len(contexts)
            samples += request_samples
            self._running.append(request)
        self._sample(samples, logits[torch.tensor(index, device=logits.device)])

    def _decode(self) -> None:
        """One forward (T = 1) for every running sample; preempt the latest arrival on OOM."""
        from llmlab.inference.paged import KVCacheOOM

        while True:
            samples = self._running_samples()
            if not samples:
                return
            view = self.cache.view([s.seq_id for s in samples])
            x = torch.tensor([[s.tokens[-1]] for s in samples], dtype=torch.long, device=self.device)  # (B, 1)
            try:
                logits = self.model(x, kv_cache=view, last_only=True, attention_mask=view.attention_mask(1))[:, -1]
            except KVCacheOOM:
                self._preempt()
                continue
            self._sample(samples, logits)
            return

    def _preempt(self) -> None:
        """Recompute preemption of the running request that arrived last (module docstring)."""
        if len(self._running) < 2:
            raise RuntimeError("the block pool cannot hold one request although add_request checked it")
        victim = max(self._running, key=lambda r: r.arrival)
        self._running.remove(victim)
        for s in victim.running():
            self.cache.free(s.seq_id)
            s.seq_id = next(self._seq_ids)  # a fresh sequence when it is re-admitted
        self._waiting.appendleft(victim)
        self._stats["preemptions"] += 1

    # ------------------------------------------------------------------ sampling and stopping
    def _sample(self, samples: list[_Sample], logits: torch.Tensor) -> None:
        """Pick each row's next token with its request's settings, then check stops."""
        tokens = next_tokens(logits, [s.request.params for s in samples], [s.generator for s in samples],
                             [s.context for s in samples])
        now = time.perf_counter()
        for sample, token in zip(samples, tokens):
            request = sample.request
            if request.first_token_time is None:
                request.first_token_time = now
            sample.tokens.append(token)
            self._stats["generated_tokens"] += 1
            self._check_stop(sample, token)
            if sample.finished:
                self.cache.free(sample.seq_id)
        for request in {s.request: None for s in samples}:
            if not request.running() and request in self._running:
                request.finish_time = now
                self._running.remove(request)
                self._requests.pop(request.request_id, None)
                self._stats["finished_requests"] += 1
                self._step_finished.append(request)
                if request.collect:
                    self._finished[request.request_id] = request.completion()

    def _check_stop(self, sample: _Sample, token: int) -> None:
        params = sample.request.params
        eos = params.stop_at_eos and self.eos_id is not None and token == self.eos_id
        searched = len(sample.text)  # text before this step was searched already
        if not eos:
            sample.text += sample.detokenizer.feed([token])
        if sample.stop is not None:
            cut = sample.stop.check(sample.text, searched)
            if cut is not None:
                sample.text = sample.text[:cut]
                sample.finished, sample.finish_reason = True, "stop"
                return
        if eos:
            sample.finished, sample.finish_reason = True, "stop"
        elif len(sample.tokens) >= params.max_new_tokens:
            sample.finished, sample.finish_reason = True, "length"
        if sample.finished:  # a held-back partial character
            sample.text += sample.detokenizer.flush()

    def _collect_outputs(self) -> tuple[list[RequestOutput], list[tuple[Callable, RequestOutput]]]:
        outputs, callbacks = [], []
        for request in itertools.chain(self._running, self._step_finished):
            for s in request.samples:
                if s._sent_tokens == len(s.tokens) and not (s.finished and s._sent_chars < len(s.text)):
                    continue
                hold = 0 if s.finished else max((len(t) - 1 for t in request.params.stop), default=0)
                upto = max(s._sent_chars, len(s.text) - hold)
                out = RequestOutput(request.request_id, s.index, s.tokens[s._sent_tokens:], s.text[s._sent_chars:upto],
                                    s.finished, s.finish_reason)
                s._sent_tokens, s._sent_chars = len(s.tokens), upto
                outputs.append(out)
                if request.on_output is not None:
                    callbacks.append((request.on_output, out))
        return outputs, callbacks

    # ------------------------------------------------------------------ helpers
    def _running_samples(self) -> list[_Sample]:
        return [s for r in self._running for s in r.running()]

    def _num_running(self) -> int:
        return len(self._running_samples())


# ---------------------------------------------------------------------------- per-row decoding


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                contexts: list[list[int]]) -> list[int]:
    """Next token of each row of ``logits`` (B, V) with that row's own settings.

    Context-dependent processors (repetition penalty, no-repeat n-gram) run per row that asks for
    them; then rows with the same (temperature, top_k, top_p, min_p) are warped together and greedy
    rows take one argmax. Each sampled row draws from its own generator, so a row's token does not
    depend on the other rows.
    """
    out = logits.argmax(dim=-1)  # (B,): right for greedy rows, overwritten for sampled ones
    need_proc = [i for i, p in enumerate(params) if processors_active(p.repetition_penalty, p.no_repeat_ngram_size)]
    if need_proc:
        logits = logits.float().clone()
        for i in need_proc:  # ragged contexts: row by row (only the rows that ask for it)
            p = params[i]
            ctx = torch.tensor([contexts[i]], dtype=torch.long, device=logits.device)
            logits[i : i + 1] = apply_processors(logits[i : i + 1], ctx, repetition_penalty=p.repetition_penalty,
                                                 no_repeat_ngram_size=p.no_repeat_ngram_size)
            if p.is_greedy:
                out[i] = logits[i].argmax()
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if not p.is_greedy:
            groups.setdefault((float(p.temperature), p.top_k, p.top_p, p.min_p), []).append(i)
    for (temperature, top_k, top_p, min_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        probs = torch.softmax(warp_logits(logits.index_select(0, index), temperature=temperature, top_k=top_k,
                                          top_p=top_p, min_p=min_p), dim=-1)  # (rows, V)
        for j, i in enumerate(rows):  # one draw per row from its own generator (as generate() does for 1 row)
            out[i] = torch.multinomial(probs[j : j + 1], 1, generator=generators[i]).squeeze()
    return out.tolist()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
