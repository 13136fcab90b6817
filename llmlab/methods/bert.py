"""BERT pre-training: masked language modelling + next-sentence prediction (Devlin et al. 2019).

The objective is MLM cross-entropy (over the masked positions) + NSP cross-entropy, as in the
paper. Validation and test report the MLM loss weighted by masked tokens as ``val/loss`` (so
``val/ppl`` is the MLM perplexity), masked-token accuracy ``val/mlm_acc``, and the NSP loss and
accuracy ``val/nsp_loss`` / ``val/nsp_acc``, on pairs and masks drawn once per split.

``llmlab infer ckpt_path=X text="To be or not to [MASK]"`` prints the top fills of every
``[MASK]`` with their probabilities.
"""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric

from llmlab.errors import UserError
from llmlab.methods.base import LLMLabModule, _plain, model_config
from llmlab.models.bert import Bert, BertConfig
from llmlab.nn.losses import IGNORE_INDEX

SPLITS = ("val", "test")
METRICS = ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc")


class BertPretraining(LLMLabModule):
    loss_is_token_nll = False  # train/loss = MLM + NSP; the MLM perplexity is logged as val/ppl itself

    def __init__(self, model: dict, optim: dict | None = None, vocab_size: int | None = None,
                 name: str = "bert") -> None:
        model, optim = _plain(model), _plain(optim)
        super().__init__(optim)
        self.save_hyperparameters(logger=False)
        self.model = Bert(model_config(BertConfig, model, vocab_size, presets="bert_tiny|bert_base|bert_seed"))
        self.metrics = torch.nn.ModuleDict({f"{s}_{m}": MeanMetric() for s in SPLITS for m in METRICS})

    def attach_tokenizer(self, tokenizer) -> None:
        if getattr(tokenizer, "name", None) != "wordpiece":
            raise UserError(f"BERT reads WordPiece ids, not tokenizer={getattr(tokenizer, 'name', None)}: use tokenizer=wordpiece")
        super().attach_tokenizer(tokenizer)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        length = getattr(dm, "max_seq_len", 0)
        if length > self.model.config.max_position_embeddings:
            raise UserError(f"method.datamodule.max_seq_len={length} exceeds model.max_position_embeddings="
                            f"{self.model.config.max_position_embeddings}: shorten the pairs or use a larger preset")

    def model_step(self, batch: dict):
        return self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                          labels=batch["labels"], next_sentence_label=batch["next_sentence_label"], masked_only=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model_step(batch)
        self.count_tokens(int(batch["attention_mask"].sum()))
        self.log("train/loss", out.loss.detach(), prog_bar=True)
        self.log_dict({"train/mlm_loss": out.mlm_loss.detach(), "train/nsp_loss": out.nsp_loss.detach()})
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._update("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._update("test", batch)

    def _update(self, split: str, batch: dict) -> None:
        out = self.model_step(batch)
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        nsp = batch["next_sentence_label"]
        m = self.metrics
        m[f"{split}_mlm_loss"].update(out.mlm_loss, len(targets))
        m[f"{split}_mlm_acc"].update((out.prediction_logits.argmax(-1) == targets).float().mean(), len(targets))
        m[f"{split}_nsp_loss"].update(out.nsp_loss, len(nsp))
        m[f"{split}_nsp_acc"].update((out.seq_relationship_logits.argmax(-1) == nsp).float().mean(), len(nsp))

    def epoch_metrics(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = self.pop_metrics(split)
        return values.pop("mlm_loss"), values  # {split}/loss is the MLM loss: {split}/ppl = MLM perplexity

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def fill_mask(self, text: str, topn: int = 5) -> list[list[tuple[str, float]]]:
        """Top ``topn`` (token, probability) for every ``[MASK]`` of ``text``."""
        tok = self.tokenizer
        ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
        if tok.mask_id not in ids:
            raise UserError(f'text={text!r} has no [MASK]: e.g. text="To be or not to [MASK]"')
        limit = self.model.config.max_position_embeddings
        if len(ids) > limit:
            raise UserError(f"text is {len(ids)} tokens with [CLS]/[SEP]; the model reads at most {limit}")
        self.eval()
        x = torch.tensor([ids], device=self.device)
        out = self.model(x, torch.ones_like(x))
        probs = out.prediction_logits[0].softmax(-1)
        fills = []
        for pos in [i for i, t in enumerate(ids) if t == tok.mask_id]:
            p, idx = probs[pos].topk(topn)
            fills.append([(tok.decode([i]), float(v)) for v, i in zip(p.tolist(), idx.tolist())])
        return fills

    def infer(self, cfg) -> list:
        text = cfg.get("text") or cfg.get("prompt")
        if not text:
            raise UserError('BERT fills [MASK]s: llmlab infer ckpt_path=X text="To be or not to [MASK]"')
        fills = self.fill_mask(str(text), int(cfg.get("topn") or 5))
        print(text)
        for k, options in enumerate(fills):
            print(f"[MASK] #{k + 1}: " + "  ".join(f"{w} ({p:.3f})" for w, p in options))
        return fills
