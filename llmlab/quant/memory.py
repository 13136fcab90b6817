"""Memory accounting of fine-tuning and inference: weights, gradients, optimizer state, activations, KV cache.

Behind ``llmlab memory`` (:mod:`llmlab.tasks.memory`). Pure arithmetic on a model's *layout* (its
parameter count and the shapes of its Linear layers, read from a model built on torch's meta
device, so any preset costs no memory), with the formulas of the papers whose figures it
reproduces (spec seed000_part3 §2.4, §3.3):

* **Weights per precision** — params x bits / 8: 65B parameters take 260 / 130 / 65 / 32.5 GB at
  32 / 16 / 8 / 4 bits (decimal GB, as the papers count).
* **NF4 and double quantization** — QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
  Quantized LLMs", §3 "Double Quantization"): one fp32 absmax per block of 64 weights costs
  32/64 = 0.5 bits/param; quantizing those constants to 8 bits in blocks of 256 (one fp32 constant
  each) costs 8/64 + 32/(64*256) = 0.127 bits/param, saving 0.373 bits/param = 3.03 GB at 65B.
* **Full fine-tuning vs LoRA vs QLoRA** — QLoRA §1: finetuning a 65B model in 16 bits needs
  ">780 GB". That is 12 bytes per parameter: 16-bit weights (2) + 16-bit gradients (2) + AdamW's two
  fp32 moments (8) = 65e9 x 12 = 780 GB, before activations (hence the ">"). Mixed-precision training
  that also keeps an fp32 master copy of the weights (ZeRO, Rajbhandari et al. 2020, §3.1: 16
  bytes/param) is ``master_weights=true`` (1040 GB at 65B). QLoRA: the frozen base in NF4 with double
  quantization, only the LoRA weights have gradients and optimizer state: < 48 GB at 65B.
* **Activations** — Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", §4.1 eq. 1: one GPT layer stores ``s*b*h*(34 + 5*a*s/h)`` bytes in 16 bits (s sequence,
  b batch, h width, a heads; the 5as²b term is the attention matrix, absent with a fused kernel);
  with activation checkpointing (§4.2 "full recomputation") only each layer's input (2sbh) is kept,
  plus one layer's activations while it is recomputed. The fp32 logits of the loss (b*s*V*4) come on top.
* **KV cache** — vLLM (Kwon et al. 2023, §2.3 / §3): ``2 (K, V) x n_layer x n_kv_heads x head_dim x
  bytes`` per token: OPT-13B (40 x 5120, fp16) 819,200 B = "800 KB"; Llama-2-7B (32 x 4096) 0.5 MiB.

Nothing here imports Lightning or Hydra; the model-building side (meta device, tuner counts) is in
:func:`layout_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmlab.errors import UserError

GB = 1e9  # decimal gigabytes: the unit of the papers' figures (260 GB, 780 GB, 48 GB)

# bytes of one element of the training / compute precision (weights that stay float, gradients, activations)
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

NF4_BLOCKSIZE = 64      # QLoRA: one absmax per 64 weights
DQ_BLOCKSIZE = 256      # QLoRA double quantization: the absmax constants in blocks of 256
SCALE_BYTES = 4         # an fp32 scale / absmax (per channel, per group, per block)

# the QLoRA paper's base: NF4, blocks of 64, double quantization (what the QLoRA row uses when no quant= is given)
QLORA_QUANT = {"name": "nf4", "bits": 4, "blocksize": NF4_BLOCKSIZE, "bnb_4bit_use_double_quant": True}


def nf4_bits_per_param(blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True,
                       dq_blocksize: int = DQ_BLOCKSIZE) -> float:
    """Bits per weight of NF4 storage: 4-bit codes + the absmax constants (QLoRA §3).

    Without double quantization: 4 + 32/64 = 4.5; with it: 4 + 8/64 + 32/(64*256) = 4.127.
    """
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return 4 + 32 / blocksize


# formats of the "weights per precision" table: bits per parameter, every parameter in that format
WEIGHT_FORMATS = {
    "fp32": 32.0,
    "bf16": 16.0,                 # and fp16
    "int8": 8.0,
    "int4": 4.0,
    "nf4": nf4_bits_per_param(double_quant=False),  # 4.5: codes + one fp32 absmax per 64
    "nf4_dq": nf4_bits_per_param(double_quant=True),  # 4.127: + double quantization of the absmax
}


def weights_bytes(params: float, bits: float) -> float:
    """Every one of ``params`` weights at ``bits`` bits (the papers' "65B at 4 bits = 32.5 GB")."""
    return params * bits / 8


def double_quant_saving_bytes(params: float, blocksize: int = NF4_BLOCKSIZE) -> float:
    """Bytes double quantization saves on ``params`` NF4 weights (3.03 GB at 65B)."""
    return weights_bytes(params, nf4_bits_per_param(blocksize, False) - nf4_bits_per_param(blocksize, True))


# ---------------------------------------------------------------------------- one Linear layer, stored


def quant_scheme(quant: dict | None) -> str:
    """The ``quant`` group's option name (``none`` when nothing is quantized)."""
    return str((quant or {}).get("name") or "none")


def linear_weight_bytes(out_features: int, in_features: int, quant: dict | None, precision: str) -> float:
    """Bytes of one Linear layer's weight (out, in) as ``quant`` stores it (the bias stays in ``precision``).

    * none: the float weight in ``precision``; bf16: 2 bytes; qat_*: training keeps the float weight
      (fake quantization), so it is counted as such here — its exported form is the int scheme's.
    * int8 / int4 (absmax): one byte per code, two per byte at <= 4 bits, + one fp32 scale per output
      channel, or per ``group_size`` inputs of each channel.
    * llm_int8: int8 codes + one fp32 scale per row (bitsandbytes ``Linear8bitLt``: CB, SCB).
    * nf4: two 4-bit codes per byte + one fp32 absmax per ``blocksize`` weights, or with
      ``bnb_4bit_use_double_quant`` an 8-bit absmax plus one fp32 constant per 256 of them.
      Per-tensor constants (the double-quant mean, the 256-entry code table) are left out: < 2 KiB a layer.
    """
    n = out_features * in_features
    scheme = quant_scheme(quant)
    if scheme == "none" or scheme.startswith("qat_"):
        return n * PRECISION_BYTES[precision]
    if scheme == "bf16":
        return n * 2
    if scheme in ("int8", "int4"):
        bits = int((quant or {}).get("bits") or (8 if scheme == "int8" else 4))
        group = (quant or {}).get("group_size")
        scales = out_features * (math.ceil(in_features / int(group)) if group else 1)
        codes = math.ceil(n / 2) if bits <= 4 else n  # <= 4 bits: two codes per byte; else one int8 each
        return codes + scales * SCALE_BYTES
    if scheme == "llm_int8":
        return n + out_features * SCALE_BYTES
    if scheme == "nf4":
        blocksize = int((quant or {}).get("blocksize") or NF4_BLOCKSIZE)
        blocks = math.ceil(n / blocksize)
        if (quant or {}).get("bnb_4bit_use_double_quant", True):
            absmax = blocks * 1 + math.ceil(blocks / DQ_BLOCKSIZE) * SCALE_BYTES
        else:
            absmax = blocks * SCALE_BYTES
        return math.ceil(n / 2) + absmax
    raise UserError(f"quant={scheme!r} has no memory accounting: use one of none, bf16, int8, int4, qat_int8, "
                    "qat_int4, llm_int8, nf4")


# ---------------------------------------------------------------------------- a model's layout


@dataclass
class Layout:
    """What the accounting needs to know of a model (read from a meta-device build by :func:`layout_of`)."""

    params: int                    # every parameter, tied weights once
    linears: list[tuple[int, int]]  # (out, in) of the Linear layers a quant= replaces
    trainable: int                 # parameters that train under the tuner (LoRA A, B ...); = params without one
    tuner_params: int = 0          # parameters the tuner adds to the model (LoRA A, B ...), kept in the training precision
    arch: str = "gpt"
    n_layer: int | None = None     # transformer blocks (None: no transformer, no activation / KV formula)
    d_model: int | None = None     # width h
    n_head: int | None = None      # attention heads a
    n_kv_head: int | None = None   # heads with their own K, V (MHA: n_head; GQA/MQA: fewer)
    vocab_size: int | None = None  # V of the output logits
    block_size: int | None = None  # context length
    causal: bool = True            # a decoder (has a KV cache when generating)

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linears)

    @property
    def head_dim(self) -> int | None:
        return self.d_model // self.n_head if self.d_model and self.n_head else None


