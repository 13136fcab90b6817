"""Tokenizers of local Hugging Face directories (``model.init_from=DIR``): GPT-2's BPE is llmlab's
gpt2 tokenizer, BERT's WordPiece becomes a ``wordpiece`` state with the file's special ids (parity
with transformers' BertTokenizer), T5's SentencePiece is left to the tokenizer group."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from llmlab.data.hf_tokenizers import tokenizer_state_from_hf_dir
from llmlab.data.mlm import (
    SPECIAL_TOKENS,
    MLMCollator,
    WordPieceTokenizer,
    build_nsp_pairs,
    mask_tokens,
    tokenize_documents,
)
from llmlab.data.tokenizers import gpt2_bpe_files, tokenizer_from_state
from llmlab.errors import UserError
from llmlab.models.build import _hf_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def model_with(vocab_size: int, **config):
    """What _hf_tokenizer looks at of a model: its config."""
    return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab_size, **config))


# ------------------------------------------------------------------------------------------------
# GPT-2
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """vocab.json + merges.txt as in a Hugging Face GPT-2 directory (OpenAI's files, byte-identical)."""
    d = tmp_path_factory.mktemp("gpt2")
    files = gpt2_bpe_files()
    shutil.copy(files["encoder.json"], d / "vocab.json")
    shutil.copy(files["vocab.bpe"], d / "merges.txt")
    return d


def test_gpt2_files_are_llmlabs_gpt2(gpt2_dir, tmp_path):
    assert tokenizer_state_from_hf_dir(gpt2_dir) == {"name": "gpt2"}
    # transformers' own save (transformers 5 writes tokenizer.json only): the same vocabulary and merges
    saved = tmp_path / "saved"
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    hf.save_pretrained(str(saved))
    for name in ("vocab.json", "merges.txt"):
        (saved / name).unlink(missing_ok=True)
    assert (saved / "tokenizer.json").is_file()
    assert tokenizer_state_from_hf_dir(saved) == {"name": "gpt2"}
    # reformatted JSON is still GPT-2's vocabulary
    again = tmp_path / "reformatted"
    again.mkdir()
    vocab = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))
    (again / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False), encoding="utf-8")
    shutil.copy(gpt2_dir / "merges.txt", again / "merges.txt")
    state = tokenizer_state_from_hf_dir(again)
    assert state == {"name": "gpt2"}
    text = "Hello world, naïve café"
    assert tokenizer_from_state(state).encode(text) == hf.encode(text)


def test_another_bpe_is_refused_in_one_line(gpt2_dir, tmp_path):
    merges = (gpt2_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[1], merges[2] = merges[2], merges[1]  # other merge ranks: another tokenizer
    (tmp_path / "vocab.json").write_bytes((gpt2_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="not GPT-2's") as e:
        tokenizer_state_from_hf_dir(tmp_path)
    assert "\n" not in str(e.value) and "gpt2 tokenizer is GPT-2's" in str(e.value)


def test_a_trained_byte_level_bpe_tokenizer_json_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["to be or not to be, that is the question"] * 3,
                            trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="not GPT-2's"):
        tokenizer_state_from_hf_dir(tmp_path)


def test_gpt2_with_added_tokens_or_prefix_space_is_refused(gpt2_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 50256, "<pad>": 50257}))
    with pytest.raises(UserError, match="<pad>"):
        tokenizer_state_from_hf_dir(tmp_path)
    (tmp_path / "added_tokens.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True}))
    with pytest.raises(UserError, match="add_prefix_space"):
        tokenizer_state_from_hf_dir(tmp_path)


# ------------------------------------------------------------------------------------------------
# BERT WordPiece
# ------------------------------------------------------------------------------------------------

# bert-base-uncased's layout: [PAD]=0, [unused0..98]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103
WORDS = ["!", "'", ",", "-", ".", "?", "the", "quick", "brown", "fox", "jump", "##s", "##ed", "##ing", "over",
         "lazy", "dog", "cafe", "naive", "un", "##know", "##n", "t", "don", "a", "to", "be", "or", "not", "日",
         "本", "##x", "x", "##y", "The", "Café", "JUMP", "Dog", "##S"]
VOCAB = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         *(f"[unused{i}]" for i in range(99, 105)), *WORDS]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK Brown FOX JUMPED!",
    "Café naïve — an unknownword, unknown?",
    "don't jump to be, or not to be?",
    "the [MASK] dog jumping",
    "tab\there  日本語 x xy xyz",
    "JUMPS Dogs",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return d / "vocab.txt"


