"""GPT: causal language modelling (Radford et al. 2018, "Improving Language Understanding by
Generative Pre-Training"; 2019, "Language Models are Unsupervised Multitask Learners").

Objective: maximise sum_t log P(x_t | x_<t), i.e. cross-entropy of the next token. Batches are
``(x, y)`` windows with ``y`` pre-shifted by one (``y[t] = x[t+1]``, -100 = ignore). Validation and
test report the token-weighted mean loss and its exponential, the perplexity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.inference.beam import beam_search, validate_beam_args
from llmlab.inference.generate import run_options
from llmlab.inference.stopping import StopStrings
from llmlab.methods.base import LLMLabModule, Step
from llmlab.scaling.flops import gpt_flops_per_token, gpt_param_counts
from llmlab.utils import plain


class GPTLM(LLMLabModule):
    """Next-token prediction with :class:`llmlab.models.gpt.GPT` (received as ``models["model"]``)."""

    name = "gpt"

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, **method_keys) -> None:
        super().__init__(models, plain(optim))  # model.compile=true: the builder hands over a compiled GPT
        self.save_hyperparameters(ignore=["models"], logger=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
        x, y = batch
        _, loss = self.model(x, y)
        return Step(loss, int((y != -100).sum()))

    # ----------------------------------------------------------------- FLOPs (Kaplan et al. 2020, Table 1)
    def batch_flops(self, batch) -> float:
        """``B·T·(6N + 6·n_layer·T·d_model)`` for a batch of token windows (x, y) or {"input_ids": ...}:
        every position is computed, also those whose target is ignored."""
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not self.model_config:
            return 0.0
        return ids.numel() * gpt_flops_per_token(self.model_config, n_ctx=ids.size(1))

    def cost_report(self) -> dict[str, float]:
        if not self.model_config:
            return {}
        counts = gpt_param_counts(self.model_config)
        return {"model/params_non_embedding": float(counts["params_non_embedding"]),
                "model/flops_per_token": gpt_flops_per_token(self.model_config)}

    def save_artifacts(self, run_dir: str) -> None:
        self.export(Path(run_dir) / "hf")

    def export(self, out_dir) -> Path | None:
        """Write the weights as a Hugging Face GPT-2 directory (config.json + model.safetensors).

        Loadable by ``GPT.from_pretrained`` / ``model.init_from`` and by
        ``transformers.GPT2LMHeadModel.from_pretrained``. Returns None for bias-free models,
        which GPT-2's format cannot describe.
        """
        gpt = _unwrap(self.model)
        if not gpt.config.bias:
            return None
        state = gpt.to_hf_state_dict()
        if gpt.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # tied: stored once, as transformer.wte.weight
        return self.write_hf_dir(out_dir, state, gpt.to_hf_config())

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def sample(
        self,
        prompt: str = "",
        *,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        greedy: bool = False,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        stop_strings: list[str] | str | None = None,
        num_samples: int = 1,
        seed: int | None = None,
        use_kv_cache: bool = True,
        stop_at_eos: bool = True,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        draft: str | None = None,
        gamma: int = 4,
    ) -> list[str]:
        """Continue ``prompt`` ``num_samples`` times; returns the generated text (prompt excluded).

        ``stop_strings``: a sample ends once its text contains one; the text is cut before it (OpenAI's
        ``stop``). ``repetition_penalty`` / ``no_repeat_ngram_size``: see :mod:`llmlab.inference.processors`.

        ``draft``: the checkpoint or run dir of a smaller GPT with the same tokenizer, which proposes
        ``gamma`` tokens per target forward (speculative decoding, the same distribution; counters
        in ``self.speculative_stats``).

        ``num_beams > 1``: beam search instead (Hugging Face's rules, see
        :func:`llmlab.inference.beam.beam_search`); returns the ``num_return_sequences`` best beams,
        best first, and ignores the sampling options and ``num_samples``.
        """
        tok = self.tokenizer
        if tok is None:
            raise UserError("this GPT has no tokenizer attached: load it with llmlab infer ckpt_path=...")
        ids = tok.encode(prompt) if prompt else _start_ids(tok)
        if not ids:
            raise UserError(f"prompt {prompt!r} encodes to no tokens: pass some text")
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        if num_beams != 1 or num_return_sequences != 1:
            validate_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
            if stop_strings:
                raise UserError(f"stop_strings={list(stop_strings)!r} work with sampling/greedy decoding: drop them or "
                                f"use num_beams=1 (got num_beams={num_beams})")
            out = beam_search(_unwrap(self.model), idx, max_new_tokens, num_beams, length_penalty, early_stopping,
                              num_return_sequences, eos_id=tok.eos_id if stop_at_eos else None,
                              use_kv_cache=use_kv_cache, repetition_penalty=repetition_penalty,
                              no_repeat_ngram_size=no_repeat_ngram_size)
            return self._texts(out, len(ids), stop_at_eos)
        stop = StopStrings(stop_strings)
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy,
                       repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                       use_kv_cache=use_kv_cache)
        if draft is not None:  # (stop strings cut the text afterwards: the draft loop does not stop on them)
            _, _, generator, stop_at_eos = run_options(idx, num_samples=num_samples, seed=seed, stop_at_eos=stop_at_eos)
            return [stop.cut(t) for t in self._sample_with_draft(
                ids, max_new_tokens, draft, gamma, num_samples, stop_at_eos, generator=generator,
                eos_id=tok.eos_id if stop_at_eos else None, **options)]
        # GPT.generate turns num_samples / seed / stop_at_eos into generate() arguments (run_options)
        out = _unwrap(self.model).generate(idx, max_new_tokens, num_samples=num_samples, seed=seed,
                                           stop_at_eos=stop_at_eos, eos_id=tok.eos_id, stop_strings=stop.stop,
                                           tokenizer=tok, **options)
        return [stop.cut(t) for t in self._texts(out, len(ids), stop_at_eos)]

    def _sample_with_draft(self, ids: list[int], max_new_tokens: int, draft: str, gamma: int, num_samples: int,
                           stop_at_eos: bool, **options) -> list[str]:
        """Speculative decoding (batch 1): the samples one after the other; the draft is loaded once per path."""
        from llmlab.inference.speculative import generate_with_draft, load_draft

        if getattr(self, "_draft", (None, None))[0] != str(draft):
            self._draft = (str(draft), load_draft(draft, self.tokenizer).to(self.device))
        texts, self.speculative_stats = [], None
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        for _ in range(num_samples):
            out, stats = generate_with_draft(_unwrap(self.model), self._draft[1], idx, max_new_tokens, gamma=gamma,
                                             **options)
            texts += self._texts(out, len(ids), stop_at_eos)
            self.speculative_stats = stats if self.speculative_stats is None else self.speculative_stats + stats
        return texts

    def _texts(self, out: torch.Tensor, prompt_len: int, stop_at_eos: bool) -> list[str]:
        """Decode each row's generated tokens, cut at the first <|endoftext|> when ``stop_at_eos``."""
        tok = self.tokenizer
        texts = []
        for row in out[:, prompt_len:].tolist():
            if stop_at_eos and tok.eos_id is not None and tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            texts.append(tok.decode(row))
        return texts

    def sample_text(self, prompt: str, generation: dict) -> str:
        return self.sample(prompt, **{**generation, "num_samples": 1})[0]

    def infer(self, cfg) -> list[str]:
        """``llmlab infer ckpt_path=X prompt="..."``: sample continuations and print them.
        ``prompts=FILE.jsonl`` (without ``reward=``): every request of the file through the continuous-batching
        engine, completions written as JSONL (:mod:`llmlab.inference.batch`)."""
        if cfg.get("prompts") and cfg.get("reward") is None:
            from llmlab.inference.batch import infer_batch

            return infer_batch(self, cfg)
        generation = dict(cfg.generation)
        # a typed \n is a newline (the shell and Hydra pass it as backslash + n)
        generation["stop_strings"] = [str(s).replace("\\n", "\n") for s in generation.get("stop_strings") or []]
        texts = self.sample(str(cfg.get("prompt") or ""), **generation)
        what = "beam" if int(generation.get("num_beams") or 1) > 1 else "sample"
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- {what} {i + 1}/{len(texts)} ---")
            print(f"{cfg.get('prompt') or ''}{text}")
        if generation.get("draft") is not None and getattr(self, "speculative_stats", None) is not None:
            print(f"--- {self.speculative_stats.summary()}")
        return texts


def _start_ids(tok) -> list[int]:
    """What an empty prompt starts from: <|endoftext|> (as GPT-2 does), else a newline."""
    if tok.eos_id is not None:
        return [tok.eos_id]
    try:
        ids = tok.encode("\n")
    except UserError:  # a char vocabulary without newlines
        ids = []
    ids = [i for i in ids if i != getattr(tok, "unk_id", None)]  # a vocabulary without a newline
    return ids or [0]  # word-level vocabularies have no newline: start from id 0 (the most frequent word)


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the GPT itself