def layout_of(model, tuned=None, quant: dict | None = None) -> Layout:
    """The :class:`Layout` of ``model`` (any device, meta included); ``tuned``: the same model with
    its tuner applied (its trainable parameters count), or None (full fine-tuning).

    Quantization targets are the quant group's (:func:`llmlab.quant.target_layers`): every Linear
    except ``llm_int8_skip_modules`` of ``quant`` (default the output layer) and tied ones.
    """
    from llmlab.peft import count_parameters
    from llmlab.quant import target_layers

    linears = [(layer.out_features, layer.in_features) for _, layer in target_layers(model, quant or {})]
    total = count_parameters(model)["total"]
    if tuned is None:
        return Layout(params=total, linears=linears, trainable=total, **_shape(model))
    counts = count_parameters(tuned)
    return Layout(params=total, linears=linears, trainable=counts["trainable"], tuner_params=counts["total"] - total,
                  **_shape(model))


def _shape(model) -> dict:
    """Transformer dimensions of llmlab's architectures (GPT, BERT, T5's decoder side)."""
    c = getattr(model, "config", None)
    if c is None:
        return {"arch": type(model).__name__.lower(), "causal": False}
    if hasattr(c, "n_embd"):  # GPT
        return {"arch": "gpt", "n_layer": c.n_layer, "d_model": c.n_embd, "n_head": c.n_head, "n_kv_head": c.n_head,
                "vocab_size": c.vocab_size, "block_size": c.block_size, "causal": True}
    if hasattr(c, "hidden_size"):  # BERT: an encoder, no KV cache
        return {"arch": "bert", "n_layer": c.num_hidden_layers, "d_model": c.hidden_size,
                "n_head": c.num_attention_heads, "n_kv_head": c.num_attention_heads, "vocab_size": c.vocab_size,
                "block_size": c.max_position_embeddings, "causal": False}
    if hasattr(c, "d_model"):  # T5: the decoder's blocks cache keys and values (heads of width d_kv)
        layers = c.num_decoder_layers or c.num_layers
        return {"arch": "t5", "n_layer": layers, "d_model": c.num_heads * c.d_kv, "n_head": c.num_heads,
                "n_kv_head": c.num_heads, "vocab_size": c.vocab_size, "block_size": None, "causal": True}
    return {"arch": type(model).__name__.lower(), "causal": False}


