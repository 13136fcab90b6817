"""The tokenizer of a local Hugging Face directory, as an llmlab tokenizer state.

:func:`tokenizer_state_from_hf_dir` reads the tokenizer files next to ``config.json`` and returns
the state :func:`llmlab.data.tokenizers.tokenizer_from_state` turns into the llmlab tokenizer that
gives the same ids, or None when the directory has no tokenizer llmlab can reproduce (the run's
``tokenizer`` config group is used then, as without tokenizer files). Nothing is downloaded and no
code from the directory runs: the files are read as JSON or text.

* **GPT-2** — ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json`` with a BPE model) whose
  vocabulary and merges equal GPT-2's (compared with the files llmlab's ``gpt2`` tokenizer is built
  from, :func:`llmlab.data.tokenizers.gpt2_bpe_files`) → ``{"name": "gpt2"}``. Any other BPE
  (RoBERTa's, a retrained byte-level BPE) is refused with a :class:`UserError`: llmlab's ``gpt2``
  tokenizer is GPT-2's own and general BPE loading is not implemented.
* **BERT WordPiece** — ``vocab.txt`` (+ ``tokenizer_config.json`` / ``special_tokens_map.json``
  for ``do_lower_case``, ``strip_accents``, ``tokenize_chinese_chars`` and the special-token
  texts), or a ``tokenizer.json`` with a WordPiece model, BERT's normaliser and pre-tokeniser (what
  transformers 5 writes) → a ``wordpiece`` state: the vocabulary in id order, so the special ids
  are wherever the file has them (bert-base-uncased: ``[PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102
  [MASK]=103``). Options llmlab's WordPiece cannot reproduce (no basic tokenisation, another
  normaliser, tokens added beyond the five specials) are refused with a :class:`UserError`.
* **T5** — not representable, so None (with a warning). Hugging Face's T5 tokenizer is a
  SentencePiece *Unigram* model (``spiece.model``, or ``tokenizer.json`` with ``"type": "Unigram"``):
  it picks the segmentation of highest total piece log-probability (Viterbi over the piece scores)
  and prepends ``▁`` to the text. llmlab's :class:`~llmlab.data.t5_tokenizer.T5Tokenizer` is a BPE
  model (ranked merges, no scores, no ``▁`` prepended), and no list of merges reproduces a Unigram
  segmentation in general, so its ids would not be the checkpoint's. Reading ``spiece.model`` would
  also need the ``sentencepiece`` / ``protobuf`` packages, which are not dependencies. The run's
  ``tokenizer`` group is used instead, which only makes sense for fine-tuning the weights on a
  fresh vocabulary of the same size.
* No tokenizer files → None.

This module must stay free of Lightning and Hydra imports.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from llmlab.errors import UserError

__all__ = ["tokenizer_state_from_hf_dir"]

log = logging.getLogger(__name__)

GPT2_EOS = "<|endoftext|>"
# the options of Hugging Face's BERT tokenizers that name the special tokens, in the order
# WordPieceTokenizer takes them (pad, unk, cls, sep, mask), with BERT's texts as defaults
_SPECIAL_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def tokenizer_state_from_hf_dir(path: str | Path) -> dict | None:
    """The llmlab tokenizer state of the Hugging Face directory ``path`` (see the module doc);
    None when it has no tokenizer files, or only ones llmlab cannot reproduce (T5's SentencePiece)."""
    path = Path(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = _read_json(path / "vocab.json")
        merges = _read_merges(path / "merges.txt")
        return _gpt2_state(path, vocab, merges, _added_tokens(path, None), _prefix_space(path, None))
    if (path / "vocab.txt").is_file():
        return _wordpiece_from_vocab_txt(path)
    if (path / "tokenizer.json").is_file():
        spec = _read_json(path / "tokenizer.json")
        model = spec.get("model") if isinstance(spec, dict) else None
        kind = model.get("type") if isinstance(model, dict) else None
        if kind == "BPE":
            return _gpt2_state(path, model.get("vocab"), _merge_pairs(model.get("merges"), path / "tokenizer.json"),
                               _added_tokens(path, spec), _prefix_space(path, spec))
        if kind == "WordPiece":
            return _wordpiece_from_tokenizer_json(path, spec)
        what = "a SentencePiece Unigram model (T5's)" if kind == "Unigram" else f"a {kind} model"
        _not_readable(path, f"its tokenizer.json is {what}")
        return None
    sentencepiece = sorted(p.name for p in path.glob("*.model"))
    if sentencepiece:
        _not_readable(path, f"its {sentencepiece[0]} is a SentencePiece model (T5's is a Unigram model)")
    return None


def _not_readable(path: Path, why: str) -> None:
    log.warning("the tokenizer of %s is not used: %s, which llmlab's tokenizers cannot reproduce; the run's "
                "tokenizer group is used, so token ids do not match the pretrained embeddings", path, why)


# ---------------------------------------------------------------------------- reading files


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file} ({e}): re-save the tokenizer with save_pretrained()") from None


def _read_config(path: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json (each optional)."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            data = _read_json(file)
            if not isinstance(data, dict):
                raise UserError(f"{file} is not a JSON object: re-save the tokenizer with save_pretrained()")
            config.update({k: v for k, v in data.items() if v is not None or k not in config})
    return config


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_merges(file: Path) -> list[tuple[str, str]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {file} ({e}): re-save the tokenizer with save_pretrained()") from None
    return _merge_pairs(text.splitlines(), file)


def _merge_pairs(lines: Any, file: Path) -> list[tuple[str, str]]:
    """BPE merges as pairs, from merges.txt lines or tokenizer.json's ``"a b"`` / ``["a", "b"]``."""
    if not isinstance(lines, list):
        raise UserError(f"{file} has no list of BPE merges: re-save the tokenizer with save_pretrained()")
    pairs = []
    for k, line in enumerate(lines):
        if isinstance(line, str):
            if (k == 0 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split()
        else:
            parts = line
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise UserError(f"{file}: merge {k + 1} ({str(line)[:40]!r}) is not a pair of tokens: "
                            "re-save the tokenizer with save_pretrained()")
        pairs.append((parts[0], parts[1]))
    return pairs


def _added_tokens(path: Path, spec: dict | None) -> dict[str, int]:
    """Every token the directory adds to its model's vocabulary: content -> id (tokenizer.json's
    ``added_tokens``, ``added_tokens.json``, tokenizer_config.json's ``added_tokens_decoder``)."""
    out: dict[str, int] = {}
    for entry in (spec or {}).get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            out[entry["content"]] = int(entry.get("id", -1))
    if (path / "added_tokens.json").is_file():
        data = _read_json(path / "added_tokens.json")
        out.update({k: int(v) for k, v in (data.items() if isinstance(data, dict) else ())})
    if (path / "tokenizer_config.json").is_file():
        data = _read_json(path / "tokenizer_config.json")
        decoder = data.get("added_tokens_decoder") if isinstance(data, dict) else None
        for i, entry in (decoder.items() if isinstance(decoder, dict) else ()):
            content = _token_text(entry)
            if content is not None and str(i).lstrip("-").isdigit():
                out[content] = int(i)
    return out


# ---------------------------------------------------------------------------- GPT-2


@functools.lru_cache(maxsize=1)
def _gpt2_reference() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocabulary and merges, from the files llmlab's gpt2 tokenizer is built from."""
    from llmlab.data.tokenizers import gpt2_bpe_files

    files = gpt2_bpe_files()
    return _read_json(files["encoder.json"]), _read_merges(files["vocab.bpe"])


def _prefix_space(path: Path, spec: dict | None) -> bool:
    """Whether the tokenizer puts a space before the text (``add_prefix_space``; GPT-2's does not)."""
    if _read_config(path).get("add_prefix_space") is True:
        return True
    pre = (spec or {}).get("pre_tokenizer")
    parts = (pre.get("pretokenizers") or [pre]) if isinstance(pre, dict) else []
    return any(isinstance(p, dict) and p.get("add_prefix_space") is True for p in parts)


def _gpt2_state(path: Path, vocab: Any, merges: list[tuple[str, str]], added: dict[str, int],
                prefix_space: bool = False) -> dict:
    if not isinstance(vocab, dict):
        raise UserError(f"{path} has no BPE vocabulary (token -> id): re-save the tokenizer with save_pretrained()")
    ref_vocab, ref_merges = _gpt2_reference()
    extra = sorted(t for t, i in added.items() if not (t == GPT2_EOS and i == ref_vocab[GPT2_EOS]))
    if vocab != ref_vocab:
        detail = f"{len(vocab)} tokens, not GPT-2's {len(ref_vocab)}" if len(vocab) != len(ref_vocab) \
            else "other token ids"
    elif merges != ref_merges:
        k = next((k for k, (a, b) in enumerate(zip(merges, ref_merges)) if a != b), min(len(merges), len(ref_merges)))
        detail = f"its merges differ from GPT-2's from merge {k + 1} on"
    elif extra:
        detail = f"it adds {', '.join(repr(t) for t in extra[:3])}"
    else:
        detail = None
    if detail:
        raise UserError(
            f"{path} has a BPE vocabulary that is not GPT-2's ({detail}): llmlab's gpt2 tokenizer is GPT-2's "
            "own and cannot read another vocabulary; start from a GPT-2 directory or an llmlab checkpoint"
        )
    if prefix_space:
        raise UserError(f"{path}'s GPT-2 tokenizer sets add_prefix_space=true (a space before every text), "
                        "which llmlab's gpt2 tokenizer does not do: set it to false in tokenizer_config.json "
                        "and tokenizer.json")
    return {"name": "gpt2"}


# ---------------------------------------------------------------------------- BERT WordPiece


def _special_tokens(config: dict, unk: str | None = None) -> tuple[str, ...]:
    from llmlab.data.mlm import SPECIAL_TOKENS

    texts = [_token_text(config.get(key)) for key in _SPECIAL_KEYS]
    if unk is not None:  # the unknown token the WordPiece model itself emits
        texts[1] = unk
    return tuple(t if t is not None else default for t, default in zip(texts, SPECIAL_TOKENS))


def _check_added(path: Path, vocab: list[str], added: dict[str, int], specials: tuple[str, ...]) -> None:
    extra = sorted(t for t, i in added.items()
                   if t not in specials or not (0 <= i < len(vocab) and vocab[i] == t))
    if extra:
        raise UserError(
            f"{path} adds tokens llmlab's WordPiece does not read ({', '.join(repr(t) for t in extra[:3])}): "
            f"llmlab reads BERT vocabularies whose only added tokens are {', '.join(specials)}"
        )


def _vocabulary_error(path: Path, e: UserError) -> UserError:
    why = str(e).split("; retrain")[0]  # (the advice is for vocabularies llmlab trained)
    return UserError(f"{path}: {why}: re-save the BERT tokenizer with save_pretrained(), or drop model.init_from")


def _check_options(path: Path, lowercase: Any, strip_accents: Any, handle_chinese_chars: Any) -> None:
    if lowercase not in (True, False) or strip_accents not in (None, True, False) \
            or handle_chinese_chars not in (True, False):
        raise UserError(f"{path}: do_lower_case / strip_accents / tokenize_chinese_chars must be true or false "
                        "(strip_accents also null): re-save the tokenizer with save_pretrained()")


def _wordpiece_from_vocab_txt(path: Path) -> dict:
    from llmlab.data.mlm import WordPieceTokenizer

    config = _read_config(path)
    if config.get("do_basic_tokenize") is False:
        raise UserError(f"{path / 'tokenizer_config.json'} sets do_basic_tokenize=false: llmlab's WordPiece "
                        "always splits words and punctuation first (BERT's basic tokenizer)")
    lowercase, strip_accents = config.get("do_lower_case", True), config.get("strip_accents")
    chinese = config.get("tokenize_chinese_chars", True)
    _check_options(path, lowercase, strip_accents, chinese)
    specials = _special_tokens(config)
    try:
        tok = WordPieceTokenizer.from_vocab_file(path / "vocab.txt", lowercase, special_tokens=specials,
                                                 strip_accents=strip_accents, handle_chinese_chars=chinese)
    except UserError as e:
        raise _vocabulary_error(path, e) from None
    _check_added(path, tok.vocab, _added_tokens(path, None), specials)
    return tok.state_dict()


def _wordpiece_from_tokenizer_json(path: Path, spec: dict) -> dict:
    file = path / "tokenizer.json"
    model, norm, pre = spec["model"], spec.get("normalizer"), spec.get("pre_tokenizer")
    by_token = model.get("vocab")
    if not isinstance(by_token, dict) or not by_token:
        raise UserError(f"{file} has no WordPiece vocabulary: re-save the tokenizer with save_pretrained()")
    vocab: list[Any] = [None] * len(by_token)
    for token, i in by_token.items():
        if not isinstance(i, int) or not 0 <= i < len(vocab) or vocab[i] is not None:
            raise UserError(f"{file}: the WordPiece ids are not 0..{len(vocab) - 1}, each once: "
                            "re-save the tokenizer with save_pretrained()")
        vocab[i] = token
    reasons = []
    if model.get("continuing_subword_prefix", "##") != "##":
        reasons.append(f"continuing_subword_prefix={model.get('continuing_subword_prefix')!r}")
    if not isinstance(norm, dict) or norm.get("type") != "BertNormalizer" or norm.get("clean_text") is False:
        reasons.append(f"normalizer {(norm or {}).get('type') if isinstance(norm, dict) else norm!r}")
    if not isinstance(pre, dict) or pre.get("type") != "BertPreTokenizer":
        reasons.append(f"pre-tokenizer {(pre or {}).get('type') if isinstance(pre, dict) else pre!r}")
    if reasons:
        raise UserError(f"{file} is a WordPiece tokenizer llmlab cannot reproduce ({', '.join(reasons)}): "
                        "llmlab's WordPiece is BERT's (BertNormalizer, BertPreTokenizer, ## pieces)")
    lowercase, strip_accents = norm.get("lowercase", True), norm.get("strip_accents")
    chinese = norm.get("handle_chinese_chars", True)
    _check_options(path, lowercase, strip_accents, chinese)
    specials = _special_tokens(_read_config(path), unk=_token_text(model.get("unk_token")))
    _check_added(path, vocab, _added_tokens(path, spec), specials)
    from llmlab.data.mlm import WordPieceTokenizer

    try:
        tok = WordPieceTokenizer(vocab, lowercase, int(model.get("max_input_chars_per_word") or 100),
                                 special_tokens=specials, strip_accents=strip_accents, handle_chinese_chars=chinese)
    except UserError as e:
        raise _vocabulary_error(path, e) from None
    return tok.state_dict()
