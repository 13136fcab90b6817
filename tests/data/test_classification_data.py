"""Classification data: Shakespeare's genres split by play, the user's labelled files, batches, the
genre filter of the language-model corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmlab.data.classification import (
    ExampleBatches,
    LabeledDataModule,
    ShakespeareGenreDataModule,
    encode_text,
    play_passages,
)
from llmlab.data.corpora import load_corpus, shakespeare_plays
from llmlab.data.tokenizers import CharTokenizer
from llmlab.errors import UserError


@pytest.fixture(scope="module")
def genre_dm() -> ShakespeareGenreDataModule:
    return ShakespeareGenreDataModule(max_passages_per_play=30, batch_size=8, eval_batch_size=16, max_length=48,
                                      val_fraction=0.15, test_fraction=0.15)  # as conf/data/shakespeare_genre.yaml


# ---------------------------------------------------------------------------- Shakespeare's genres


def test_split_by_play_no_play_in_two_splits(genre_dm):
    plays = {split: {e.source for e in rows} for split, rows in genre_dm.examples.items()}
    assert not plays["train"] & plays["val"] and not plays["train"] & plays["test"] and not plays["val"] & plays["test"]
    assert set(genre_dm.play_split) == set().union(*plays.values())  # every comedy, history and tragedy is used
    assert len(genre_dm.play_split) == 8 + 11 + 6
    for split in ("train", "val", "test"):  # stratified: every genre in every split
        assert {e.label for e in genre_dm.examples[split]} == {"comedy", "history", "tragedy"}
    assert sorted(genre_dm.play_split.values()).count("test") == 1 + 2 + 1  # round(0.15 * n), at least one
    folder = {"comedy": "comedies", "history": "histories", "tragedy": "tragedies"}
    assert all(e.source.startswith(folder[e.label] + "/") for rows in genre_dm.examples.values() for e in rows)


def test_split_is_seeded(genre_dm):
    again = ShakespeareGenreDataModule(max_passages_per_play=30, val_fraction=0.15, test_fraction=0.15)
    again.examples  # noqa: B018 — reads the plays
    assert again.play_split == genre_dm.play_split
    other = ShakespeareGenreDataModule(max_passages_per_play=30, seed=7)
    other.examples  # noqa: B018
    assert other.play_split != genre_dm.play_split


def test_labels_and_method_kwargs(genre_dm):
    assert genre_dm.labels == ["comedy", "history", "tragedy"]
    assert genre_dm.method_kwargs() == {"labels": ["comedy", "history", "tragedy"]}
    dm = ShakespeareGenreDataModule(genres=["tragedy", "romance"])
    assert dm.labels == ["romance", "tragedy"]  # known before anything is read
    with pytest.raises(UserError, match="choose from comedy, history"):
        ShakespeareGenreDataModule(genres=["comedy", "farce"])
    with pytest.raises(UserError, match="at least two"):
        ShakespeareGenreDataModule(genres=["comedy"])


def test_passages():
    text = "A:\none\ntwo\n\nB:\nthree\n\nA:\nfour\nfive\nsix\nseven\n"
    assert play_passages(text, 2) == ["one\ntwo", "three\nfour", "five\nsix"]  # the short tail is dropped
    assert play_passages(text, 3, speakers=True) == ["A:\none\ntwo", "B:\nthree\nA:", "four\nfive\nsix"]


def test_batches_are_right_padded_and_truncated(genre_dm):
    genre_dm.tokenizer = CharTokenizer.train(genre_dm.documents())
    genre_dm.setup()
    batch = next(iter(genre_dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    B, T = batch["input_ids"].shape
    assert batch["labels"].shape == (B,) and T <= 48
    lengths = batch["attention_mask"].sum(1)
    for b in range(B):  # ones then zeros: right padding
        n = int(lengths[b])
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
    stats = genre_dm.stats()
    assert stats["test_examples"] == len(genre_dm.examples["test"]) and stats["test"] <= 48 * stats["test_examples"]


def test_unknown_characters_become_unk(genre_dm):
    tok = CharTokenizer.train(genre_dm.documents())
    ids = encode_text(tok, "To be 🎭", 64)
    assert ids[-1] == tok.unk_id and ids[:-1] == tok.encode("To be ")


def test_special_tokens_per_model():
    from llmlab.data.mlm import WordPieceTokenizer
    from llmlab.data.t5_tokenizer import T5Tokenizer

    wp = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "to", "be", "or", "not"])
    assert encode_text(wp, "to be or not to be", 5) == [wp.cls_id, *wp.encode("to be or"), wp.sep_id]
    t5 = T5Tokenizer.train(["to be or not to be, that is the question"] * 5, vocab_size=200)
    ids = encode_text(t5, "to be or not", 64)
    assert ids[-1] == t5.eos_id and ids[:-1] == t5.encode("to be or not")


def test_training_batches_resume_and_balance():
    ids = [[1 + i % 7] * (1 + i % 5) for i in range(40)]
    labels = np.array([0] * 30 + [1] * 10)
    a = ExampleBatches(ids, labels, 8, pad=0, seed=3)
    b = ExampleBatches(ids, labels, 8, pad=0, seed=3, start_batch=7)
    first = next(iter(b))
    assert all(torch.equal(first[k], a.batch(7)[k]) for k in first)  # resume = the batch it would have seen
    seen = torch.cat([a.batch(i)["labels"] for i in range(5)])  # one epoch: every example once
    assert sorted(seen.tolist()) == sorted(labels.tolist())
    balanced = ExampleBatches(ids, labels, 8, pad=0, seed=3, balanced=True)
    share = torch.cat([balanced.batch(i)["labels"] for i in range(200)]).float().mean()
    assert 0.45 < share < 0.55  # 1/4 of the examples, half of the draws


# ---------------------------------------------------------------------------- the user's labelled file


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_labeled_jsonl_split_is_stratified_and_seeded(tmp_path):
    rows = [{"text": f"text {i}", "label": "pos" if i % 3 else "neg"} for i in range(60)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = LabeledDataModule(path=str(f), val_fraction=0.1, test_fraction=0.2)
    sizes = {s: len(v) for s, v in dm.examples.items()}
    assert sizes == {"train": 42, "val": 6, "test": 12}  # per label: neg 20 -> 14/2/4, pos 40 -> 28/4/8
    assert dm.labels == ["neg", "pos"] and dm.method_kwargs() == {"labels": ["neg", "pos"]}
    texts = [{e.text for e in v} for v in dm.examples.values()]
    assert sum(len(t) for t in texts) == 60 and len(set().union(*texts)) == 60  # a partition
    again = LabeledDataModule(path=str(f), val_fraction=0.1, test_fraction=0.2)
    assert again.examples == dm.examples


def test_labeled_csv_with_own_fields_and_files(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence,y\n" + "".join(f'"words, {i}",{i % 2}\n' for i in range(20)), encoding="utf-8")
    test = write_jsonl(tmp_path / "test.jsonl", [{"sentence": "a", "y": 1}, {"sentence": "b", "y": 0}])
    dm = LabeledDataModule(path=str(train), test_path=str(test), text_field="sentence", label_field="y",
                           val_fraction=0.1, test_fraction=0.3)
    assert dm.labels == ["0", "1"]  # numbers become class names
    assert [e.text for e in dm.examples["test"]] == ["a", "b"] and len(dm.examples["val"]) == 2
    assert dm.examples["train"][0].text.startswith("words, ")  # quoted commas survive


@pytest.mark.parametrize("bad, needle", [
    ('{"text": "x", "label": ', "line 3 is not valid JSON"),
    ({"text": "x"}, "line 3 has no 'label' field"),
    ({"text": "  ", "label": "a"}, "line 3 has an empty 'text'"),
    ('["x", "a"]', "line 3 is a JSON list"),
])
def test_labeled_bad_rows_name_file_and_line(tmp_path, bad, needle):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}, bad])
    with pytest.raises(UserError) as e:
        LabeledDataModule(path=str(f)).documents()
    assert needle in str(e.value) and "bad.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_labeled_label_unseen_in_training_and_missing_column(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": "a"}, {"text": "w", "label": "zebra"}])
    with pytest.raises(UserError, match=r"label 'zebra' of the val split \(val.jsonl:2\) never occurs"):
        LabeledDataModule(path=str(f), val_path=str(val)).labels
    csv = tmp_path / "d.csv"
    csv.write_text("body,label\nhello,a\n", encoding="utf-8")
    with pytest.raises(UserError, match="no column 'text' .*data.text_field="):
        LabeledDataModule(path=str(csv)).documents()
    with pytest.raises(UserError, match="unknown file type"):
        LabeledDataModule(path=str(tmp_path / "d.txt")).documents()


# ---------------------------------------------------------------------------- genre filter for LM data


def test_genre_filter_of_the_lm_corpus():
    from llmlab.data.lm import LMDataModule

    plays = shakespeare_plays()
    comedies = shakespeare_plays(["comedy"])
    assert [n for n, _ in comedies] == [n for n, _ in plays if n.startswith("comedies/")] and len(comedies) == 8
    assert load_corpus("shakespeare", genres=["tragedy"]) == [t for n, t in plays if n.startswith("tragedies/")]
    assert LMDataModule().documents() == [t for _, t in plays]  # null = all plays: same stream, same cache key
    assert len(LMDataModule(genres=["comedy", "history"]).documents()) == 19
    with pytest.raises(UserError, match="choose from"):
        load_corpus("shakespeare", genres=["farce"])
    with pytest.raises(UserError, match="drop data.genres"):
        load_corpus("text", "x.txt", genres=["comedy"])


def test_genre_filter_reaches_every_datamodule():
    """data=shakespeare data.genres=[...]: the LM datamodule and a method's own (BERT) read only those plays."""
    from hydra import compose, initialize_config_dir

    from conftest import REPO
    from llmlab.data.mlm import WordPieceTokenizer
    from llmlab.tasks.common import build_data, split_method_config

    state = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]).state_dict()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        lm = compose("train", overrides=["data.genres=[tragedy]"])
        bert = compose("train", overrides=["method=bert", "data.genres=[comedy]"])
        default = compose("train")
    assert default.data.genres is None
    dm, _ = build_data(lm.data, lm.tokenizer)
    assert dm.documents() == load_corpus("shakespeare", genres=["tragedy"])
    dm, _ = build_data(bert.data, tokenizer_state=state, datamodule_cfg=split_method_config(bert.method)[1])
    assert len(dm.documents()) == 8