# ---------------------------------------------------------------------------- activations and KV cache


def activation_bytes(layout: Layout, batch: int, seq: int, precision: str, checkpointing: bool,
                     attention_scores: bool = True) -> float | None:
    """Activations kept for the backward pass (Korthikanti et al. 2022, §4.1 eq. 1, one device).

    Per layer, at e bytes per element: ``s*b*h*(16e + 2) + a*s²*b*(2e + 1)`` — at e = 2 the paper's
    ``34sbh + 5as²b`` (16 tensors of s*b*h in 16 bits, two 1-byte dropout masks; the attention
    softmax, its dropout output and mask). ``attention_scores=false``: a fused kernel (FlashAttention,
    SDPA) recomputes the s² matrix instead of storing it. With checkpointing each layer keeps only
    its input (e*s*b*h) and one layer's full activations exist while it is recomputed. The fp32
    logits of the loss (4*b*s*V) come on top. None for models without transformer blocks.
    """
    if not layout.n_layer or not layout.d_model:
        return None
    e, s, b, h, a = PRECISION_BYTES[precision], seq, batch, layout.d_model, layout.n_head or 1
    per_layer = s * b * h * (16 * e + 2) + (a * s * s * b * (2 * e + 1) if attention_scores else 0)
    layers = layout.n_layer * e * s * b * h + per_layer if checkpointing else layout.n_layer * per_layer
    return float(layers + 4 * b * s * (layout.vocab_size or 0))


