"""ELMo: a character-CNN bidirectional language model (Peters et al. 2018, "Deep contextualized
word representations"), trained on word windows of the LM datamodule.

Batches are the GPT windows ``(x, y)`` with ``y[t] = x[t+1]``; the sequence the biLM reads is
``[x_0, y_0 … y_{T-1}]`` (T+1 words, -100 = padding). Each word enters through its characters (a
(V, 50) table built from the word vocabulary, so the char-CNN never needs a word embedding) and
is predicted by the softmax shared by both directions. The objective is forward CE + backward CE
(paper eq. 1); ``train/loss`` and ``val/loss`` are their mean, so ``val/ppl`` = exp(mean) is the
geometric mean of the two perplexities, and ``val/ppl_fwd`` / ``val/ppl_bwd`` are reported too.

Inference (``llmlab infer ckpt_path=X text="..."``) prints, for every word of the sentence, its
nearest vocabulary words by the cosine between its contextual ELMo vector (scalar mix of the
L+1 layers; s and γ learnable downstream, uniform/1 here) and every vocabulary word's
context-free representation (layer 0), so the same word gets different neighbours in different
sentences; the vectors are saved as ``elmo_vectors.pt``. Any word gets a vector, in the
vocabulary or not (its characters are all the model needs).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.methods.base import LLMLabModule, Step
from llmlab.models.elmo import ScalarMix, batch_to_char_ids, word_to_char_ids
from llmlab.nn.losses import IGNORE_INDEX
from llmlab.utils import plain


class ElmoLM(LLMLabModule):
    """Forward + backward LM with :class:`llmlab.models.elmo.ElmoBiLM`."""

    name = "elmo"

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, **method_keys) -> None:
        super().__init__(models, plain(optim))
        self.save_hyperparameters(ignore=["models"], logger=False)
        self.mix = ScalarMix(self.model.num_layers)  # learnable by a downstream task; unused by the LM loss
        self.register_buffer("char_table", torch.zeros(0, self.model.config.max_characters_per_token,
                                                       dtype=torch.long), persistent=False)

    def attach_tokenizer(self, tokenizer) -> None:
        words = getattr(tokenizer, "words", None)
        if words is None:
            raise UserError(f"ELMo predicts words, not tokenizer={getattr(tokenizer, 'name', None)}: use tokenizer=word")
        if len(words) > self.model.config.vocab_size:
            raise UserError(f"the tokenizer has {len(words)} words but model.vocab_size="
                            f"{self.model.config.vocab_size}: set model.vocab_size=null")
        super().attach_tokenizer(tokenizer)
        L = self.model.config.max_characters_per_token
        self.char_table = torch.tensor([word_to_char_ids(w, L) for w in words], dtype=torch.long,
                                       device=self.char_table.device)

    # ----------------------------------------------------------------- training
    def sequence(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(char_ids (B, T+1, 50), target ids (B, T+1)) of the window [x_0 … x_{T-1}, y_{T-1}].

        Every word of the window is real and read; a -100 in ``y`` (the last evaluation window's
        targets that an earlier window already scored) only stops that word being a target.
        """
        x, y = batch
        words = torch.cat([x, y[:, -1:]], dim=1)
        chars = self.char_table.index_select(0, words.view(-1)).view(*words.shape, -1)
        return chars, torch.cat([x[:, :1], y], dim=1)

    def model_step(self, batch) -> Step:
        chars, ids = self.sequence(batch)
        fwd, bwd = self.model.lm_loss(chars, ids, torch.ones_like(ids, dtype=torch.bool))
        n = int((ids[:, 1:] != IGNORE_INDEX).sum())  # forward targets
        # paper eq. 1: the two log-likelihoods are maximised jointly; the reported loss is their mean
        return Step((fwd + bwd).detach() / 2, n, {"loss_fwd": fwd.detach(), "loss_bwd": bwd.detach()},
                    objective=fwd + bwd)

    def epoch_metrics(self, split: str) -> dict[str, torch.Tensor]:
        m = super().epoch_metrics(split)
        if "loss_fwd" in m:
            m.update(ppl_fwd=torch.exp(m["loss_fwd"]), ppl_bwd=torch.exp(m["loss_bwd"]))
        return m

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def contextual(self, words: list[str]) -> torch.Tensor:
        """ELMo vectors (T, 2·projection_dim) of one tokenised sentence."""
        chars = batch_to_char_ids([words], self.model.config.max_characters_per_token).to(self.device)
        out = self.model(chars)
        return self.mix(out.hidden_states)[0]

    @torch.no_grad()
    def type_vectors(self) -> torch.Tensor:
        """Context-free representation (layer 0) of every vocabulary word, (V, 2·projection_dim)."""
        rows = [self.model.char_cnn(chunk) for chunk in self.char_table.split(4096)]
        x = torch.cat(rows)
        return torch.cat([x, x], dim=-1)

    def infer(self, cfg) -> dict:
        text = cfg.get("text") or cfg.get("prompt")
        if not text:
            raise UserError('ELMo needs a sentence: llmlab infer ckpt_path=X text="the king is dead"')
        words = self.tokenizer.split(str(text))
        if not words:
            raise UserError(f"text={text!r} has no words: pass a sentence")
        self.eval()
        vectors = self.contextual(words)
        vocab = F.normalize(self.type_vectors(), dim=-1)
        sims = F.normalize(vectors, dim=-1) @ vocab.T
        topn = int(cfg.get("topn") or 5)
        result = {}
        for k, word in enumerate(words):
            scores, idx = sims[k].topk(min(topn + 1, sims.shape[1]))
            near = [(self.tokenizer.words[i], float(s)) for s, i in zip(scores.tolist(), idx.tolist())
                    if self.tokenizer.words[i] != word][:topn]
            result[word if word not in result else f"{word}#{k}"] = near
            oov = "" if word in self.tokenizer.stoi else "  (not in the vocabulary: from its characters)"
            print(f"{k:>3}. {word}{oov}: " + ", ".join(f"{w} {s:.3f}" for w, s in near))
        out = Path(cfg.paths.output_dir) / "elmo_vectors.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"words": words, "vectors": vectors.cpu(), "layer_weights": self.mix.weights.detach().cpu(),
                    "gamma": float(self.mix.gamma.detach())}, out)
        print(f"contextual vectors ({len(words)} × {vectors.shape[1]}) saved to {out}")
        return result
