"""Prompt learning: trainable virtual tokens instead of trained weights.

Three tuners share this module (their names and keys are those of Hugging Face ``peft``):

* ``prompt``: soft prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
  Prompt Tuning", §2). ``P`` trainable vectors in the word-embedding space are put before the
  input embeddings; nothing inside the network changes. ``P × d`` parameters. Initialisation
  (§3.2): ``RANDOM``, ``SAMPLE_VOCAB`` (embeddings of random vocabulary entries) or ``TEXT``
  (the embeddings of ``prompt_tuning_init_text``'s tokens, repeated / cropped to ``P``, as peft does).
* ``prefix``: prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation", §4.2-4.3). Every attention layer gets ``P`` extra keys and values in front of its
  own, attended by every token. They are produced by a reparameterisation MLP,
  ``Embedding(P, d) -> Linear(d, h) -> Tanh -> Linear(h, L·2·d)`` (``prefix_projection: true``),
  which stabilises training and is thrown away afterwards (:func:`materialize`): only the
  ``P × L·2·d`` prefix is kept and exported.
* ``ptuning_v2``: deep prompt tuning (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable
  to Fine-tuning Universally Across Scales and Tasks", §3.2): the same per-layer key/value prefix,
  optimised directly (``prefix_projection: false``): ``P × L·2·d`` parameters.

The tuners fill two hooks the models provide (:class:`~llmlab.models.gpt.GPT`, ``Bert``, ``T5``):
``model.virtual_tokens`` (:class:`PromptEmbedding`) and ``model.prefix_kv`` (:class:`PrefixEncoder`).
The models put the virtual tokens / prefix in the first ``P`` positions and return outputs for the
real tokens only, so methods and losses do not change. Not the seed's code (spec seed000_part2
§4.3, §7.1): its prefix was never attended, its permute swapped head_dim and prefix length, its
base was not frozen and its P-tuning v2 encoder got no gradient.

The flat prefix table has ``peft``'s layout: row ``p`` holds, for layer ``l``, the key at columns
``[(2l)·d, (2l+1)·d)`` and the value at ``[(2l+1)·d, (2l+2)·d)``, each split into heads, so the
table *is* ``peft``'s ``prompt_embeddings`` (:func:`to_peft` / :func:`from_peft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.peft import TunerLayer, apply_peft, peft_config
from llmlab.peft.arch import PeftArch
from llmlab.peft.targets import check_fresh, with_defaults

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
DEFAULTS = {
    "prompt": {"num_virtual_tokens": 20, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None},
    "prefix": {"num_virtual_tokens": 20, "prefix_projection": True, "encoder_hidden_size": 512},
    "ptuning_v2": {"num_virtual_tokens": 20, "prefix_projection": False, "encoder_hidden_size": None},
}
PREFIX_INIT_STD = 0.02  # a directly optimised prefix starts small (the seed's std 1 is a bug, spec §4.3.5)
# peft task types whose PeftModel forward applies prompt learning (a plain PeftModel would not)
TASK_TYPES = {"gpt": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "t5": "SEQ_2_SEQ_LM"}


# ---------------------------------------------------------------------- modules
class PromptEmbedding(TunerLayer):
    """Soft prompt: ``P`` trainable word-embedding vectors; ``forward(batch_size) -> (B, P, d)``.

    ``embedding`` is named as in ``peft``'s ``PromptEmbedding``; the model reads it through its
    ``virtual_tokens`` hook (and skips it while ``disabled``).
    """

    no_weight_decay = True  # a learned embedding table: decay would pull the prompt towards 0 every step

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        P, d = init.shape
        self.embedding = nn.Embedding(P, d, device=init.device, dtype=init.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(init)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, d)


class PrefixEncoder(TunerLayer):
    """Key/value prefixes of every attention layer; ``forward(batch_size) -> [(k, v)] * n_layer``,
    each ``(B, n_head, P, head_dim)``.

    Parameters as in ``peft``'s ``PrefixEncoder``: ``embedding`` ``(P, L·2·d)`` is the prefix
    itself, or, with ``encoder_hidden_size`` (Li & Liang's reparameterisation), ``embedding``
    ``(P, token_dim)`` followed by ``transform = Linear(token_dim, h), Tanh, Linear(h, L·2·d)``.
    """

    no_weight_decay = True  # a learned embedding table: decay would pull the prompt towards 0 every step

    def __init__(self, num_virtual_tokens: int, n_layer: int, n_head: int, head_dim: int, token_dim: int,
                 encoder_hidden_size: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        width = n_layer * 2 * n_head * head_dim  # keys and values of every layer, heads side by side
        kw = dict(device=device, dtype=dtype)
        self.prefix_projection = encoder_hidden_size is not None
        if self.prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size, **kw), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, width, **kw))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, **kw)
            nn.init.normal_(self.embedding.weight, std=PREFIX_INIT_STD)

    def table(self) -> torch.Tensor:
        """The flat prefix ``(P, L·2·d)`` (``peft``'s ``prompt_embeddings``)."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P, L = self.num_virtual_tokens, self.n_layer
        t = self.table().view(P, 2 * L, self.n_head, self.head_dim).permute(1, 2, 0, 3)  # (2L, nh, P, hs)
        t = t.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, nh, P, hs): shared by the batch
        return [(t[2 * i], t[2 * i + 1]) for i in range(L)]

    @torch.no_grad()
    def materialize(self) -> None:
        """Replace the reparameterisation MLP by the prefix it computes (same outputs, P·L·2·d
        parameters left): what Li & Liang keep after training."""
        if not self.prefix_projection:
            return
        table = self.table().detach().clone()
        trainable = self.embedding.weight.requires_grad
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.embedding.weight.requires_grad_(trainable)
        del self.transform
        self.prefix_projection = False

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, n_layer={self.n_layer}, n_head={self.n_head}, "
                f"head_dim={self.head_dim}, prefix_projection={self.prefix_projection}")


