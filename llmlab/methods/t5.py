"""T5 span-corruption pretraining (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer", §3.1.4 "Unsupervised Objective" and §3.3).

Batches come from :class:`llmlab.data.t5_data.T5DataModule`: ``input_ids`` are a corrupted chunk
(each dropped span replaced by a sentinel ``<extra_id_k>``, EOS at the end), ``labels`` the dropped
spans, each after its sentinel, then a final sentinel and EOS::

    inputs:  Thank you <extra_id_0> me to your party <extra_id_1> week. </s>
    labels:  <extra_id_0> for inviting <extra_id_1> last <extra_id_2> </s>

The loss is the cross-entropy of :class:`llmlab.models.t5.T5` on the labels with teacher forcing
(decoder inputs = labels shifted right, starting from ``<pad>``). Validation and test report the
token-weighted mean loss, its exponential ``ppl`` and ``acc``, the share of label tokens (sentinels
and EOS included) whose argmax prediction is right: span reconstruction under teacher forcing.
Sentinels and EOS are easy (their order is fixed), so ``acc_text`` counts the dropped text tokens only.

Inference (``llmlab infer ckpt_path=X text="Thank you <extra_id_0> me to your party <extra_id_1>
week."``) encodes the text once, decodes the target greedily (or by beam search:
``generation.num_beams=4 generation.num_return_sequences=2``) with the decoder's KV cache, prints
it and the text with every sentinel replaced by the span generated for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmlab.data.span_corruption import NUM_SENTINELS, uncorrupt
from llmlab.errors import UserError
from llmlab.methods.base import LLMLabModule, Step
from llmlab.nn.losses import IGNORE_INDEX
from llmlab.utils import plain, write_json

FORMAT_HINT = ('mark each span to fill with a sentinel <extra_id_0>, <extra_id_1> ... in order, e.g. '
               'text="Thank you <extra_id_0> me to your party <extra_id_1> week."')


class T5SpanLM(LLMLabModule):
    """Span-corruption pretraining of :class:`llmlab.models.t5.T5`."""

    name = "t5"

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, **method_keys) -> None:
        super().__init__(models, plain(optim))  # input_length, noise_density ... shape the data; kept in hparams
        self.save_hyperparameters(ignore=["models"], logger=False)

    def attach_tokenizer(self, tokenizer) -> None:
        from llmlab.data.t5_tokenizer import T5Tokenizer

        if not isinstance(tokenizer, T5Tokenizer):
            raise UserError(
                f"T5 needs the T5 vocabulary with <extra_id_*> sentinels, not tokenizer="
                f"{getattr(tokenizer, 'name', None)}: use tokenizer=t5"
            )
        if tokenizer.vocab_size > self.model.config.vocab_size:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={self.model.config.vocab_size}: "
                "set model.vocab_size=null (= the tokenizer's) or at least the tokenizer's size"
            )
        super().attach_tokenizer(tokenizer)

    # ----------------------------------------------------------------- training
    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids, attention_mask, labels=labels)

    def model_step(self, batch: dict) -> Step:
        """Loss over the label tokens, their argmax accuracy, and the accuracy on dropped text only."""
        labels = batch["labels"]
        out = self.model(batch["input_ids"], batch["attention_mask"], labels=labels)
        scored = labels != IGNORE_INDEX
        n = int(scored.sum())
        correct = (out.logits.argmax(-1) == labels) & scored  # (B, T)
        text = self._text_tokens(labels)
        n_text = int(text.sum())
        return Step(out.loss, n, {"acc": correct.sum() / max(n, 1),
                                  "acc_text": ((correct & text).sum() / max(n_text, 1), n_text)})

    def _text_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Label positions holding dropped text (not a sentinel, EOS or padding)."""
        first_sentinel = self.tokenizer.vocab_size - NUM_SENTINELS if self.tokenizer is not None else None
        text = (labels != IGNORE_INDEX) & (labels != self.model.config.eos_token_id)
        return text if first_sentinel is None else text & (labels < first_sentinel)

    # ----------------------------------------------------------------- outputs
    def save_artifacts(self, run_dir: str) -> None:
        self.export(Path(run_dir) / "hf")

    def export(self, out_dir) -> Path:
        """Write the weights as a Hugging Face T5 directory (config.json + model.safetensors),
        loadable by ``T5.from_pretrained`` and ``transformers.T5ForConditionalGeneration``."""
        return self.write_hf_dir(out_dir, self.model.to_hf_state_dict(), self.model.to_hf_config())

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def fill_spans(self, text: str, max_new_tokens: int = 200, use_cache: bool = True, *, num_beams: int = 1,
                   length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                   repetition_penalty: float | None = None,
                   no_repeat_ngram_size: int | None = None) -> dict:
        """Span filling: ``{"input", "target", "filled"}`` texts for a text with sentinels.

        Greedy with ``num_beams=1``; beam search otherwise (Hugging Face's rules, see
        :mod:`llmlab.inference.beam`), where ``target`` / ``filled`` are the best beam's and
        ``beams`` lists the ``num_return_sequences`` best ones (``{"target", "filled"}``, best first).
        """
        tok = self.tokenizer
        if tok is None:
            raise UserError("this T5 has no tokenizer attached: load it with llmlab infer ckpt_path=...")
        ids = tok.encode(str(text))
        sentinels = [i for i in ids if tok.is_sentinel(i)]
        if not sentinels:
            raise UserError(f"text={text!r} has no span to fill: {FORMAT_HINT}")
        ids.append(tok.eos_id)  # training inputs end with EOS
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model.generate(input_ids, torch.ones_like(input_ids), max_new_tokens=int(max_new_tokens),
                                  use_cache=bool(use_cache), eos_token_id=tok.eos_id, greedy=True,
                                  num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                                  num_return_sequences=num_return_sequences, repetition_penalty=repetition_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size)
        beams = []
        for row in out[:, 1:].tolist():  # without the decoder start token
            target = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
            filled = uncorrupt(ids, target + [tok.eos_id], tok.vocab_size, eos_id=tok.eos_id,
                               num_sentinels=NUM_SENTINELS)
            beams.append({"target": tok.decode(target, skip_special_tokens=True),
                          "filled": tok.decode(filled.tolist())})
        result = {"input": tok.decode(ids[:-1]), **beams[0]}
        if num_beams > 1:
            result["beams"] = beams
        return result

    def infer(self, cfg) -> dict:
        """``llmlab infer ckpt_path=X text="... <extra_id_0> ..."``: print the target and the filled text
        (``generation.num_beams`` > 1: beam search, the ``generation.num_return_sequences`` best beams)."""
        text = cfg.get("text") or cfg.get("prompt")
        if not text:
            raise UserError(f"T5 fills spans of a text: {FORMAT_HINT}")
        text = str(text).replace("\\n", "\n")  # a typed \n is a newline (verse lines end with one)
        gen = cfg.get("generation") or {}
        self.eval()
        result = self.fill_spans(
            text, max_new_tokens=int(gen.get("max_new_tokens") or 200), use_cache=bool(gen.get("use_kv_cache", True)),
            num_beams=int(gen.get("num_beams") or 1), length_penalty=float(gen.get("length_penalty", 1.0)),
            early_stopping=gen.get("early_stopping", False),
            num_return_sequences=int(gen.get("num_return_sequences") or 1),
            repetition_penalty=gen.get("repetition_penalty"), no_repeat_ngram_size=gen.get("no_repeat_ngram_size"),
        )
        print(f"input:  {result['input']}")
        beams = result.get("beams", [result])
        for i, beam in enumerate(beams):
            if len(beams) > 1:
                print(f"--- beam {i + 1}/{len(beams)} ---")
            print(f"target: {beam['target']}")
            print(f"filled: {beam['filled']}")
        out = Path(cfg.paths.output_dir) / "t5_fill.json"
        write_json(out, result)
        return result
