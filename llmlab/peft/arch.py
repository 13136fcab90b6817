"""Where parameter-efficient tuners attach in each llmlab architecture.

A tuner never hard-codes a model's module names: it asks this table for the transformer blocks,
the sub-layers whose outputs adapters follow, the Linear layers LoRA / IA3 target by default (the
same leaf names Hugging Face ``peft`` uses for GPT-2, BERT and T5, because llmlab's modules are
named like Hugging Face's), and the output heads that "all-linear" leaves alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmlab.errors import UserError


@dataclass(frozen=True)
class PeftArch:
    name: str  # llmlab architecture name (models/build.py ARCHS)
    lora_targets: tuple[str, ...]  # peft's default target_modules for the Hugging Face twin
    ia3_targets: tuple[str, ...]  # peft's default IA3 target_modules
    ia3_feedforward: tuple[str, ...]  # of those, the ones whose *input* is scaled
    heads: tuple[str, ...]  # the output layer (peft: get_output_embeddings), never adapted by "all-linear"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Transformer blocks, bottom to top (T5: encoder blocks, then decoder blocks)."""
        if self.name == "gpt":
            return list(model.transformer.h)
        if self.name == "bert":
            return list(model.layers)
        return [*model.encoder.blocks, *model.decoder.blocks]

    def sublayers(self, block: nn.Module) -> dict[str, nn.Module]:
        """The sub-layers of a block whose *output* (before the residual add) adapters transform."""
        if self.name == "gpt":
            return {"attn": block.attn, "ffn": block.mlp}
        if self.name == "bert":
            return {"attn": block.attn, "ffn": block.ffn}
        return {"attn": block.self_attn, "ffn": block.ffn}

    def width(self, model: nn.Module) -> int:
        """Width d of the residual stream (what every sub-layer outputs)."""
        return getattr(model.config, {"gpt": "n_embd", "bert": "hidden_size", "t5": "d_model"}[self.name])

    def final_norms(self, model: nn.Module) -> list[nn.Module]:
        """Norms after the last block (GPT ln_f, T5 encoder/decoder final_norm; post-LN BERT has none)."""
        if self.name == "gpt":
            return [model.transformer.ln_f]
        if self.name == "bert":
            return []
        return [model.encoder.final_norm, model.decoder.final_norm]


ARCHS = {
    a.name: a
    for a in (
        PeftArch("gpt", ("c_attn",), ("c_attn", "mlp.c_proj"), ("mlp.c_proj",), ("lm_head",)),
        # peft's BERT IA3 default "output.dense" matches both attention.output.dense (attn.proj)
        # and the FFN's output.dense (ffn.proj), and marks both feedforward (input scaled); peft's
        # "all-linear" leaves out only get_output_embeddings() (the MLM decoder), not nsp_head
        PeftArch("bert", ("query", "value"), ("key", "value", "attn.proj", "ffn.proj"), ("attn.proj", "ffn.proj"),
                 ("mlm_head.decoder",)),
        PeftArch("t5", ("q", "v"), ("k", "v", "wo"), ("wo",), ("lm_head",)),
    )
}
_BY_CLASS = {"GPT": "gpt", "Bert": "bert", "T5": "t5"}


def peft_arch(model: nn.Module) -> PeftArch:
    """The table entry of ``model`` (a GPT, Bert or T5, possibly torch.compile'd)."""
    model = getattr(model, "_orig_mod", model)
    name = _BY_CLASS.get(type(model).__name__)
    if name is None:
        raise UserError(f"peft tuners attach to GPT, BERT and T5 models; {type(model).__name__} has no hooks for "
                        "them: use peft=none (full fine-tuning) for this architecture")
    return ARCHS[name]
