"""BERT data: WordPiece (checked against transformers' Python BertTokenizer), MLM masking statistics,
next-sentence pairs (document-aware, balanced, packed), the dynamic-masking collator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab.data.corpora import shakespeare_plays
from llmlab.data.mlm import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    MLMCollator,
    WordPieceTokenizer,
    build_nsp_pairs,
    make_nsp_examples,
    mask_tokens,
    pack_pair,
    split_segments,
    tokenize_documents,
    truncate_pair,
)
from llmlab.errors import UserError


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """A few hundred lines from three plays (speaker lines, verse, punctuation)."""
    out = []
    for _, text in shakespeare_plays()[::13]:
        out += text.splitlines()[:150]
    return out


@pytest.fixture(scope="module")
def wordpiece(lines) -> WordPieceTokenizer:
    return WordPieceTokenizer.train(lines, vocab_size=600)


# ------------------------------------------------------------------------------------------------
# WordPiece
# ------------------------------------------------------------------------------------------------


def test_wordpiece_specials_and_round_trip(wordpiece):
    tok = wordpiece
    assert tok.name == "wordpiece" and tok.vocab_size == 600 and tok.eos_id is None
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID]
    for text in ["the king is dead, long live the king!", "what say you, my lord?", "good night, sweet prince."]:
        ids = tok.encode(text)
        assert ids and min(ids) >= 5  # plain text never produces a special id
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("The KING")) == "the king"  # uncased
    pieces = tok.tokenize("unfoldeth")
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:])  # a rare word in pieces
    assert tok.encode("the [MASK] is dead") [1] == MASK_ID  # a prompt may contain [MASK]
    assert tok.encode("☃") == [UNK_ID]  # an unseen character
    assert tok.decode([CLS_ID, *tok.encode("hello"), SEP_ID], skip_special_tokens=True) == "hello"
    assert tok.decode([10_000]) == "[UNK]"


def test_wordpiece_state_round_trip(wordpiece, lines):
    state = json.loads(json.dumps(wordpiece.state_dict()))  # plain data: survives JSON
    again = WordPieceTokenizer.from_state(state)
    assert again.vocab == wordpiece.vocab and again.fingerprint == wordpiece.fingerprint
    assert again.encode_batch(lines) == wordpiece.encode_batch(lines)
    assert [wordpiece.encode(x) for x in lines[:50]] == wordpiece.encode_batch(lines[:50])
    with pytest.raises(UserError, match="WordPiece"):
        WordPieceTokenizer.from_state({"name": "wordpiece", "vocab": ["a", "b"]})
    with pytest.raises(UserError, match="WordPiece"):
        WordPieceTokenizer.from_state({"name": "char"})


def test_wordpiece_training_is_deterministic(wordpiece, lines):
    """tokenizers' own WordPieceTrainer is not (huggingface/tokenizers#1794); ours must be."""
    assert WordPieceTokenizer.train(lines, vocab_size=600).vocab == wordpiece.vocab
    with pytest.raises(UserError, match="empty corpus"):
        WordPieceTokenizer.train(["", "   "])


def test_wordpiece_encodes_like_transformers_python_bert_tokenizer(wordpiece, lines, tmp_path):
    """Google's BasicTokenizer + greedy longest-match-first WordPiece, as transformers' pure-Python
    BertTokenizer implements them, give the same ids with our vocabulary."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "BertTokenizerLegacy", None)
    if cls is None or "Python" not in " ".join(c.__name__ for c in cls.__mro__):
        pytest.skip("no pure-Python BertTokenizer in this transformers version")
    wordpiece.save_vocab(tmp_path / "vocab.txt")
    ref = cls(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    extra = ["Café naïve résumé", "don't stop-believing!!", "日本語 text", "tab\there\u0000", "the [MASK] of it"]
    for text in lines + extra:
        assert wordpiece.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_wordpiece_vocabulary_close_to_tokenizers_trainer(wordpiece, lines):
    """Same algorithm as tokenizers' WordPieceTrainer up to its tie-breaking: nearly the same vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    ref = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    ref.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    ref.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    ref.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=600, min_frequency=2, show_progress=False,
                                                             special_tokens=list(SPECIAL_TOKENS)))
    a, b = set(ref.get_vocab()), set(wordpiece.vocab)
    assert len(a & b) / len(a | b) > 0.9
    same = sum(ref.encode(x).tokens == wordpiece.tokenize(x) for x in lines) / len(lines)
    assert same > 0.8


