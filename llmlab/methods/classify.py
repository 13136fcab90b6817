"""Sequence classification on top of a pretrained (or fresh) GPT, BERT or T5 — fine-tuning with a
task head, as in Radford et al. 2018 §3.2 ("Improving Language Understanding by Generative
Pre-Training": a linear layer on the last token's final state), Devlin et al. 2019 §4.1 (BERT: a
linear layer on the pooled [CLS] representation) and Raffel et al. 2020 (T5's encoder; pooled by
the mean of its states as in Hugging Face's encoder-only classifiers and sentence-T5).

``models["model"]`` is the backbone (the builder may have wrapped it with a ``peft=`` tuner, which
this method does not need to know); the method owns the head — dropout + ``Linear(hidden,
num_labels)``, the ``dropout`` / ``classifier`` of Hugging Face's ``BertForSequenceClassification``
— created from ``labels`` (the class names the datamodule reports through ``method_kwargs()``, kept
in the checkpoint's hyperparameters). The loss is the mean cross-entropy over the batch's examples.

Pooling (``pooling: auto`` picks per architecture):

* ``last``: the final hidden state of the last real token (GPT: the only one that has read the
  whole text; padding is on the right, so the causal model never sees it);
* ``cls``: BERT's pooler output (tanh dense layer on ``[CLS]``, trained by next-sentence prediction);
* ``mean``: the mean of the final hidden states over the attention mask (T5's encoder; any model).

Validation and test accumulate one confusion matrix over the whole split (summed across ranks) and
log ``{split}/accuracy`` and ``{split}/macro_f1``; ``write_eval_artifacts`` writes it as
``confusion_{split}.png`` + ``.json``. ``llmlab infer ckpt_path=X text="..."`` prints the
probability of every label.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.evaluation.classification import classification_metrics, confusion_matrix, plot_confusion
from llmlab.methods.base import LLMLabModule, Step
from llmlab.utils import atomic_write_bytes, plain, write_json

POOLING = {"gpt": "last", "bert": "cls", "t5": "mean"}  # pooling: auto


def backbone_arch(model: nn.Module) -> str:
    """``gpt`` | ``bert`` | ``t5`` for the classes this method can put a head on."""
    from llmlab.models.bert import Bert
    from llmlab.models.gpt import GPT
    from llmlab.models.t5 import T5

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    for arch, cls in (("gpt", GPT), ("bert", Bert), ("t5", T5)):
        if isinstance(model, cls):
            return arch
    raise UserError(f"method=classify puts a head on GPT, BERT or T5, not on {type(model).__name__}: "
                    "use model=gpt_nano, model=bert_tiny or model=t5_tiny (or model.init_from=... of one)")


HIDDEN = {"gpt": "n_embd", "bert": "hidden_size", "t5": "d_model"}  # the config field of the state width
# what classification never runs: the pretraining heads (and T5's decoder); weights tied to the embedding stay trainable
UNUSED = {"gpt": ("lm_head",), "bert": ("mlm_head", "nsp_head"), "t5": ("decoder", "lm_head")}


def hidden_size(model: nn.Module, arch: str) -> int:
    return int(getattr(getattr(model, "_orig_mod", model).config, HIDDEN[arch]))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last position whose mask is 1 — ``len - 1`` under right padding, ``T - 1``
    under left padding (0 for an all-padding row). ``mask.sum(1) - 1`` (the seed's reward model) is
    only right under right padding."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)  # (T,)
    return (positions * (attention_mask != 0)).amax(dim=1)  # (B,)


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, H)``: each row's final state at its last real token (:func:`last_token_index`)."""
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]