def kv_cache_bytes_per_token(layout: Layout, precision: str) -> float | None:
    """2 (K, V) x n_layer x n_kv_heads x head_dim x bytes (vLLM §3): None for encoders."""
    if not layout.causal or not layout.n_layer or not layout.head_dim:
        return None
    return float(2 * layout.n_layer * (layout.n_kv_head or layout.n_head) * layout.head_dim * PRECISION_BYTES[precision])


# ---------------------------------------------------------------------------- totals


@dataclass
class Breakdown:
    """Bytes of one way of fine-tuning (or serving) a model."""

    label: str
    weights: float
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    trainable: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kv_cache

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "kv_cache": self.kv_cache, "total": self.total,
                "trainable_params": self.trainable}


def base_weight_bytes(layout: Layout, quant: dict | None, precision: str, params: float | None = None) -> float:
    """The model's weights with ``quant`` applied to its target Linear layers, everything else
    (embeddings, norms, biases, skipped layers) in ``precision``. ``params``: account for a model
    of that many parameters with this layout's composition (scaled)."""
    rest = (layout.params - layout.linear_params) * PRECISION_BYTES[precision]
    exact = sum(linear_weight_bytes(o, i, quant, precision) for o, i in layout.linears) + rest
    return exact * (params / layout.params if params else 1.0)


def fine_tuning(label: str, layout: Layout, *, tuned: bool, quant: dict | None, precision: str,
                optimizer_bytes: float, master_weights: bool, activations: float | None,
                params: float | None = None) -> Breakdown:
    """Training memory: the (frozen or trained) weights, gradients and optimizer state of what
    trains, activations. ``tuned``: only the tuner's parameters (``layout.trainable``) train; else
    every parameter. QAT trains the float weights (its ``quant`` counts as full precision)."""
    e = PRECISION_BYTES[precision]
    total = float(params or layout.params)
    if tuned:  # the tuner's own parameters + base parameters it may unfreeze (BitFit's biases ...) train
        weights = base_weight_bytes(layout, quant, precision, params) + layout.tuner_params * e
        trainable = float(layout.trainable)
    else:
        trainable = total
        weights = base_weight_bytes(layout, quant, precision, params)
    states = optimizer_bytes + (4 if master_weights and e < 4 else 0)  # an fp32 master copy of trained weights
    return Breakdown(label, weights=weights, gradients=trainable * e, optimizer=trainable * states,
                     activations=activations or 0.0, trainable=trainable)


def optimizer_bytes_per_param(optim: dict | None) -> float:
    """Bytes of optimizer state per trained parameter, from the ``optim`` group: Adam / AdamW keep
    two fp32 moments (8), bitsandbytes' 8-bit Adam two 8-bit ones (2; block-wise, Dettmers et al.
    2022 "8-bit Optimizers"), SGD with momentum one (4) or none (0)."""
    optim = optim or {}
    target = str((optim.get("optimizer") or {}).get("_target_") or optim.get("name") or "adamw")
    low = target.lower()
    if "8bit" in low or "8_bit" in low:
        return 2.0
    if "adam" in low or "lamb" in low:
        return 8.0
    if "lion" in low:  # one momentum
        return 4.0
    if "sgd" in low:
        return 4.0 if ((optim.get("optimizer") or {}).get("momentum") or 0) else 0.0
    raise UserError(f"cannot tell the optimizer-state size of optim {target!r}: pass optimizer_bytes_per_param=N "
                    "(AdamW 8, 8-bit AdamW 2)")
