"""The one place where llmlab builds models (DESIGN.md, "Models by role").

A model is described by a plain dict, the ``model`` config group: ``arch`` names the architecture
(``gpt``, ``bert``, ``t5``, ``elmo``, ``word2vec``, ``glove``), the other keys are the fields of
its config dataclass, plus a few loading options that are not architecture:

- ``init_from``: start from trained weights instead of a fresh init, either a local Hugging Face
  directory (GPT-2, BERT, T5: ``config.json`` + safetensors) or an llmlab checkpoint (a ``.ckpt``
  file, a run dir or its ``checkpoints/`` dir). From an llmlab checkpoint the model config *and the
  tokenizer* come with the weights (:class:`Pretrained`).
- ``allow_bin``: also read ``pytorch_model.bin`` (a pickle, loaded with ``weights_only=True``).
- ``compile``, ``name``: used by the method / only name the preset.

Every file is read without running code from it (safetensors, or ``torch.load(weights_only=True)``).
This module is plain PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmlab.errors import UserError

# keys of the `model` group that are loading options, not fields of an architecture's config
LOADING_KEYS = ("name", "arch", "init_from", "allow_bin", "compile")
TOKENIZER_FILE = "llmlab_tokenizer.json"  # next to config.json in llmlab's HF exports: the tokenizer comes along
# config fields a fine-tuning run may change when it starts from trained weights (no shape change)
RUNTIME_KEYS = ("dropout", "attn_impl", "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate")


@dataclass(frozen=True)
class Arch:
    """How to build one architecture: its config class, constructor and Hugging Face loader."""

    name: str
    module: str  # where the classes live (imported lazily: building a GPT needs no T5 code)
    config_cls: str
    model_cls: str
    presets: str  # the `model=` options describing it (for error messages)
    hf_model_type: str | None = None  # config.json "model_type" of its Hugging Face twin
    hf_context: tuple[str, str] | None = None  # (config field, config.json key) of a context that may be cut short

    def classes(self) -> tuple[type, type]:
        import importlib

        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_cls), getattr(mod, self.model_cls)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("gpt", "llmlab.models.gpt", "GPTConfig", "GPT", "gpt_nano|gpt_micro|gpt2_124m|gpt2_355m", "gpt2",
             hf_context=("block_size", "n_positions")),
        Arch("bert", "llmlab.models.bert", "BertConfig", "Bert", "bert_tiny|bert_base|bert_large|bert_seed", "bert"),
        Arch("t5", "llmlab.models.t5", "T5Config", "T5", "t5_tiny|t5_small|t5_seed", "t5"),
        Arch("elmo", "llmlab.models.elmo", "ElmoConfig", "ElmoBiLM", "elmo_tiny|elmo_seed|elmo_paper"),
        Arch("word2vec", "llmlab.models.word2vec", "Word2VecConfig", "Word2Vec", "word2vec"),
        Arch("glove", "llmlab.models.glove", "GloVeConfig", "GloVe", "glove"),
    )
}


@dataclass
class Pretrained:
    """Weights from somewhere else, with what came along with them."""

    model: nn.Module
    config: dict  # the architecture dict (``arch`` + config fields) that rebuilds ``model``
    source: str  # what was read (a resolved path)
    kind: str  # "hf" | "llmlab"
    tokenizer_state: dict | None = None  # llmlab checkpoints carry their tokenizer


# ---------------------------------------------------------------------------- architecture dicts


def arch_of(model_cfg: dict | None, default: str | None = None) -> Arch:
    name = (model_cfg or {}).get("arch") or default
    if name not in ARCHS:
        raise UserError(f"model.arch={name!r} is not an architecture llmlab builds: choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def model_config(model_cfg: dict, vocab_size: int | None = None, arch: Arch | None = None) -> Any:
    """The config dataclass described by ``model_cfg`` (loading keys dropped); a null
    ``vocab_size`` takes the tokenizer's, which must fit in a set one."""
    arch = arch or arch_of(model_cfg)
    config_cls, _ = arch.classes()
    cfg = {k: v for k, v in (model_cfg or {}).items() if k not in LOADING_KEYS}
    if cfg.get("vocab_size") is None:
        if vocab_size is None:
            raise UserError("model.vocab_size is null and no tokenizer was given: set model.vocab_size")
        cfg["vocab_size"] = int(vocab_size)
    elif vocab_size is not None and cfg["vocab_size"] < vocab_size:
        raise UserError(
            f"model.vocab_size={cfg['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens: "
            "set model.vocab_size=null to take the tokenizer's size"
        )
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:  # a key of another architecture's preset
        raise UserError(f"model.{unknown[0]} is not a field of {config_cls.__name__} (the model group describes "
                        f"another architecture): use model={arch.presets}")
    return config_cls(**cfg)