class SequenceClassifier(LLMLabModule):
    """A classification head on GPT / BERT / T5 (``models["model"]``); see the module docstring."""

    name = "classify"
    loss_is_token_nll = False  # cross-entropy over examples, not tokens: no perplexity
    eval_ppl = False

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, labels: list[str] | None = None,
                 pooling: str = "auto", classifier_dropout: float = 0.1, **method_keys) -> None:
        super().__init__(models, plain(optim))
        self.save_hyperparameters(ignore=["models"], logger=False)  # labels too: load_method rebuilds the head
        if not labels:
            raise UserError("method=classify needs labelled data: use data=shakespeare_genre or "
                            "data=labeled data.path=FILE (a language-model corpus has no labels)")
        self.labels = [str(x) for x in labels]
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise UserError(f"labels={self.labels}: a classifier needs at least 2 distinct class names")
        self.arch = backbone_arch(self.model)
        self.pooling = POOLING[self.arch] if pooling == "auto" else str(pooling)
        if self.pooling not in ("last", "cls", "mean"):
            raise UserError(f"method.pooling={pooling!r}: use auto, last, cls (BERT) or mean")
        if self.pooling == "cls" and self.arch != "bert":
            raise UserError(f"method.pooling=cls reads BERT's pooler, which {self.arch} has not: use last or mean")
        if not 0.0 <= float(classifier_dropout) < 1.0:
            raise UserError(f"method.classifier_dropout={classifier_dropout}: use a probability in [0, 1), e.g. 0.1")
        self.dropout = nn.Dropout(float(classifier_dropout))
        self.classifier = nn.Linear(hidden_size(self.model, self.arch), len(self.labels))
        nn.init.normal_(self.classifier.weight, std=0.02)  # Hugging Face's initializer_range
        nn.init.zeros_(self.classifier.bias)
        self._freeze_unused()
        weight = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if weight is not None:  # on the backbone's device and dtype (it may arrive on a GPU)
            self.classifier.to(device=weight.device, dtype=weight.dtype)
        self._confusion: dict[str, torch.Tensor] = {}  # split -> running (K, K) counts of this pass
        self.confusion: dict[str, torch.Tensor] = {}  # split -> the last finished pass's matrix (CPU)
        self._last_split: str | None = None

    def _freeze_unused(self) -> None:
        """Parameters no forward pass reaches get no gradient: freeze them, so the optimizer, the
        trainable-parameter count and DDP (which refuses unused parameters) see only what trains."""
        model = getattr(self.model, "_orig_mod", self.model)
        unused = UNUSED[self.arch] + (("pooler",) if self.arch == "bert" and self.pooling != "cls" else ())
        prefixes = tuple(f"{name}." for name in unused)
        used = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith(prefixes)}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.startswith(prefixes) and id(p) not in used:
                p.requires_grad_(False)

    def attach_tokenizer(self, tokenizer) -> None:
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the model reads {vocab:,}: "
                            "use the tokenizer the model was trained with (model.init_from brings it along)")
        super().attach_tokenizer(tokenizer)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        length = getattr(dm, "max_length", 0)
        if self.arch == "bert" and length > self.model.config.max_position_embeddings:
            raise UserError(f"data.max_length={length} exceeds model.max_position_embeddings="
                            f"{self.model.config.max_position_embeddings}: pass data.max_length="
                            f"{self.model.config.max_position_embeddings}")

    # ----------------------------------------------------------------- the model
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per example ``(B, H)``, pooled as ``self.pooling`` says."""
        if self.arch == "gpt":
            h = self.model.encode(input_ids)  # (B, T, C); causal: right padding is never attended
        else:
            h = self.model.encode(input_ids, attention_mask)  # (B, T, H); padding keys are masked
        if self.pooling == "cls":
            return self.model.pooler(h)  # (B, H): tanh(W h[:, 0] + b)
        mask = attention_mask.to(h.dtype)  # (B, T)
        if self.pooling == "last":
            return pool_last(h, attention_mask)  # (B, H): the last real token's state
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, num_labels)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.classifier(self.dropout(self.features(input_ids, attention_mask)))

    # ----------------------------------------------------------------- the step contract
    def _step(self, logits: torch.Tensor, labels: torch.Tensor) -> Step:
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return Step(loss, int(labels.numel()), {"accuracy": accuracy})  # weights = examples

    def model_step(self, batch: dict) -> Step:
        return self._step(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, split: str, batch: dict) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self._accumulate(split, self._step(logits, batch["labels"]))
        counts = confusion_matrix(logits.argmax(-1), batch["labels"], len(self.labels))
        self._confusion[split] = self._confusion.get(split, 0) + counts

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._end_of_confusion("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._end_of_confusion("test")

    def _end_of_confusion(self, split: str) -> None:
        """The split's matrix, summed over ranks (as epoch_metrics sums its means), and its macro-F1."""
        cm = self._confusion.pop(split, None)
        if cm is None:
            return
        if self.trainer is not None and self.trainer.world_size > 1:
            cm = self.trainer.strategy.reduce(cm, reduce_op="sum")
        self.confusion[split], self._last_split = cm.detach().cpu(), split
        self.log(f"{split}/macro_f1", classification_metrics(cm, self.labels)["macro_f1"])

    # ----------------------------------------------------------------- outputs
    def write_eval_artifacts(self, out_dir, split: str) -> None:
        """``confusion_{split}.png`` and ``confusion_{split}.json`` (counts, accuracy, per-class F1).

        ``llmlab eval split=train`` runs Lightning's validation loop: the last finished pass is used
        when ``split`` itself has none."""
        cm = self.confusion.get(split)
        if cm is None and self._last_split is not None:
            cm = self.confusion[self._last_split]
        if cm is None:
            return
        out = Path(out_dir)
        metrics = classification_metrics(cm, self.labels)
        write_json(out / f"confusion_{split}.json", {"labels": self.labels, "matrix": cm.tolist(),
                                                     "rows": "true class", "columns": "predicted class", **metrics})
        atomic_write_bytes(out / f"confusion_{split}.png", plot_confusion(cm, self.labels, f"{split} split"))

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """``(len(texts), num_labels)`` class probabilities, texts encoded as in training."""
        from llmlab.data.classification import encode_text, pad_batch, pad_id

        tok = self.tokenizer
        if tok is None:
            raise UserError("this classifier has no tokenizer attached: load it with llmlab infer ckpt_path=...")
        data = (self.run_config or {}).get("data") or {}
        length = int(data.get("max_length") or 128)
        model = getattr(self.model, "_orig_mod", self.model)
        context = getattr(model.config, "block_size", None)
        if context:  # GPT: its context minus the positions a soft prompt / prefix takes (as in training)
            length = min(length, int(context) - int(getattr(model, "num_virtual_tokens", 0) or 0))
        batch = pad_batch([encode_text(tok, t, length) for t in texts], [0] * len(texts), pad_id(tok))
        self.eval()
        logits = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        return logits.float().softmax(-1).cpu()

    def infer(self, cfg) -> dict[str, float]:
        """``llmlab infer ckpt_path=X text="..."``: one line per label, most probable first."""
        text = cfg.get("text") or cfg.get("prompt")
        if not text:
            raise UserError('the classifier labels a text: llmlab infer ckpt_path=X text="Now is the winter of our discontent"')
        probs = self.predict_proba([str(text).replace("\\n", "\n")])[0].tolist()
        ranked = sorted(zip(self.labels, probs), key=lambda lp: -lp[1])
        width = max(len(label) for label in self.labels)
        for label, p in ranked:
            print(f"{label:<{width}}  {p:.4f}")
        return dict(ranked)
