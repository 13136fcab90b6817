"""T5 data: the locally trained T5 vocabulary (specials, sentinels on top in HF's descending order,
lossless round trip, state round trip, literal sentinels in prompts) and the span-corruption
datamodule (inputs fill input_length exactly, uncorrupt() restores every chunk, evaluation noise is
fixed, training noise changes every epoch, one-line errors for bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.data.span_corruption import NUM_SENTINELS, compute_input_and_target_lengths, uncorrupt
from llmlab.data.t5_data import T5DataModule
from llmlab.data.t5_tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, T5Tokenizer
from llmlab.data.tokenizers import CharTokenizer, build_tokenizer, tokenizer_from_state
from llmlab.errors import UserError
from llmlab.nn.losses import IGNORE_INDEX

VOCAB = 600
INPUT_LENGTH = 32


@pytest.fixture(scope="module")
def docs(small_corpus) -> list[str]:
    text = Path(small_corpus).read_text(encoding="utf-8")
    half = len(text) // 2
    return [text[:half], text[half:]]


@pytest.fixture(scope="module")
def tok(docs) -> T5Tokenizer:
    return build_tokenizer("t5", docs, vocab_size=VOCAB)


def make_dm(docs, tok, **kw) -> T5DataModule:
    args = dict(input_length=INPUT_LENGTH, batch_size=4, eval_batch_size=8, corpus="text", path="unused", seed=7)
    dm = T5DataModule(**{**args, **kw})
    dm._docs = docs  # what documents() would read from data.path
    dm.tokenizer = tok
    dm.setup()
    return dm


# ---------------------------------------------------------------------------- tokenizer
def test_special_ids_and_sentinels_on_top(tok):
    V = tok.vocab_size
    assert V == VOCAB  # the corpus has enough text for every requested piece
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert tuple(tok.vocab[:3]) == SPECIAL_TOKENS == ("<pad>", "</s>", "<unk>")
    # Hugging Face's layout: <extra_id_0> is the last id, <extra_id_99> = vocab_size - 100
    assert tok.encode("<extra_id_0>") == [V - 1]
    assert tok.encode("<extra_id_99>") == [V - NUM_SENTINELS]
    assert [tok.sentinel_id(i) for i in (0, 1, 99)] == [V - 1, V - 2, V - 100]
    assert tok.decode([V - 1, V - 2]) == "<extra_id_0> <extra_id_1>"
    assert len(tok.pieces) == V - 3 - NUM_SENTINELS
    assert not any(p.startswith("<extra_id") for p in tok.pieces)
    # corpus text never produces a sentinel or a special id (except <unk> for unseen characters)
    stream = np.asarray(tok.encode_documents(["To be, or not to be: that is the question."]))
    assert stream.max() < V - NUM_SENTINELS and stream.min() > UNK_ID


def test_round_trip_is_lossless(tok, docs):
    for text in (docs[0][:3000], docs[1][-3000:], "  two  spaces,\n\nnew\nlines and  trailing  ", "x"):
        assert tok.decode(tok.encode(text)) == text
    assert "<unk>" in tok.decode(tok.encode("snow ☃ man"))  # a character the corpus never had


def test_documents_join_with_a_blank_line_not_eos(tok, docs):
    stream = tok.encode_documents(docs)
    assert stream.dtype == np.uint16
    assert stream.tolist() == tok.encode("\n\n".join(docs))  # batch encoding = encoding the whole text
    assert EOS_ID not in stream.tolist()  # a span never contains EOS (generation would stop there)


def test_training_is_deterministic_and_state_round_trips(tok, docs):
    again = T5Tokenizer.train(docs, vocab_size=VOCAB)
    assert again.state_dict() == tok.state_dict()
    state = json.loads(json.dumps(tok.state_dict()))  # plain data, as stored in checkpoints
    back = tokenizer_from_state(state)
    assert isinstance(back, T5Tokenizer) and back.vocab_size == tok.vocab_size
    assert back.fingerprint == tok.fingerprint
    text = docs[0][:2000] + " <extra_id_3> end"
    assert back.encode(text) == tok.encode(text)
    with pytest.raises(UserError, match="retrain"):
        T5Tokenizer.from_state({"name": "t5", "pieces": "oops"})


def test_literal_sentinels_read_like_a_corrupted_input(tok):
    V = tok.vocab_size
    ids = tok.encode("Thank you <extra_id_0> me to your party <extra_id_1> week.")
    # the spaces before a sentinel belong to the dropped span: the ids are exactly those of the
    # original sentence with "▁for▁inviting" and "▁last" replaced by the sentinels
    original = tok.encode("Thank you for inviting me to your party last week.")
    expect = tok.encode("Thank you") + [V - 1] + tok.encode(" me to your party") + [V - 2] + tok.encode(" week.")
    assert ids == expect
    assert tok.encode("Thank you") == original[: len(tok.encode("Thank you"))]
    assert tok.decode(ids) == "Thank you <extra_id_0> me to your party <extra_id_1> week."
    assert tok.encode("a </s>")[-1] == EOS_ID
    # corpus text is ordinary text: no sentinel ids out of a literal "<extra_id_0>" in a file
    assert max(tok.encode_documents(["a <extra_id_0> b"]).tolist()) < V - NUM_SENTINELS
    with pytest.raises(UserError, match="extra_id_99"):
        tok.encode("bad <extra_id_100>")


def test_tokenizer_bad_input():
    with pytest.raises(UserError, match="vocab_size"):
        T5Tokenizer.train(["some text"], vocab_size=100)
    with pytest.raises(UserError, match="empty corpus"):
        T5Tokenizer.train(["", ""], vocab_size=500)


# ---------------------------------------------------------------------------- datamodule
def test_train_batches_fill_input_length_and_uncorrupt_to_the_chunk(docs, tok):
    dm = make_dm(docs, tok)
    raw_len, target_len = compute_input_and_target_lengths(INPUT_LENGTH)
    assert (dm.chunk_length, dm.target_length) == (raw_len, target_len)
    ds = dm.train_dataset()
    for i in (0, 1, ds.batches_per_epoch):  # two batches of epoch 0, the first of epoch 1
        b = ds.batch(i)
        assert b["input_ids"].shape == (4, INPUT_LENGTH)
        assert bool(b["attention_mask"].all())  # no padding at all
        assert b["labels"].shape == (4, target_len) and not bool((b["labels"] == IGNORE_INDEX).any())
        assert bool((b["input_ids"][:, -1] == EOS_ID).all()) and bool((b["labels"][:, -1] == EOS_ID).all())
    epoch, seen = 0, []
    for k in ds.order(epoch)[:20]:
        inputs, targets = ds.example(epoch, k)
        assert len(inputs) == INPUT_LENGTH
        np.testing.assert_array_equal(uncorrupt(inputs, targets, tok.vocab_size), ds.chunk(k))
        seen.append(k)
    # an epoch visits every chunk once; batch i is a pure function of (seed, i)
    assert sorted(ds.order(3).tolist()) == list(range(ds.num_chunks))
    assert torch.equal(ds.batch(5)["input_ids"], make_dm(docs, tok).train_dataset().batch(5)["input_ids"])
    # the loader starts where a resumed run left off
    dm.load_state_dict({"next_batch": 5})
    first = next(iter(dm.train_dataloader()))
    assert torch.equal(first["labels"], ds.batch(5)["labels"])


def test_training_noise_changes_across_epochs(docs, tok):
    ds = make_dm(docs, tok).train_dataset()
    changed = 0
    for k in range(30):
        a, b = ds.example(0, k), ds.example(1, k)
        np.testing.assert_array_equal(uncorrupt(*b, tok.vocab_size), ds.chunk(k))  # same text ...
        changed += not np.array_equal(a[0], b[0])  # ... other spans
    assert changed >= 25
    assert not np.array_equal(ds.order(0), ds.order(1))  # and another order


def test_eval_batches_are_deterministic_and_cover_the_split(docs, tok):
    dm = make_dm(docs, tok)
    first = list(dm.val_dataloader())
    again = list(make_dm(docs, tok).val_dataloader())
    second = list(dm.val_dataloader())
    for a, b, c in zip(first, again, second, strict=True):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    ds = dm.eval_dataset("val")
    n_val = dm.stats()["val"]
    assert ds.n_full == n_val // dm.chunk_length
    restored = np.concatenate([uncorrupt(*ds[k], tok.vocab_size) for k in range(len(ds))])
    np.testing.assert_array_equal(restored, np.asarray(dm.splits["val"][: len(restored)], dtype=np.int64))
    assert len(restored) >= n_val - 8  # at most a few tail tokens go unscored
    last = first[-1]
    if ds.tail:  # the shorter last chunk is padded: pad + mask 0 in the inputs, -100 in the labels
        assert not bool(last["attention_mask"][-1].all())
        assert int(last["input_ids"][-1][last["attention_mask"][-1] == 0].max()) == PAD_ID
        assert bool((last["labels"][-1] == IGNORE_INDEX).any())
    # test noise differs from val noise for the same chunk index (they are other examples)
    assert dm.eval_dataset("test")[0][0].tolist() != ds[0][0].tolist()


def test_datamodule_bad_input(docs, tok):
    with pytest.raises(UserError, match="tokenizer=t5"):
        T5DataModule(corpus="text", path="x").tokenizer = CharTokenizer.train(docs[:1])
    with pytest.raises(UserError, match=r"corpus too short.*data\.path.*input_length"):
        make_dm(["Only a few words here, far fewer than one example needs."], tok)
    with pytest.raises(UserError, match="noise_density"):
        T5DataModule(input_length=32, noise_density=1.5)
    with pytest.raises(UserError, match="inputs_length"):
        T5DataModule(input_length=2)
    with pytest.raises(UserError, match="sentinels"):
        T5DataModule(input_length=4096)  # > 99 spans per example
    with pytest.raises(UserError, match="val_fraction"):
        T5DataModule(val_fraction=0.7, test_fraction=0.5)


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("preset", ["t5_tiny", "t5_small", "t5_seed"])
def test_model_yaml_mirrors_the_preset(preset):
    from omegaconf import OmegaConf

    from llmlab.models.t5 import T5Config

    conf = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / f"{preset}.yaml")
    from llmlab.models.build import LOADING_KEYS

    fields = {k: v for k, v in OmegaConf.to_container(conf).items() if k not in LOADING_KEYS}
    assert conf.name == preset and fields["vocab_size"] is None
    fields["vocab_size"] = 32128
    assert T5Config(**fields) == T5Config.preset(preset, vocab_size=32128)