def config_dict(model: nn.Module, arch: str) -> dict:
    """The architecture dict that rebuilds ``model`` (stored in checkpoints)."""
    return {"arch": arch, **asdict(model.config)}


def build_model(model_cfg: dict, tokenizer: Any = None, *, vocab_size: int | None = None) -> nn.Module:
    """A freshly initialised model of the architecture ``model_cfg`` describes.

    ``tokenizer`` gives the vocabulary size (and, for word vectors, the counts that shape the
    noise table and the Huffman tree).
    """
    arch = arch_of(model_cfg)
    if vocab_size is None and tokenizer is not None:
        vocab_size = tokenizer.vocab_size
    config = model_config(model_cfg, vocab_size, arch)
    _, model_cls = arch.classes()
    if arch.name == "word2vec":
        if tokenizer is None:
            raise UserError("word2vec's model needs the word tokenizer's counts: build it with a tokenizer")
        return model_cls(config, tokenizer.counts)
    if arch.name == "glove":
        return model_cls(config, sparse=False)
    return model_cls(config)


# ---------------------------------------------------------------------------- trained weights


def load_pretrained(source: str | Path, *, arch: str | None = None, overrides: dict | None = None,
                    allow_bin: bool = False, context: int | None = None) -> Pretrained:
    """Weights from a local Hugging Face directory or an llmlab checkpoint / run dir (its trained model).

    ``arch``: the architecture the caller expects (a mismatch is one line naming both).
    ``overrides``: config fields to change that do not change shapes (dropout, attention kernel);
    fields the architecture does not have are ignored. ``context``: a preferred context length; a
    Hugging Face model with a longer one keeps only its first positions (an llmlab model keeps its own).
    """
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf(path, arch, overrides or {}, allow_bin, context)
    from llmlab.checkpoint import find_checkpoint_file

    return _load_llmlab(find_checkpoint_file(path), arch, overrides or {})


def _load_hf(path: Path, expected: str | None, overrides: dict, allow_bin: bool, context: int | None) -> Pretrained:
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / 'config.json'} ({e}): re-export the model with save_pretrained()") from None
    model_type = hf.get("model_type")
    by_type = {a.hf_model_type: a for a in ARCHS.values() if a.hf_model_type}
    arch = by_type.get(model_type)
    if arch is None:
        raise UserError(f"{path} holds a Hugging Face {model_type!r} model: llmlab reads "
                        f"{', '.join(by_type)} directories")
    if expected and expected != arch.name:
        raise UserError(f"{path} is a {model_type} model but this run trains a {expected}: "
                        f"pass a {expected} directory or pick the method that trains {arch.name}")
    config_cls, model_cls = arch.classes()
    known = {f.name for f in fields(config_cls)}
    overrides = {k: v for k, v in overrides.items() if k in known}
    if arch.hf_context and context:
        field_name, hf_key = arch.hf_context
        if isinstance(hf.get(hf_key), int) and context < hf[hf_key]:
            overrides[field_name] = context  # keep the first positions of a longer context
    model = model_cls.from_pretrained(path, allow_bin=allow_bin, **overrides)
    return Pretrained(model, config_dict(model, arch.name), str(path.resolve()), "hf", _hf_tokenizer(path, model))