# ---------------------------------------------------------------------- architecture facts
@dataclass(frozen=True)
class _Dims:
    token_dim: int  # width of the word embeddings (a soft prompt's vectors, the MLP's input)
    n_layer: int  # attention layers a prefix goes into (T5: encoder blocks, then decoder blocks)
    n_head: int
    head_dim: int
    context: int | None  # positions shared by virtual and real tokens (None: relative positions)
    word_embeddings: nn.Embedding


def _dims(model: nn.Module, arch: PeftArch) -> _Dims:
    c = model.config
    if arch.name == "gpt":
        return _Dims(c.n_embd, c.n_layer, c.n_head, c.head_dim, c.block_size, model.transformer.wte)
    if arch.name == "bert":
        return _Dims(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim,
                     c.max_position_embeddings, model.embeddings.word_embeddings)
    return _Dims(c.d_model, c.num_layers + c.num_decoder_layers, c.num_heads, c.d_kv, None, model.shared)


# ---------------------------------------------------------------------- apply
def apply(model: nn.Module, cfg: dict, arch: PeftArch, tokenizer: Any = None) -> None:
    """Add the ``prompt`` / ``prefix`` / ``ptuning_v2`` tuner (``cfg["name"]``) to the frozen ``model``."""
    name = cfg.get("name")
    if name not in DEFAULTS:
        raise UserError(f"llmlab.peft.prompt has no tuner {name!r}: use one of {', '.join(DEFAULTS)}")
    opts = with_defaults(cfg, DEFAULTS[name], name)
    check_fresh(model, name)
    if model.virtual_tokens is not None or model.prefix_kv is not None:
        raise UserError(f"peft={name}: the model already has a prompt or prefix; start from the base model")
    dims = _dims(model, arch)
    P = opts["num_virtual_tokens"]
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise UserError(f"peft.num_virtual_tokens={P!r} must be a positive integer (e.g. 20)")
    if dims.context is not None and P >= dims.context:
        raise UserError(f"peft.num_virtual_tokens={P} leaves no room for text in the model's {dims.context} "
                        "positions: use fewer virtual tokens")
    ref = dims.word_embeddings.weight
    if name == "prompt":
        model.virtual_tokens = PromptEmbedding(_prompt_init(opts, dims.word_embeddings, tokenizer))
        return
    projection = opts["prefix_projection"]
    if not isinstance(projection, bool):
        raise UserError(f"peft.prefix_projection={projection!r} must be true or false")
    hidden = opts["encoder_hidden_size"]
    if projection:
        hidden = dims.token_dim if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise UserError(f"peft.encoder_hidden_size={hidden!r} must be a positive integer (the prefix MLP's "
                            "hidden width, e.g. 512)")
    model.prefix_kv = PrefixEncoder(P, dims.n_layer, dims.n_head, dims.head_dim, dims.token_dim,
                                    hidden if projection else None, device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def _prompt_init(opts: dict, word_embeddings: nn.Embedding, tokenizer: Any) -> torch.Tensor:
    """The ``(P, d)`` starting prompt for ``prompt_tuning_init``."""
    P = opts["num_virtual_tokens"]
    W = word_embeddings.weight  # (V, d)
    init = str(opts["prompt_tuning_init"]).upper()
    if init not in INITS:
        raise UserError(f"peft.prompt_tuning_init={opts['prompt_tuning_init']!r} is unknown: use one of "
                        f"{', '.join(INITS)}")
    if init == "RANDOM":
        # N(0, σ²) with σ the word embeddings' own scale (peft's N(0, 1) is off the embedding manifold)
        return torch.randn(P, W.size(1), device=W.device, dtype=W.dtype) * W.float().std().to(W.dtype)
    if init == "SAMPLE_VOCAB":
        return W[torch.randint(0, W.size(0), (P,), device=W.device)].clone()
    text = opts["prompt_tuning_init_text"]
    if not text:
        raise UserError("peft.prompt_tuning_init=TEXT needs peft.prompt_tuning_init_text='<words that describe the "
                        "task>' (or use prompt_tuning_init=SAMPLE_VOCAB)")
    if tokenizer is None:
        raise UserError("peft.prompt_tuning_init=TEXT needs the model's tokenizer to embed prompt_tuning_init_text: "
                        "train with a tokenizer, or use prompt_tuning_init=SAMPLE_VOCAB")
    ids = list(tokenizer.encode(str(text)))
    if not ids:
        raise UserError(f"peft.prompt_tuning_init_text={text!r} has no tokens: give some words")
    ids = (ids * -(-P // len(ids)))[:P]  # repeated, then cropped to P (as peft does)
    return W[torch.tensor(ids, device=W.device)].clone()  # (P, d)


def materialize(model: nn.Module) -> nn.Module:
    """Replace a prefix MLP by the prefix it computes (inference unchanged); returns ``model``."""
    inner = getattr(model, "_orig_mod", model)
    if getattr(inner, "prefix_kv", None) is not None:
        inner.prefix_kv.materialize()
    return model


# ---------------------------------------------------------------------- peft format
def to_peft(model: nn.Module, arch: PeftArch) -> tuple[dict, dict[str, torch.Tensor]]:
    """``adapter_config.json`` fields and tensors of ``peft``'s PROMPT_TUNING / PREFIX_TUNING adapter."""
    cfg = peft_config(model) or {}
    name = cfg.get("name")
    cfg = {**DEFAULTS.get(name, {}), **cfg}
    dims = _dims(model, arch)
    config = {"task_type": TASK_TYPES[arch.name], "num_transformer_submodules": 1,
              "token_dim": dims.token_dim, "num_attention_heads": dims.n_head}
    if name == "prompt":
        init = str(cfg.get("prompt_tuning_init", "RANDOM")).upper()
        config.update(
            peft_type="PROMPT_TUNING", num_virtual_tokens=model.virtual_tokens.num_virtual_tokens,
            num_layers=model.config.num_layers if arch.name == "t5" else dims.n_layer,
            # TEXT would make peft load a tokenizer by name; the trained prompt is in the file anyway
            prompt_tuning_init="SAMPLE_VOCAB" if init == "SAMPLE_VOCAB" else "RANDOM",
            prompt_tuning_init_text=cfg.get("prompt_tuning_init_text"), tokenizer_name_or_path=None)
        return config, {"prompt_embeddings": model.virtual_tokens.embedding.weight}
    if arch.name == "t5":
        raise UserError("an llmlab T5 prefix (encoder and decoder self-attention) has no peft twin: peft prefixes "
                        "only the T5 decoder; keep the llmlab checkpoint, or use peft=prompt / lora for a peft adapter")
    encoder = model.prefix_kv
    config.update(peft_type="PREFIX_TUNING", num_virtual_tokens=encoder.num_virtual_tokens, num_layers=dims.n_layer,
                  prefix_projection=bool(cfg.get("prefix_projection", False)),
                  encoder_hidden_size=cfg.get("encoder_hidden_size") or dims.token_dim)
    # peft saves the computed prefix, never the MLP (peft's get_prompt_embedding_to_save)
    return config, {"prompt_embeddings": encoder.table().detach()}


@torch.no_grad()
def from_peft(model: nn.Module, adapter_config: dict, state: dict[str, torch.Tensor], arch: PeftArch,
              tokenizer: Any = None) -> None:
    """Apply the tuner of a ``peft`` PROMPT_TUNING / PREFIX_TUNING adapter and load its prompt."""
    extra = sorted(set(state) - {"prompt_embeddings"})
    if extra:
        raise UserError(f"adapter tensor {extra[0]} is not part of a prompt-learning adapter (only "
                        "prompt_embeddings is): the file belongs to another tuner")
    if "prompt_embeddings" not in state:
        raise UserError("the adapter file has no prompt_embeddings tensor: it is truncated or not a prompt adapter")
    table = state["prompt_embeddings"]
    dims = _dims(model, arch)
    P = adapter_config.get("num_virtual_tokens")
    n_sub = adapter_config.get("num_transformer_submodules") or 1
    peft_type = adapter_config.get("peft_type")
    _check_field(adapter_config, "token_dim", dims.token_dim, arch)
    if peft_type == "PROMPT_TUNING":
        if table.shape != (n_sub * P, dims.token_dim):
            raise UserError(f"prompt_embeddings is {tuple(table.shape)}, expected ({n_sub * P}, {dims.token_dim}) "
                            f"for num_virtual_tokens={P}: the adapter does not fit this {arch.name} model")
        apply_peft(model, {"name": "prompt", "num_virtual_tokens": P})
        # seq2seq peft keeps P rows per transformer submodule but only feeds the first P to the encoder
        model.virtual_tokens.embedding.weight.copy_(table[:P])
        return
    if peft_type != "PREFIX_TUNING":
        raise UserError(f"peft_type={peft_type!r} is not a prompt-learning adapter llmlab reads "
                        "(PROMPT_TUNING, PREFIX_TUNING)")
    if arch.name == "t5" or n_sub != 1:
        raise UserError("peft's seq2seq prefix (decoder only) has no llmlab counterpart: llmlab's T5 prefix covers "
                        "encoder and decoder self-attention; load the adapter with peft, or use a prompt/LoRA adapter")
    _check_field(adapter_config, "num_layers", dims.n_layer, arch)
    _check_field(adapter_config, "num_attention_heads", dims.n_head, arch)
    projection = bool(adapter_config.get("prefix_projection", False))
    width = dims.n_layer * 2 * dims.n_head * dims.head_dim
    if table.shape != (P, width):
        raise UserError(f"prompt_embeddings is {tuple(table.shape)}, expected ({P}, {width}) = (num_virtual_tokens, "
                        f"num_layers*2*token_dim): the adapter does not fit this {arch.name} model")
    apply_peft(model, {"name": "prefix" if projection else "ptuning_v2", "num_virtual_tokens": P,
                       "prefix_projection": projection,
                       "encoder_hidden_size": adapter_config.get("encoder_hidden_size") if projection else None})
    model.prefix_kv.materialize()  # the file holds the computed prefix; the MLP that made it is gone
    model.prefix_kv.embedding.weight.copy_(table)


def _check_field(adapter_config: dict, key: str, ours: int, arch: PeftArch) -> None:
    theirs = adapter_config.get(key)
    if theirs is not None and theirs != ours:
        raise UserError(f"the adapter's {key}={theirs} does not match the {arch.name} model's {ours}: it was trained "
                        "on another model size")