def bert_dir(root, vocab_file, lowercase: bool, fast: bool):
    """A BERT tokenizer directory as transformers writes it: the legacy Python tokenizer writes
    vocab.txt + tokenizer_config.json, the (tokenizers-backed) BertTokenizer writes tokenizer.json."""
    out = root / f"{'fast' if fast else 'legacy'}-{'uncased' if lowercase else 'cased'}"
    if fast:
        ref = transformers.BertTokenizer(vocab=str(vocab_file), do_lower_case=lowercase)
    else:
        cls = getattr(transformers, "BertTokenizerLegacy", None)
        if cls is None:  # transformers 4: BertTokenizer is the Python one
            cls = transformers.BertTokenizer
        ref = cls(vocab_file=str(vocab_file), do_lower_case=lowercase)
    ref.save_pretrained(str(out))
    return out, ref


@pytest.mark.parametrize("fast", [False, True], ids=["vocab.txt", "tokenizer.json"])
@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_wordpiece_from_hf_dir_gives_transformers_ids(tmp_path, vocab_file, lowercase, fast):
    d, ref = bert_dir(tmp_path, vocab_file, lowercase, fast)
    assert (d / ("tokenizer.json" if fast else "vocab.txt")).is_file()
    state = tokenizer_state_from_hf_dir(d)
    assert state["name"] == "wordpiece" and state["vocab"] == VOCAB and state["lowercase"] is lowercase
    tok = tokenizer_from_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == len(VOCAB)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.special_ids == (0, 100, 101, 102, 103)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (
        ref.pad_token_id, ref.unk_token_id, ref.cls_token_id, ref.sep_token_id, ref.mask_token_id)
    reread = transformers.AutoTokenizer.from_pretrained(str(d))  # the directory, as transformers reads it
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False) == reread.encode(text, add_special_tokens=False), text
        assert [tok.cls_id, *ids, tok.sep_id] == ref.encode(text), text
    assert tok.unk_id in tok.encode("unknownword zebra")  # the unknown word is [UNK] = 100
    assert tok.encode("the [MASK]")[-1] == 103
    assert tok.decode([101, *tok.encode("the lazy dog"), 102, 0], skip_special_tokens=True) == "the lazy dog"
    assert tok.decode([5000]) == "[UNK]" and tok.token_to_id("zebra") == 100


