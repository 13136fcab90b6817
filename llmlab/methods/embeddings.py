"""What word2vec and GloVe share as llmlab methods: vectors in, intrinsic scores and files out.

- The model is built from the word tokenizer (its frequency counts drive the noise table, the
  Huffman tree and subsampling), so :meth:`attach_tokenizer` creates it: at training start and
  when a checkpoint is loaded.
- Validation is intrinsic evaluation of the current vectors (WordSim-353, SimLex-999, Google
  analogies from the ``gensim`` package), logged as ``val/ws353``, ``val/simlex``, ``val/analogy`` ...
- The learning rate decays linearly with training progress, from ``alpha`` to ``min_alpha``
  (word2vec.c; with ``min_alpha == alpha`` it is constant).
- ``save_artifacts`` writes ``vectors.txt`` / ``vectors.bin`` (word2vec formats, loadable by
  gensim's ``KeyedVectors.load_word2vec_format``) and ``embeddings_pca.png``.
- ``llmlab eval`` → :meth:`evaluate`; ``llmlab infer query=WORD | analogy=a:b::c`` → :meth:`infer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmlab.errors import UserError
from llmlab.evaluation.export import plot_pca, save_word2vec_format
from llmlab.evaluation.word_vectors import WordVectors, format_table, intrinsic_metrics
from llmlab.methods.base import LLMLabModule
from llmlab.utils import atomic_write_bytes

# validation metric name -> key of intrinsic_metrics()
VAL_METRICS = {
    "val/ws353": "ws353/spearman",
    "val/simlex": "simlex/spearman",
    "val/analogy": "analogy/total",
    "val/ws353_coverage": "ws353/coverage",
    "val/simlex_coverage": "simlex/coverage",
    "val/analogy_covered": "analogy/covered",
}


class WordEmbeddingModule(LLMLabModule):
    """Base class of :class:`~llmlab.methods.word2vec.Word2VecModule` and :class:`~llmlab.methods.glove.GloVeModule`."""

    title = "Word embeddings"  # plot title
    loss_is_token_nll = False  # SGNS / GloVe losses are not token NLLs: no perplexity

    def __init__(self, models: dict | None, alpha: float, min_alpha: float, restrict_vocab: int = 30000) -> None:
        super().__init__(models, optim=None)
        if alpha <= 0 or min_alpha < 0 or min_alpha > alpha:
            raise UserError(f"learning rates alpha={alpha}, min_alpha={min_alpha}: need 0 <= min_alpha <= alpha, alpha > 0")
        self.alpha, self.min_alpha = float(alpha), float(min_alpha)
        self.restrict_vocab = int(restrict_vocab)
        self._loss_sum, self._loss_n, self._loss_batches = 0.0, 0, 0  # training loss accumulated between log lines

    # ----------------------------------------------------------------- the vocabulary
    def attach_tokenizer(self, tokenizer) -> None:
        if getattr(tokenizer, "name", None) != "word":
            raise UserError(f"{type(self).__name__} trains on words, not tokenizer={tokenizer.name}: use tokenizer=word")
        self.tokenizer = tokenizer

    def vectors(self) -> torch.Tensor:
        return self.model.vectors()

    def word_vectors(self) -> WordVectors:
        return WordVectors(self.tokenizer.words, self.vectors().detach().float().cpu())

    # ----------------------------------------------------------------- training plumbing
    def use_fused_update(self, fused: bool) -> None:
        """fused: the model applies its own hand-written update (word2vec.c's SGD, glove.c's AdaGrad)
        under manual optimisation; otherwise autograd + Adam on the mean loss."""
        self.fused_update = bool(fused)
        self.automatic_optimization = not self.fused_update

    def configure_optimizers(self):
        if self.fused_update:
            # the update is the model's fused step; this SGD only holds the learning rate (so the LR
            # monitor sees it) and its no-op step() advances Lightning's global_step
            return torch.optim.SGD(self.model.parameters(), lr=self.alpha)
        return torch.optim.Adam(self.model.parameters(), lr=self.alpha)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizers().param_groups:
            group["lr"] = lr
    def lr_at(self, batch_progress: float) -> float:
        """Linear decay over the whole run; progress = finished epochs + share of this one."""
        trainer = self.trainer
        if trainer.max_epochs and trainer.max_epochs > 0:
            done = (self.current_epoch + float(batch_progress)) / trainer.max_epochs
        else:
            done = self.global_step / max(1, trainer.max_steps)
        return self.alpha - (self.alpha - self.min_alpha) * min(1.0, max(0.0, done))

    def log_train(self, loss_sum: float, predictions: int, words: int, epoch_end: bool) -> None:
        """Mean loss per prediction since the last log line (Lightning's per-step log() costs more
        than a word2vec step, so this logs every ``trainer.log_every_n_steps`` steps and at the
        last batch of each epoch)."""
        self.count_tokens(words)
        self._loss_sum += loss_sum
        self._loss_n += predictions
        self._loss_batches += 1
        due = self._loss_batches >= self.trainer.log_every_n_steps or self.trainer.fast_dev_run
        if (epoch_end or due) and self._loss_n:
            self.log("train/loss", self._loss_sum / self._loss_n, on_step=True, on_epoch=True, prog_bar=True,
                     batch_size=self._loss_n)  # epoch mean weighted by predictions
            self._loss_sum, self._loss_n, self._loss_batches = 0.0, 0, 0

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # ----------------------------------------------------------------- validation = intrinsic eval
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        scores = intrinsic_metrics(self.word_vectors(), restrict_vocab=self.restrict_vocab)
        for name, key in VAL_METRICS.items():
            self.log(name, float(scores.get(key, float("nan"))), sync_dist=False)

    # ----------------------------------------------------------------- outputs
    def save_artifacts(self, run_dir: str) -> None:
        wv = self.word_vectors()
        run = Path(run_dir)
        save_word2vec_format(run / "vectors.txt", wv.words, wv.vectors, binary=False)
        save_word2vec_format(run / "vectors.bin", wv.words, wv.vectors, binary=True)
        if len(wv) >= 2:
            png = plot_pca(wv.words, wv.vectors, title=f"{self.title} (PCA of the {min(300, len(wv))} most frequent words)")
            atomic_write_bytes(run / "embeddings_pca.png", png)

    def evaluate(self, cfg) -> dict[str, float]:
        """``llmlab eval``: similarity and analogy benchmarks (see conf/eval.yaml ``vectors``)."""
        opts = cfg.get("vectors") or {}
        metrics = intrinsic_metrics(
            self.word_vectors(),
            similarity=list(opts.get("similarity") or []),
            analogies=opts.get("analogies"),
            restrict_vocab=int(opts.get("restrict_vocab") or self.restrict_vocab),
        )
        print(format_table(metrics))
        return metrics

    def infer(self, cfg) -> list[tuple[str, float]]:
        """``llmlab infer query=WORD`` (nearest neighbours) or ``analogy="man:king::woman"``."""
        wv, topn = self.word_vectors(), int(cfg.get("topn") or 10)
        if cfg.get("analogy"):
            a, b, c = parse_analogy(str(cfg.analogy))
            result = wv.analogy(a, b, c, topn=topn)
            header = f"{a} : {b} :: {c} : ?"
        elif cfg.get("query"):
            query = str(cfg.query).strip().lower() if self.tokenizer.lowercase else str(cfg.query).strip()
            result = wv.most_similar(query, topn=topn)
            header = f"nearest neighbours of {query!r}"
        else:
            raise UserError('nothing to do: pass query=WORD (nearest neighbours) or analogy="man:king::woman"')
        print(header)
        width = max(len(w) for w, _ in result) if result else 0
        for rank, (word, score) in enumerate(result, 1):
            print(f"  {rank:>2}. {word:<{width}}  {score:.4f}")
        return result


def parse_analogy(text: str) -> tuple[str, str, str]:
    """``"man:king::woman"`` (or ``"man king woman"``) → ("man", "king", "woman")."""
    parts = [p for p in text.replace("::", " ").replace(":", " ").lower().split() if p]
    if len(parts) == 4 and parts[3] == "?":
        parts = parts[:3]
    if len(parts) != 3:
        raise UserError(f'analogy={text!r}: write it as "a:b::c" (a is to b as c is to ?), e.g. analogy="man:king::woman"')
    return parts[0], parts[1], parts[2]