def _hf_tokenizer(path: Path, model: nn.Module) -> dict | None:
    """The tokenizer state that comes with a Hugging Face directory: llmlab's exports carry theirs;
    otherwise the directory's own tokenizer files (:func:`llmlab.data.hf_tokenizers.tokenizer_state_from_hf_dir`:
    GPT-2's BPE, BERT's WordPiece; T5's SentencePiece cannot be reproduced: None, the tokenizer
    group is used); without any, a GPT-2-sized vocabulary is GPT-2's BPE (llmlab's tiktoken build
    is byte-identical)."""
    own = path / TOKENIZER_FILE
    if own.is_file():
        try:
            return json.loads(own.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {own} ({e}): delete it to pick the tokenizer with tokenizer=...") from None
    from llmlab.data.hf_tokenizers import tokenizer_state_from_hf_dir

    state = tokenizer_state_from_hf_dir(path)
    if state is not None:
        size = 50257 if state.get("name") == "gpt2" else len(state.get("vocab") or ())
        model_size = getattr(model.config, "vocab_size", None)
        if model_size is not None and size > model_size:
            raise UserError(f"the tokenizer of {path} has {size} tokens but its model only {model_size} "
                            "embeddings (config.json vocab_size): the directory mixes two models")
        return state
    if getattr(model.config, "vocab_size", None) == 50257 and hasattr(model.config, "n_embd"):
        return {"name": "gpt2"}
    return None


def _load_llmlab(file: Path, expected: str | None, overrides: dict) -> Pretrained:
    from llmlab.checkpoint import read_checkpoint, role_state_dict, trained_config

    ckpt = read_checkpoint(file)
    meta = ckpt["llmlab"]
    config = trained_config(ckpt)
    arch = arch_of(config)
    if expected and expected != arch.name:
        raise UserError(f"{file} holds a {arch.name} model but this run trains a {expected}: "
                        f"pass a {expected} checkpoint (or drop model.init_from)")
    bad = sorted(set(overrides) - set(RUNTIME_KEYS))
    if bad:
        raise UserError(f"model.{bad[0]} cannot change when starting from {file} (it fixes the architecture): "
                        f"leave it out, or train from scratch")
    config = {**config, **{k: v for k, v in overrides.items() if k in config}}
    from llmlab.data.tokenizers import tokenizer_from_state

    tokenizer = tokenizer_from_state(meta["tokenizer"]) if meta.get("tokenizer") else None
    model = build_model(config, tokenizer)
    if meta.get("quant"):  # a quantized checkpoint (llmlab quantize, QAT): its layers, before its buffers load
        from llmlab.quant import apply_quant

        apply_quant(model, meta["quant"])
    state = role_state_dict(ckpt)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{file}: the weights do not fit the recorded model config ({str(e).splitlines()[0]})") from None
    return Pretrained(model, config, str(file.resolve()), "llmlab", meta.get("tokenizer"))


# ---------------------------------------------------------------------------- identity


def state_hash(model: nn.Module) -> str:
    """sha256 of a model's weights (names, shapes, dtypes and bytes in key order): what a
    checkpoint records of a frozen model it did not store."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def role_record(pretrained: Pretrained) -> dict:
    """What a checkpoint keeps of a frozen model instead of its weights: where it came from and
    the hash of its weights (checked when the checkpoint is loaded)."""
    return {"source": pretrained.source, "kind": pretrained.kind, "config": pretrained.config,
            "sha256": state_hash(pretrained.model)}


def load_role(role: str, record: dict) -> nn.Module:
    """Rebuild a frozen model from its checkpoint record; refuse it if its weights changed."""
    source = record.get("source")
    what = "base model under the tuner" if role == "base" else f"frozen {role!r} model"
    if not source or not Path(source).exists():
        raise UserError(f"the {what} was read from {source}, which no longer exists: "
                        "restore it there (the checkpoint does not store frozen weights)")
    pretrained = load_pretrained(source, arch=(record.get("config") or {}).get("arch"),
                                 overrides=_runtime(record.get("config") or {}))
    digest = state_hash(pretrained.model)
    if record.get("sha256") and digest != record["sha256"]:
        raise UserError(f"the {what} at {source} changed since training (sha256 {digest[:12]}… "
                        f"≠ recorded {record['sha256'][:12]}…): restore the original or retrain")
    return pretrained.model


def _runtime(config: dict) -> dict:
    return {k: config[k] for k in RUNTIME_KEYS if k in config}
