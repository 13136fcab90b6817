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
from torch import nn

from llmlab.errors import UserError
from llmlab.methods.base import LLMLabModule, Step
from llmlab.nn.losses import IGNORE_INDEX
from llmlab.utils import plain


class BertPretraining(LLMLabModule):
    name = "bert"
    loss_is_token_nll = False  # train/loss = MLM + NSP; the MLM perplexity is logged as val/ppl
    eval_loss = "mlm_loss"  # {split}/loss is the MLM loss: {split}/ppl = MLM perplexity

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, **method_keys) -> None:
        super().__init__(models, plain(optim))
        self.save_hyperparameters(ignore=["models"], logger=False)

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

    def model_step(self, batch: dict) -> Step:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         labels=batch["labels"], next_sentence_label=batch["next_sentence_label"], masked_only=True)
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        nsp = batch["next_sentence_label"]
        n = len(targets)  # target tokens: the masked positions
        return Step(out.loss, n, {
            "mlm_loss": out.mlm_loss.detach(),
            "mlm_acc": (out.prediction_logits.argmax(-1) == targets).float().mean(),
            "nsp_loss": (out.nsp_loss.detach(), len(nsp)),
            "nsp_acc": ((out.seq_relationship_logits.argmax(-1) == nsp).float().mean(), len(nsp)),
        })

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