def test_corpus_encoding_treats_special_text_as_text(wordpiece):
    stream = wordpiece.encode_documents(["the [MASK] here", "and [SEP] there"])
    assert MASK_ID not in stream.tolist() and SEP_ID not in stream.tolist()
    docs = tokenize_documents(wordpiece, ["the [MASK] here\n\nand [CLS] there", "x"])
    assert not {MASK_ID, CLS_ID} & {t for seg in docs[0] for t in seg}
    assert wordpiece.encode("[MASK]") == [MASK_ID]  # the setting is restored afterwards
    assert wordpiece.encode_batch(["a [MASK]"]) == [wordpiece.encode("a [MASK]")]


# ------------------------------------------------------------------------------------------------
# Masking
# ------------------------------------------------------------------------------------------------

V = 1000
SPECIALS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)


def packed_batch(n: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[CLS] a [SEP] b [SEP] [PAD]...`` of random lengths, with their special-token mask."""
    g = torch.Generator().manual_seed(seed)
    ids, special = torch.full((n, T), PAD_ID), torch.ones(n, T, dtype=torch.bool)
    for r in range(n):
        length = int(torch.randint(max(5, T // 2), T + 1, (1,), generator=g))
        cut = int(torch.randint(2, length - 2, (1,), generator=g))
        ids[r, :length] = torch.randint(5, V, (length,), generator=g)
        ids[r, 0], ids[r, cut], ids[r, length - 1] = CLS_ID, SEP_ID, SEP_ID
        special[r, :length] = False
        special[r, [0, cut, length - 1]] = True
    return ids, special


def within(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def masked():
    ids, special = packed_batch(3000, 64)
    inputs, labels = mask_tokens(ids, special, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(1))
    return ids, special, inputs, labels


def test_mask_fraction_and_80_10_10_split(masked):
    ids, special, inputs, labels = masked
    selected = labels != -100
    n_maskable = int((~special).sum())
    assert within(selected.sum().item() / n_maskable, 0.15, n_maskable)
    n_sel = int(selected.sum())
    to_mask = (inputs == MASK_ID) & selected
    kept = (inputs == ids) & selected
    replaced = selected & ~to_mask & ~kept
    assert within(to_mask.sum().item() / n_sel, 0.8, n_sel)
    # a random draw can hit the original token (p = 1/995): "kept" gains that sliver
    assert within(replaced.sum().item() / n_sel, 0.1 * (1 - 1 / 995), n_sel)
    assert within(kept.sum().item() / n_sel, 0.1 + 0.1 / 995, n_sel)


def test_mask_never_touches_specials_or_padding(masked):
    ids, special, inputs, labels = masked
    assert torch.equal(inputs[special], ids[special])  # [CLS], [SEP], [PAD] untouched ...
    assert (labels[special] == -100).all()  # ... and never predicted
    assert torch.equal(inputs[labels == -100], ids[labels == -100])  # only selected positions change
    assert torch.equal(labels[labels != -100], ids[labels != -100])  # labels are the original ids
    replaced = (labels != -100) & (inputs != ids) & (inputs != MASK_ID)
    assert replaced.sum() > 1000
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any()  # random ids are never special
    assert inputs[replaced].min() >= 5 and inputs[replaced].max() < V
    # the random ids cover the vocabulary: no id range is left out
    assert torch.unique(inputs[replaced] // 100).numel() == 10


def test_mask_at_least_one_per_sequence_and_cap():
    ids, special = packed_batch(2000, 8, seed=3)  # 2-5 maskable tokens: many rows would draw none
    inputs, labels = mask_tokens(ids, special, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(0))
    assert ((labels != -100).sum(1) >= 1).all()
    ids, special = packed_batch(500, 128, seed=4)
    _, labels = mask_tokens(ids, special, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(0),
                            mlm_probability=0.5, max_predictions=20)
    counts = (labels != -100).sum(1)
    assert counts.max() == 20 and (counts >= 1).all()
    assert (labels[:, :64] != -100).sum() > 0.3 * (labels != -100).sum()  # the kept subset spans the row


def test_mask_exact_count_like_google():
    ids, special = packed_batch(400, 64, seed=5)
    _, labels = mask_tokens(ids, special, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(0),
                            exact=True, max_predictions=8)
    n = (~special).sum(1).double()
    want = torch.clamp(torch.round(n * 0.15), min=1).clamp(max=8)
    assert torch.equal((labels != -100).sum(1).double(), want)


def test_mask_without_special_mask_uses_special_ids_and_is_seeded():
    ids, special = packed_batch(50, 32, seed=6)
    a = mask_tokens(ids, None, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the specials are found by id
    c = mask_tokens(ids, None, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(8))
    assert not torch.equal(a[1], c[1])
    original = ids.clone()
    mask_tokens(ids, None, V, MASK_ID, SPECIALS, torch.Generator().manual_seed(7))
    assert torch.equal(ids, original)  # the input is not modified
    with pytest.raises(UserError):
        mask_tokens(ids, None, V, MASK_ID, SPECIALS, mlm_probability=0.0)
    with pytest.raises(UserError, match="special"):
        mask_tokens(ids, None, 5, MASK_ID, SPECIALS)


# ------------------------------------------------------------------------------------------------
# Next-sentence pairs
# ------------------------------------------------------------------------------------------------


def synthetic_documents(n_docs: int = 40, seed: int = 0, max_segments: int = 40
                        ) -> tuple[list[list[list[int]]], dict[int, tuple[int, int]]]:
    """Documents of segments whose ids are unique and consecutive: id -> (document, position in it)."""
    g = torch.Generator().manual_seed(seed)
    docs, where, next_id = [], {}, 5
    for d in range(n_docs):
        segs, pos = [], 0
        for _ in range(int(torch.randint(3, max_segments, (1,), generator=g))):
            length = int(torch.randint(1, 25, (1,), generator=g))
            seg = list(range(next_id, next_id + length))
            for t in seg:
                where[t] = (d, pos)
                pos += 1
            next_id += length
            segs.append(seg)
        docs.append(segs)
    return docs, where


def test_nsp_labels_balanced_and_negatives_from_other_documents():
    docs, where = synthetic_documents(n_docs=6, max_segments=300)  # few documents: a same-document
    examples = make_nsp_examples(docs, max_seq_len=32, seed=0)  # "negative" would be drawn often
    n = len(examples)
    assert n > 200
    frac_next = sum(e.next_sentence_label == 0 for e in examples) / n
    assert abs(frac_next - 0.5) <= 3 * math.sqrt(0.25 / n)
    for e in examples:
        assert e.tokens_a and e.tokens_b and len(e.tokens_a) + len(e.tokens_b) <= 29
        da = {where[t][0] for t in e.tokens_a}
        db = {where[t][0] for t in e.tokens_b}
        assert da == {e.doc_a} and db == {e.doc_b}  # each side is one document's text
        pos_a = [where[t][1] for t in e.tokens_a]
        pos_b = [where[t][1] for t in e.tokens_b]
        assert pos_a == list(range(pos_a[0], pos_a[0] + len(pos_a)))  # contiguous spans
        assert pos_b == list(range(pos_b[0], pos_b[0] + len(pos_b)))
        if e.next_sentence_label == 0:
            assert e.doc_b == e.doc_a and pos_b[0] == pos_a[-1] + 1  # B really follows A
        else:
            assert e.doc_b != e.doc_a
    # negatives are spread over the other documents
    assert len({e.doc_b for e in examples if e.next_sentence_label == 1}) == len(docs)


def test_nsp_pairs_cover_documents_and_are_deterministic():
    docs, where = synthetic_documents(seed=1)
    a = make_nsp_examples(docs, 64, seed=3)
    assert a == make_nsp_examples(docs, 64, seed=3)
    assert a != make_nsp_examples(docs, 64, seed=4)
    used = {t for e in a for t in e.tokens_a}
    total = sum(len(s) for d in docs for s in d)
    assert len(used) > 0.5 * total  # A sides walk through the documents


def test_nsp_packing_layout():
    docs, _ = synthetic_documents(seed=2)
    L = 40
    pairs = build_nsp_pairs(docs, L, seed=0)
    n = pairs["input_ids"].shape[0]
    for key in ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask"):
        assert pairs[key].shape == (n, L), key
    assert pairs["next_sentence_label"].shape == (n,) and pairs["special_tokens_mask"].dtype == torch.bool
    examples = make_nsp_examples(docs, L, seed=0)
    for r in range(n):
        ids, tt = pairs["input_ids"][r].tolist(), pairs["token_type_ids"][r].tolist()
        am, sm = pairs["attention_mask"][r].tolist(), pairs["special_tokens_mask"][r].tolist()
        a, b = examples[r].tokens_a, examples[r].tokens_b
        k = len(a) + len(b) + 3
        assert ids[:k] == [CLS_ID, *a, SEP_ID, *b, SEP_ID] and ids[k:] == [PAD_ID] * (L - k)
        assert tt == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (L - k)
        assert am == [1] * k + [0] * (L - k)
        assert sm == [int(i in (CLS_ID, SEP_ID, PAD_ID)) for i in ids]
        assert pairs["next_sentence_label"][r] == examples[r].next_sentence_label


def test_truncate_pair_keeps_the_seam():
    a, b = list(range(10)), list(range(100, 130))
    ta, tb = truncate_pair(a, b, 20)
    assert len(ta) + len(tb) == 20 and ta == a[-len(ta):] and tb == b[: len(tb)]
    assert truncate_pair([1, 2], [3], 10) == ([1, 2], [3])
    row = pack_pair(list(range(5, 40)), list(range(40, 80)), 16)
    assert len(row["input_ids"]) == 16 and row["input_ids"][0] == CLS_ID and row["input_ids"][-1] == SEP_ID


def test_nsp_errors():
    docs, _ = synthetic_documents(n_docs=1)
    with pytest.raises(UserError, match="2 non-empty documents"):
        make_nsp_examples(docs, 32)
    with pytest.raises(UserError, match="max_seq_len"):
        make_nsp_examples(synthetic_documents()[0], 4)


def test_shakespeare_pairs_end_to_end(wordpiece):
    plays = [text[:20_000] for _, text in shakespeare_plays()[:4]]
    assert len(split_segments(plays[0])) > 20 and all(s for s in split_segments(plays[0]))
    docs = tokenize_documents(wordpiece, plays)
    assert len(docs) == 4 and all(all(seg) for d in docs for seg in d)
    pairs = build_nsp_pairs(docs, 64, seed=0)
    labels = pairs["next_sentence_label"]
    neg = labels == 1
    assert (pairs["doc_a"][neg] != pairs["doc_b"][neg]).all()
    assert (pairs["doc_a"][~neg] == pairs["doc_b"][~neg]).all()
    assert abs(labels.float().mean().item() - 0.5) <= 3 * math.sqrt(0.25 / len(labels))
    for r in range(5):  # segment A is a run of its play's own tokens
        row = pairs["input_ids"][r]
        a = row[1: int((row == SEP_ID).nonzero()[0])].tolist()
        stream = [t for seg in docs[int(pairs["doc_a"][r])] for t in seg]
        assert any(stream[i: i + len(a)] == a for i in range(len(stream) - len(a) + 1))


# ------------------------------------------------------------------------------------------------
# Collator (dynamic masking) into the model
# ------------------------------------------------------------------------------------------------


def test_collator_masks_dynamically_and_feeds_bert():
    from llmlab.models.bert import Bert, BertConfig

    docs, _ = synthetic_documents(seed=5)
    vocab = 5 + sum(len(s) for d in docs for s in d)
    pairs = build_nsp_pairs(docs, 32, seed=0)
    rows = [{k: v[i] for k, v in pairs.items() if k not in ("doc_a", "doc_b")} for i in range(16)]
    collate = MLMCollator(vocab, max_predictions=5, seed=0)
    first, second = collate(rows), collate(rows)
    assert not torch.equal(first["labels"], second["labels"])  # new masks on every call
    assert torch.equal(MLMCollator(vocab, max_predictions=5, seed=0)(rows)["labels"], first["labels"])
    assert ((first["labels"] != -100).sum(1) <= 5).all()
    torch.manual_seed(0)
    model = Bert(BertConfig.from_preset("bert_tiny", vocab_size=vocab, num_hidden_layers=1)).eval()
    with torch.no_grad():
        out = model(first["input_ids"], first["attention_mask"], first["token_type_ids"],
                    labels=first["labels"], next_sentence_label=first["next_sentence_label"])
    assert abs(out.mlm_loss.item() - math.log(vocab)) < 0.3 and abs(out.nsp_loss.item() - math.log(2)) < 0.1
