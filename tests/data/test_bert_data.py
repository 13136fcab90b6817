"""The BERT datamodule: training batch ``i`` is a pure function of ``(seed, i)`` (exact resume),
dynamic vs static masking, per-document splits and fixed evaluation masks."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from llmlab.data.bert_data import BertDataModule
from llmlab.data.corpora import shakespeare_plays
from llmlab.data.mlm import WordPieceTokenizer
from llmlab.errors import UserError
from llmlab.nn.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four short plays as four documents (a directory of text files)."""
    root = tmp_path_factory.mktemp("plays")
    for i, (_, text) in enumerate(shakespeare_plays()[:4]):
        (root / f"play{i}.txt").write_text("\n".join(text.splitlines()[:400]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def wordpiece(corpus):
    return WordPieceTokenizer.train([p.read_text() for p in sorted(corpus.iterdir())], vocab_size=500)


def datamodule(corpus, wordpiece, **kw) -> BertDataModule:
    dm = BertDataModule(corpus="text", path=str(corpus), max_seq_len=48, max_predictions=6, batch_size=8, **kw)
    dm.tokenizer = wordpiece
    return dm


def take(dataset, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_are_a_pure_function_of_the_index_and_resume_exactly(corpus, wordpiece):
    dm = datamodule(corpus, wordpiece)
    stream = dm.train_dataset()
    first = take(stream, 40)
    batches_in_pass0 = stream._sizes[0]
    assert batches_in_pass0 < 40  # the sequence crosses into the second pass
    for b in first:
        assert b["input_ids"].shape == (8, 48) and b["labels"].shape == (8, 48)
        assert ((b["labels"] != IGNORE_INDEX).sum(1) >= 1).all()
    resumed = datamodule(corpus, wordpiece)
    resumed.load_state_dict({"next_batch": 25})
    assert all(same(x, y) for x, y in zip(take(resumed.train_dataset(), 15), first[25:]))
    assert datamodule(corpus, wordpiece, seed=7).train_dataset().batch(0)["input_ids"].ne(first[0]["input_ids"]).any()


def pass_rows(stream, k: int) -> dict[str, torch.Tensor]:
    """Every batch of pass ``k`` concatenated, keyed by the unmasked pair (input ids with labels put back)."""
    first = sum(stream._sizes[:k])
    out = {}
    for i in range(first, first + stream._sizes[k]):
        b = stream.batch(i)
        original = torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"])
        for row, ids, labels in zip(original, b["input_ids"], b["labels"]):
            out[tuple(row.tolist())] = (ids, labels)
    return out


@pytest.mark.parametrize("static", [False, True])
def test_dynamic_masks_change_between_passes_static_ones_do_not(corpus, wordpiece, static):
    stream = datamodule(corpus, wordpiece, static_masking=static).train_dataset()
    while len(stream._sizes) < 2:
        stream._locate(sum(stream._sizes))  # builds the next pass
    p0, p1 = pass_rows(stream, 0), pass_rows(stream, 1)
    shared = [key for key in p0 if key in p1]
    if static:
        assert len(shared) >= 0.9 * len(p0)  # the same pairs every pass (a partial batch is dropped)
        assert all(torch.equal(p0[k][0], p1[k][0]) and torch.equal(p0[k][1], p1[k][1]) for k in shared)
        assert list(p0) != list(p1)  # in a new order
    else:
        assert len(shared) < 0.5 * len(p0)  # pairs are re-packed every pass
        differ = [k for k in shared if not torch.equal(p0[k][1], p1[k][1])]
        assert not shared or len(differ) >= 0.5 * len(shared)


def test_eval_masks_are_fixed_and_splits_are_per_document(corpus, wordpiece):
    dm = datamodule(corpus, wordpiece)
    dm.setup()
    assert all(len(parts) == 4 for parts in dm.splits.values())  # every play in every split
    val = dm.eval_set("val")
    again = datamodule(corpus, wordpiece).eval_set("val")
    assert same(val, again)
    assert not torch.equal(dm.eval_set("test")["input_ids"][:4], val["input_ids"][:4])
    labels = val["labels"]
    assert ((labels != IGNORE_INDEX).sum(1) >= 1).all() and ((labels != IGNORE_INDEX).sum(1) <= 6).all()
    assert set(val["next_sentence_label"].tolist()) == {0, 1}


def test_a_batch_larger_than_the_split_is_refused(corpus, wordpiece):
    dm = BertDataModule(corpus="text", path=str(corpus), max_seq_len=48, batch_size=100_000)
    dm.tokenizer = wordpiece
    with pytest.raises(UserError, match="batch_size"):
        next(iter(dm.train_dataset()))


class _Recorder(L.LightningModule):
    """Records the (masked) ids and labels of every training batch it is fed."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["input_ids"].clone(), batch["labels"].clone()))
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, dm, max_steps, callbacks=(), ckpt_path=None) -> _Recorder:
    module = _Recorder()
    L.Trainer(max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
              default_root_dir=tmp_path, accelerator="cpu", devices=1).fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_lightning_resume_continues_the_batch_sequence(corpus, wordpiece, tmp_path):
    """30 steps straight == 25 steps, checkpoint, resume to 30 (crossing into the second pass)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=25, save_top_k=-1)
    straight = _fit(tmp_path, datamodule(corpus, wordpiece), 30, [ckpt])
    path = tmp_path / "ckpt" / "epoch=0-step=25.ckpt"
    assert torch.load(path, weights_only=False)["BertDataModule"] == {"next_batch": 25}
    resumed = _fit(tmp_path, datamodule(corpus, wordpiece), 30, ckpt_path=str(path))
    assert len(resumed.seen) == 5
    for (ids, labels), (ids0, labels0) in zip(resumed.seen, straight.seen[25:]):
        assert torch.equal(ids, ids0) and torch.equal(labels, labels0)
