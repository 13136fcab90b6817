"""GPT: causal language modelling (Radford et al. 2018, "Improving Language Understanding by
Generative Pre-Training"; 2019, "Language Models are Unsupervised Multitask Learners").

Objective: maximise sum_t log P(x_t | x_<t), i.e. cross-entropy of the next token. Batches are
``(x, y)`` windows with ``y`` pre-shifted by one (``y[t] = x[t+1]``, -100 = ignore). Validation and
test report the token-weighted mean loss and its exponential, the perplexity.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torchmetrics.aggregation import MeanMetric

from llmlab.errors import UserError
from llmlab.inference.generate import generate
from llmlab.methods.base import LLMLabModule, _plain, model_config
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.utils import atomic_write_bytes, write_json

# keys of the `model` config group that are not GPTConfig fields
_PRESET_KEYS = ("name", "init_from", "compile")


class GPTLM(LLMLabModule):
    """Next-token prediction with :class:`llmlab.models.gpt.GPT`."""

    def __init__(
        self,
        model: dict,
        optim: dict | None = None,
        vocab_size: int | None = None,
        name: str = "gpt",
    ) -> None:
        model, optim = _plain(model), _plain(optim)  # plain dicts in hparams: checkpoints load anywhere
        super().__init__(optim)
        self.save_hyperparameters(logger=False)
        self.model = build_gpt(model, vocab_size)
        if model.get("init_from"):  # checkpoints must not need the HF directory again
            self.hparams.model = {**model, **asdict(self.model.config), "init_from": None}
        # token-weighted means: every token counts once
        self.metrics = torch.nn.ModuleDict({f"{s}_loss": MeanMetric() for s in ("val", "test")})
        if model.get("compile"):
            self.model = torch.compile(self.model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        _, loss = self.model(x, y)
        return loss, int((y != -100).sum())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, n = self.model_step(batch)
        self.count_tokens(n)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, n = self.model_step(batch)
        self.metrics["val_loss"].update(loss, n)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, n = self.model_step(batch)
        self.metrics["test_loss"].update(loss, n)

    def epoch_metrics(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.pop_metrics(split).pop("loss"), {}

    def save_artifacts(self, run_dir: str) -> None:
        self.export(Path(run_dir) / "hf")

    def export(self, out_dir) -> Path | None:
        """Write the weights as a Hugging Face GPT-2 directory (config.json + model.safetensors).

        Loadable by ``GPT.from_pretrained`` / ``model.init_from`` and by
        ``transformers.GPT2LMHeadModel.from_pretrained``. Returns None for bias-free models,
        which GPT-2's format cannot describe.
        """
        from safetensors.torch import save

        gpt = _unwrap(self.model)
        if not gpt.config.bias:
            return None
        out = Path(out_dir)
        state = {k: v.detach().clone().contiguous() for k, v in gpt.to_hf_state_dict().items()}
        if gpt.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # tied: stored once, as transformer.wte.weight
        atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
        write_json(out / "config.json", gpt.to_hf_config())
        return out

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
        greedy: bool = False,
        num_samples: int = 1,
        seed: int | None = None,
        use_kv_cache: bool = True,
        stop_at_eos: bool = True,
    ) -> list[str]:
        """Continue ``prompt`` ``num_samples`` times; returns the generated text (prompt excluded)."""
        tok = self.tokenizer
        if tok is None:
            raise UserError("this GPT has no tokenizer attached: load it with llmlab infer ckpt_path=...")
        ids = tok.encode(prompt) if prompt else _start_ids(tok)
        if not ids:
            raise UserError(f"prompt {prompt!r} encodes to no tokens: pass some text")
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=self.device)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        out = generate(
            _unwrap(self.model),
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            eos_id=tok.eos_id if stop_at_eos else None,
            use_kv_cache=use_kv_cache,
            generator=gen,
        )
        texts = []
        for row in out[:, len(ids) :].tolist():
            if stop_at_eos and tok.eos_id is not None and tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            texts.append(tok.decode(row))
        return texts


def build_gpt(model_cfg: dict, vocab_size: int | None) -> GPT:
    """GPT from the `model` config group: a fresh init, or `init_from` a local HF GPT-2 dir."""
    init_from = model_cfg.get("init_from")
    if init_from:
        cfg = {k: v for k, v in model_cfg.items() if k not in _PRESET_KEYS}
        overrides = {k: cfg[k] for k in ("dropout", "attn_impl", "block_size") if cfg.get(k) is not None}
        model = GPT.from_pretrained(init_from, **overrides)
        if vocab_size is not None and model.config.vocab_size < vocab_size:
            raise UserError(
                f"model.init_from={init_from} has a {model.config.vocab_size}-token vocabulary but the "
                f"tokenizer has {vocab_size}: use tokenizer=gpt2 with GPT-2 weights"
            )
        return model
    return GPT(model_config(GPTConfig, model_cfg, vocab_size, preset_keys=_PRESET_KEYS,
                            presets="gpt_nano|gpt_micro|gpt2_124m|gpt2_355m"))


def _start_ids(tok) -> list[int]:
    """What an empty prompt starts from: <|endoftext|> (as GPT-2 does), else a newline."""
    if tok.eos_id is not None:
        return [tok.eos_id]
    try:
        return tok.encode("\n")
    except UserError:  # a char vocabulary without newlines
        return [0]


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the GPT itself
