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
week."``) encodes the text once, decodes the target greedily with the decoder's KV cache, prints
it and the text with every sentinel replaced by the span generated for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.aggregation import MeanMetric

from llmlab.data.span_corruption import NUM_SENTINELS, uncorrupt
from llmlab.errors import UserError
from llmlab.methods.base import LLMLabModule, _plain, model_config
from llmlab.models.t5 import T5, T5Config
from llmlab.nn.losses import IGNORE_INDEX
from llmlab.utils import atomic_write_bytes, write_json

SPLITS = ("val", "test")
FORMAT_HINT = ('mark each span to fill with a sentinel <extra_id_0>, <extra_id_1> ... in order, e.g. '
               'text="Thank you <extra_id_0> me to your party <extra_id_1> week."')


class T5SpanLM(LLMLabModule):
    """Span-corruption pretraining of :class:`llmlab.models.t5.T5`."""

    def __init__(
        self,
        model: dict,
        optim: dict | None = None,
        vocab_size: int | None = None,
        name: str = "t5",
        input_length: int = 128,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
    ) -> None:
        model, optim = _plain(model), _plain(optim)  # plain dicts in hparams: checkpoints load anywhere
        super().__init__(optim)
        self.save_hyperparameters(logger=False)
        self.model = T5(model_config(T5Config, model, vocab_size, presets="t5_tiny|t5_small|t5_seed"))
        self.metrics = torch.nn.ModuleDict(
            {f"{s}_{m}": MeanMetric() for s in SPLITS for m in ("loss", "acc", "acc_text")}
        )  # token-weighted means: every label token counts once

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

    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """(mean loss, token accuracy, number of label tokens, correct-prediction mask (B, T))."""
        labels = batch["labels"]
        out = self.model(batch["input_ids"], batch["attention_mask"], labels=labels)
        scored = labels != IGNORE_INDEX
        n = int(scored.sum())
        correct = (out.logits.argmax(-1) == labels) & scored  # (B, T)
        return out.loss, correct.sum() / max(n, 1), n, correct

    def _text_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Label positions holding dropped text (not a sentinel, EOS or padding)."""
        first_sentinel = self.tokenizer.vocab_size - NUM_SENTINELS if self.tokenizer is not None else None
        text = (labels != IGNORE_INDEX) & (labels != self.model.config.eos_token_id)
        return text if first_sentinel is None else text & (labels < first_sentinel)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, acc, n, _ = self.model_step(batch)
        self.count_tokens(n)  # label tokens: the predicted ones
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._update("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._update("test", batch)

    def _update(self, split: str, batch: dict) -> None:
        loss, acc, n, correct = self.model_step(batch)
        if n:
            self.metrics[f"{split}_loss"].update(loss, n)
            self.metrics[f"{split}_acc"].update(acc, n)
        text = self._text_tokens(batch["labels"])
        n_text = int(text.sum())
        if n_text:
            self.metrics[f"{split}_acc_text"].update((correct & text).sum() / n_text, n_text)

    def epoch_metrics(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = self.pop_metrics(split)
        return values.pop("loss"), values  # acc, acc_text

    # ----------------------------------------------------------------- outputs
    def save_artifacts(self, run_dir: str) -> None:
        self.export(Path(run_dir) / "hf")

    def export(self, out_dir) -> Path:
        """Write the weights as a Hugging Face T5 directory (config.json + model.safetensors),
        loadable by ``T5.from_pretrained`` and ``transformers.T5ForConditionalGeneration``."""
        from safetensors.torch import save

        out = Path(out_dir)
        state = {k: v.detach().clone().contiguous() for k, v in self.model.to_hf_state_dict().items()}
        atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
        write_json(out / "config.json", self.model.to_hf_config())
        return out

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def fill_spans(self, text: str, max_new_tokens: int = 200, use_cache: bool = True) -> dict[str, str]:
        """Greedy span filling: ``{"input", "target", "filled"}`` texts for a text with sentinels."""
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
                                  use_cache=bool(use_cache), eos_token_id=tok.eos_id, greedy=True)
        target = out[0, 1:].tolist()  # without the decoder start token
        if tok.eos_id in target:
            target = target[: target.index(tok.eos_id)]
        filled = uncorrupt(ids, target + [tok.eos_id], tok.vocab_size, eos_id=tok.eos_id, num_sentinels=NUM_SENTINELS)
        return {
            "input": tok.decode(ids[:-1]),
            "target": tok.decode(target, skip_special_tokens=True),
            "filled": tok.decode(filled.tolist()),
        }

    def infer(self, cfg) -> dict[str, str]:
        """``llmlab infer ckpt_path=X text="... <extra_id_0> ..."``: print the target and the filled text."""
        text = cfg.get("text") or cfg.get("prompt")
        if not text:
            raise UserError(f"T5 fills spans of a text: {FORMAT_HINT}")
        text = str(text).replace("\\n", "\n")  # a typed \n is a newline (verse lines end with one)
        gen = cfg.get("generation") or {}
        self.eval()
        result = self.fill_spans(text, max_new_tokens=int(gen.get("max_new_tokens") or 200),
                                 use_cache=bool(gen.get("use_kv_cache", True)))
        print(f"input:  {result['input']}")
        print(f"target: {result['target']}")
        print(f"filled: {result['filled']}")
        out = Path(cfg.paths.output_dir) / "t5_fill.json"
        write_json(out, result)
        return result