def test_wordpiece_from_vocab_file_and_state_round_trip(vocab_file):
    tok = WordPieceTokenizer.from_vocab_file(vocab_file, lowercase=False)
    assert tok.vocab == VOCAB and tok.lowercase is False and tok.mask_id == 103
    state = tok.state_dict()
    assert "special_tokens" not in state  # BERT's texts: nothing extra stored
    again = WordPieceTokenizer.from_state(json.loads(json.dumps(state)))
    assert again.state_dict() == state and again.fingerprint == tok.fingerprint
    assert [again.encode(t) for t in SENTENCES] == [tok.encode(t) for t in SENTENCES]
    # normaliser options and other special-token texts travel in the state
    other = ["<pad>", "<unk>", "<cls>", "<sep>", "<mask>"]
    vocab = ["a", *other, "b", "##c"]
    tok = WordPieceTokenizer(vocab, strip_accents=False, handle_chinese_chars=False, special_tokens=other)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (1, 2, 3, 4, 5)
    state = tok.state_dict()
    assert state["special_tokens"] == other and state["strip_accents"] is False
    assert state["handle_chinese_chars"] is False
    again = WordPieceTokenizer.from_state(json.loads(json.dumps(state)))
    assert again.state_dict() == state and again.encode("bc zz <mask>") == [6, 7, 2, 5]
    with pytest.raises(UserError, match=r"\[MASK\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])


def test_old_wordpiece_states_load_identically():
    """States written before the special ids were looked up (ids 0-4 fixed) load as before: the
    same ids, the same state and fingerprint (so checkpoints and token caches stay valid)."""
    trained = WordPieceTokenizer.train(["the cat sat on the mat", "the dog sat on the log"] * 5, vocab_size=60)
    old = {"name": "wordpiece", "vocab": trained.vocab, "lowercase": True, "max_input_chars_per_word": 100}
    assert trained.state_dict() == old  # what llmlab trains still saves exactly the old keys
    tok = tokenizer_from_state(old)
    assert tok.state_dict() == old and tok.fingerprint == trained.fingerprint
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab[:5] == list(SPECIAL_TOKENS) and tok.special_ids == (0, 1, 2, 3, 4)
    minimal = tokenizer_from_state({"name": "wordpiece", "vocab": trained.vocab})  # the oldest keys
    assert minimal.encode("the cat [MASK] zz") == tok.encode("the cat [MASK] zz")


@pytest.mark.parametrize("config, match", [
    ({"do_basic_tokenize": False}, "do_basic_tokenize"),
    ({"added_tokens_decoder": {"200": {"content": "[E1]", "special": True}}}, r"\[E1\]"),
    ({"mask_token": "<mask>"}, "<mask>"),
    ({"do_lower_case": "yes"}, "do_lower_case"),
])
def test_wordpiece_options_llmlab_cannot_reproduce_are_refused(tmp_path, vocab_file, config, match):
    shutil.copy(vocab_file, tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=match) as e:
        tokenizer_state_from_hf_dir(tmp_path)
    assert "\n" not in str(e.value)


def test_wordpiece_tokenizer_json_with_another_normalizer_is_refused(tmp_path, vocab_file):
    d, _ = bert_dir(tmp_path, vocab_file, True, fast=True)
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Lowercase"}
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(UserError, match="Lowercase"):
        tokenizer_state_from_hf_dir(d)


# ------------------------------------------------------------------------------------------------
# Masking with the special ids where the vocabulary has them
# ------------------------------------------------------------------------------------------------


def test_masking_never_touches_non_contiguous_specials(vocab_file):
    tok = WordPieceTokenizer.from_vocab_file(vocab_file)
    docs = tokenize_documents(tok, ["\n".join(SENTENCES), "\n".join(reversed(SENTENCES)), "the lazy dog\nx y"])
    assert any(tok.unk_id in seg for doc in docs for seg in doc)  # [UNK]=100 occurs in the text
    rows = build_nsp_pairs(docs, 24, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id, seed=0,
                           short_seq_prob=0.5)  # short pairs: padding too
    ids = rows["input_ids"].repeat(200, 1)
    special_positions = torch.isin(ids, torch.tensor(tok.special_ids))
    assert (ids[:, 0] == 101).all() and (ids == 102).any() and (ids == 0).any()
    for special_mask in (rows["special_tokens_mask"].repeat(200, 1), None):  # by position or by id
        inputs, labels = mask_tokens(ids, special_mask, tok.vocab_size, tok.mask_id, tok.special_ids,
                                     torch.Generator().manual_seed(0), mlm_probability=0.3)
        assert (labels[special_positions] == -100).all()  # a special is never selected ...
        assert torch.equal(inputs[special_positions], ids[special_positions])  # ... nor changed
        replaced = (labels != -100) & (inputs != ids) & (inputs != tok.mask_id)
        assert replaced.sum() > 200
        assert not torch.isin(inputs[replaced], torch.tensor(tok.special_ids)).any()  # never drawn
        drawn = torch.unique(inputs[replaced])
        assert (drawn < 100).any() and (drawn > 103).any()  # ids on both sides of the specials are drawn
    # the collator and the datamodule take the tokenizer's ids
    collator = MLMCollator.for_tokenizer(tok, seed=1)
    assert (collator.mask_id, collator.special_ids, collator.vocab_size) == (103, (0, 100, 101, 102, 103), len(VOCAB))
    batch = collator([{k: rows[k][i] for k in ("input_ids", "special_tokens_mask")}
                      for i in range(len(rows["input_ids"]))])
    sel = batch["labels"] != -100
    assert sel.any() and not torch.isin(rows["input_ids"][sel], torch.tensor(tok.special_ids)).any()

    from llmlab.data.bert_data import BertDataModule

    dm = BertDataModule(corpus="text", path=str(vocab_file), max_seq_len=24, mlm_probability=0.3)
    dm.tokenizer = tok
    inputs, labels = dm.mask({"input_ids": ids, "special_tokens_mask": rows["special_tokens_mask"].repeat(200, 1)},
                             torch.Generator().manual_seed(3))
    assert (labels[special_positions] == -100).all() and torch.equal(inputs[special_positions], ids[special_positions])


# ------------------------------------------------------------------------------------------------
# T5, no files, and the model builder
# ------------------------------------------------------------------------------------------------


def test_t5_sentencepiece_is_left_to_the_tokenizer_group(tmp_path, caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers

    (tmp_path / "spiece.model").write_bytes(b"\x0a\x0b not parsed")
    with caplog.at_level("WARNING"):
        assert tokenizer_state_from_hf_dir(tmp_path) is None
    assert "SentencePiece" in caplog.text
    # transformers 5 writes T5's tokenizer as tokenizer.json with a Unigram model
    unigram = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("a", -2.0)],
                                       unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_state_from_hf_dir(tmp_path) is None
    assert _hf_tokenizer(tmp_path, model_with(5, d_model=8)) is None  # the tokenizer group decides


def test_no_tokenizer_files_is_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert tokenizer_state_from_hf_dir(tmp_path) is None
    assert _hf_tokenizer(tmp_path, model_with(30522, hidden_size=8)) is None
    assert _hf_tokenizer(tmp_path, model_with(50257, n_embd=8)) == {"name": "gpt2"}  # GPT-2-sized, as before


def test_hf_tokenizer_reads_the_directory_after_llmlabs_own_export(tmp_path, vocab_file, gpt2_dir):
    d, _ = bert_dir(tmp_path, vocab_file, True, fast=False)
    state = _hf_tokenizer(d, model_with(len(VOCAB), hidden_size=8))
    assert state["name"] == "wordpiece" and tokenizer_from_state(state).mask_id == 103
    with pytest.raises(UserError, match="vocab_size"):  # more tokens than the model has embeddings
        _hf_tokenizer(d, model_with(100, hidden_size=8))
    own = {"name": "char", "chars": "abc", "unk": True}
    (d / "llmlab_tokenizer.json").write_text(json.dumps(own))
    assert _hf_tokenizer(d, model_with(len(VOCAB), hidden_size=8)) == own  # llmlab's export comes first
    assert _hf_tokenizer(gpt2_dir, model_with(50257, n_embd=8)) == {"name": "gpt2"}


def test_init_from_a_hf_bert_dir_brings_its_tokenizer(tmp_path, vocab_file):
    from llmlab.models.build import load_pretrained

    d, _ = bert_dir(tmp_path, vocab_file, True, fast=True)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertForPreTraining(cfg).save_pretrained(str(d))
    pretrained = load_pretrained(d, arch="bert")
    tok = tokenizer_from_state(pretrained.tokenizer_state)
    assert tok.name == "wordpiece" and tok.vocab == VOCAB and tok.cls_id == 101
