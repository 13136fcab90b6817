"""Token-stream cache, contiguous splits, training/eval windows and the LM datamodule."""

from __future__ import annotations

import time
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from llmlab.data.corpora import shakespeare_plays
from llmlab.data.lm import (
    IGNORE_INDEX,
    LMDataModule,
    RandomWindows,
    StridedWindows,
    count_unknown,
    split_stream,
    tokenize_cached,
)
from llmlab.data.tokenizers import CharTokenizer, GPT2Tokenizer
from llmlab.errors import UserError


class CountingChar(CharTokenizer):
    """A char tokenizer that counts how often a corpus is tokenised."""

    calls = 0

    def encode_documents(self, docs):
        type(self).calls += 1
        return super().encode_documents(docs)


class WideVocab(CharTokenizer):
    """Pretends to have 70,000 ids: streams must be stored as uint32."""

    vocab_size_override = 70_000

    def __init__(self, chars):
        super().__init__(chars)
        self.vocab_size = self.vocab_size_override


DOCS = ["the quick brown fox jumps over the lazy dog. " * 20, "pack my box with five dozen liquor jugs! " * 20]


@pytest.fixture
def corpus_file(tmp_path):
    """~20k characters of cleaned Shakespeare as a text file."""
    text = shakespeare_plays()[0][1][:20_000]
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def make_dm(path, tokenizer=None, **kw) -> LMDataModule:
    dm = LMDataModule(corpus="text", path=str(path), **kw)
    dm.tokenizer = tokenizer or CharTokenizer.train(dm.documents())
    return dm


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------


def test_cache_reuses_stream_without_retokenising(tmp_path):
    tok = CountingChar.train(DOCS)
    CountingChar.calls = 0
    first = tokenize_cached(DOCS, tok, tmp_path)
    second = tokenize_cached(DOCS, tok, tmp_path)
    assert CountingChar.calls == 1
    assert isinstance(second, np.memmap) and not second.flags.writeable
    assert first.dtype == second.dtype == np.uint16
    np.testing.assert_array_equal(first, CharTokenizer.encode_documents(tok, DOCS))
    np.testing.assert_array_equal(first, second)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".npy") and not files[0].startswith(".")  # no temp file left

    # another corpus or another tokenizer: another file, tokenised again
    tokenize_cached(DOCS[:1], tok, tmp_path)
    tokenize_cached(DOCS, CountingChar(tok.chars + "#"), tmp_path)
    assert CountingChar.calls == 3 and len(list(tmp_path.iterdir())) == 3


def test_cache_document_boundaries_matter(tmp_path):
    tok = CountingChar.train(["ab", "cd", "abcd"])
    a = tokenize_cached(["ab", "cd"], tok, tmp_path)
    b = tokenize_cached(["abcd"], tok, tmp_path)
    assert len(a) == 6 and len(b) == 4 and len(list(tmp_path.iterdir())) == 2


def test_no_cache_dir_means_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = CountingChar.train(DOCS)
    out = tokenize_cached(DOCS, tok, None)
    assert not isinstance(out, np.memmap) and list(tmp_path.iterdir()) == []


def test_dtype_uint32_for_large_vocab(tmp_path):
    out = tokenize_cached(DOCS, WideVocab.train(DOCS), tmp_path)
    assert out.dtype == np.uint32


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(f, arr):
        f.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tokenize_cached(DOCS, CharTokenizer.train(DOCS), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_cache_is_rebuilt(tmp_path):
    tok = CountingChar.train(DOCS)
    tokenize_cached(DOCS, tok, tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"garbage")
    out = tokenize_cached(DOCS, tok, tmp_path)
    np.testing.assert_array_equal(out, tok.encode_documents(DOCS))


@pytest.fixture(scope="module")
def shakespeare_gpt2_timing(tmp_path_factory):
    """Tokenise all of Shakespeare with GPT-2 once (cold), then again from the cache."""
    cache = tmp_path_factory.mktemp("tokcache")
    docs = [t for _, t in shakespeare_plays()]
    tok = GPT2Tokenizer()
    t0 = time.perf_counter()
    cold = tokenize_cached(docs, tok, cache)
    t1 = time.perf_counter()
    warm = tokenize_cached(docs, tok, cache)
    t2 = time.perf_counter()
    return SimpleNamespace(docs=docs, cold=cold, warm=warm, cold_s=t1 - t0, warm_s=t2 - t1, cache=cache)


def test_shakespeare_gpt2_stream(shakespeare_gpt2_timing):
    r = shakespeare_gpt2_timing
    print(f"\nShakespeare gpt2: {len(r.cold):,} tokens; tokenise cold {r.cold_s:.2f}s, cached {r.warm_s * 1000:.1f}ms")
    assert 1_350_000 < len(r.cold) < 1_550_000
    assert r.cold.dtype == np.uint16 and isinstance(r.warm, np.memmap)
    assert int((np.asarray(r.warm) == 50256).sum()) == len(r.docs) - 1  # one EOS between plays
    np.testing.assert_array_equal(r.cold[:1000], r.warm[:1000])


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def test_split_stream_contiguous():
    tokens = np.arange(1000)
    s = split_stream(tokens, 0.1, 0.05)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (850, 100, 50)
    np.testing.assert_array_equal(np.concatenate([s["train"], s["val"], s["test"]]), tokens)
    assert s["test"][-1] == 999 and s["val"][0] == 850
    s0 = split_stream(tokens, 0.0, 0.0)
    assert len(s0["train"]) == 1000 and len(s0["val"]) == len(s0["test"]) == 0


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (1.0, 0.0), (0.6, 0.4), (0.5, 0.7)])
def test_split_stream_bad_fractions(val, test):
    with pytest.raises(UserError, match="fraction"):
        split_stream(np.arange(10), val, test)


# ------------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------------


def test_random_windows_shift_and_range():
    n, T, B = 300, 16, 8
    tokens = np.arange(n, dtype=np.uint16)  # token value == position
    ds = RandomWindows(tokens, T, B, seed=7)
    it = iter(ds)
    lo, hi = n, 0
    for _ in range(200):
        x, y = next(it)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # pre-shifted targets
        assert torch.equal(x, x[:, :1] + torch.arange(T))  # contiguous windows
        lo, hi = min(lo, int(x[:, 0].min())), max(hi, int(x[:, 0].max()))
    assert lo == 0 and hi == n - T - 1  # offsets reach both ends of [0, len-T-1]


def test_random_windows_resume_exactly():
    tokens = np.random.default_rng(0).integers(0, 500, size=5000).astype(np.uint16)
    ds = RandomWindows(tokens, 32, 4, seed=1337)
    it = iter(ds)
    straight = [next(it) for _ in range(10)]
    resumed = iter(RandomWindows(tokens, 32, 4, seed=1337, start_batch=6))
    for i in range(6, 10):
        x, y = next(resumed)
        assert torch.equal(x, straight[i][0]) and torch.equal(y, straight[i][1])
        assert torch.equal(x, ds.batch(i)[0])
    other = next(iter(RandomWindows(tokens, 32, 4, seed=1338)))
    assert not torch.equal(other[0], straight[0][0])


def test_random_windows_workers_keep_order():
    tokens = np.arange(4000, dtype=np.uint16)
    ds = RandomWindows(tokens, 8, 2, seed=3, start_batch=5)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    got = []
    for i, (x, _) in enumerate(loader):
        got.append(x)
        if i == 5:
            break
    for i, x in enumerate(got):
        assert torch.equal(x, ds.batch(5 + i)[0])


def test_windows_need_enough_tokens():
    with pytest.raises(UserError, match="block_size\\+1=9"):
        RandomWindows(np.arange(8), 8, 2)
    with pytest.raises(UserError, match="block_size\\+1=9"):
        StridedWindows(np.arange(8), 8)
    assert len(StridedWindows(np.arange(9), 8)) == 1


def _targets(ds: StridedWindows) -> list[int]:
    out = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == y.shape == (ds.block_size,) and x.dtype == torch.long
        keep = y != IGNORE_INDEX
        assert torch.equal(y[keep], x[keep] + 1)  # value == position: y is x shifted by one
        out += y[keep].tolist()
    return out


@pytest.mark.parametrize("n,T", [(65, 16), (64, 16), (66, 16), (17, 16), (100, 7), (1000, 1)])
def test_strided_windows_score_every_token_once(n, T):
    tokens = np.arange(n, dtype=np.uint32)  # value == position, so targets name positions
    ds = StridedWindows(tokens, T)
    targets = _targets(ds)
    assert sorted(targets) == list(range(1, n))  # every token after the first, exactly once
    assert len(targets) == ds.num_targets == n - 1
    assert len(ds) == -(-(n - 1) // T)  # ceil((n-1)/T) windows


@settings(max_examples=150, deadline=None)
@given(T=st.integers(1, 24), extra=st.integers(1, 200))
def test_strided_windows_property(T, extra):
    n = T + extra
    ds = StridedWindows(np.arange(n, dtype=np.uint32), T)
    targets = []
    for i in range(len(ds)):
        y = ds[i][1]
        targets += y[y != IGNORE_INDEX].tolist()
    assert sorted(targets) == list(range(1, n))


# ------------------------------------------------------------------------------------------------
# DataModule
# ------------------------------------------------------------------------------------------------


def test_datamodule_splits_and_loaders(corpus_file, tmp_path):
    dm = make_dm(corpus_file, block_size=32, batch_size=4, eval_batch_size=5, val_fraction=0.1, test_fraction=0.05, cache_dir=tmp_path / "c")
    assert dm.documents() is dm.documents()  # read once
    dm.setup("fit")
    stats = dm.stats()
    n = sum(stats.values())
    assert n == 20_000  # char tokens == characters of a single document
    assert (stats["val"], stats["test"]) == (2000, 1000) and stats["train"] == 17_000
    whole = dm.tokenizer.encode_documents(dm.documents())
    np.testing.assert_array_equal(np.concatenate([dm.splits[k] for k in ("train", "val", "test")]), whole)

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for loader, split in ((dm.val_dataloader(), "val"), (dm.test_dataloader(), "test")):
        xb, yb = next(iter(loader))
        assert xb.shape == yb.shape == (5, 32)
        assert sum((b[1] != IGNORE_INDEX).sum().item() for b in loader) == stats[split] - 1
    train_eval = dm.eval_dataloader("train")
    assert sum((b[1] != IGNORE_INDEX).sum().item() for b in train_eval) == stats["train"] - 1
    with pytest.raises(UserError, match="unknown split"):
        dm.eval_dataloader("dev")
    assert LMDataModule(batch_size=3).eval_batch_size == 3
    dm.setup("test")  # idempotent
    assert dm.stats() == stats


def test_datamodule_shakespeare_gpt2(shakespeare_gpt2_timing):
    dm = LMDataModule(block_size=64, batch_size=2, cache_dir=shakespeare_gpt2_timing.cache)
    dm._docs = shakespeare_gpt2_timing.docs  # same corpus, already loaded by the fixture
    dm.tokenizer = GPT2Tokenizer()
    dm.setup("fit")
    stats = dm.stats()
    n = len(shakespeare_gpt2_timing.cold)
    assert sum(stats.values()) == n
    assert abs(stats["val"] - 0.05 * n) <= 1 and abs(stats["test"] - 0.05 * n) <= 1
    print(f"\nShakespeare gpt2 splits: {stats}")


def test_datamodule_needs_tokenizer(corpus_file):
    dm = LMDataModule(corpus="text", path=str(corpus_file))
    with pytest.raises(UserError, match="tokenizer"):
        dm.setup("fit")


def test_datamodule_corpus_too_short(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("x" * 400, encoding="utf-8")
    dm = make_dm(f, block_size=32, val_fraction=0.05, test_fraction=0.05)  # val = 20 tokens
    with pytest.raises(UserError, match="corpus too short: 20 tokens in the val split") as e:
        dm.setup("fit")
    assert "block_size+1=33" in str(e.value) and "data.path" in str(e.value)
    dm = make_dm(f, block_size=400, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(UserError, match="400 tokens in the train split"):
        dm.setup("fit")
    ok = make_dm(f, block_size=16, val_fraction=0.0, test_fraction=0.0)  # splits switched off
    ok.setup("fit")
    assert ok.stats() == {"train": 400, "val": 0, "test": 0, "unknown_tokens": 0} and len(ok.val_dataloader()) == 0


def test_datamodule_unknown_characters_become_unk_and_are_counted(tmp_path):
    """Evaluating a char model on another text: characters its corpus lacked become <unk>, counted
    in stats() (also when the stream comes back from the cache); a pre-<unk> vocabulary refuses them."""
    text = ("the quick brown fox; jumps over the lazy dog! " * 12)[:500]
    f = tmp_path / "other.txt"
    f.write_text(text, encoding="utf-8")
    trained = CountingChar.train(["the quick brown fox jumps over the lazy dog"])  # no ";" and no "!"
    unseen = sum(c in ";!" for c in text)
    CountingChar.calls = 0
    kw = dict(block_size=16, val_fraction=0.1, test_fraction=0.1, cache_dir=tmp_path / "cache")
    dm = make_dm(f, trained, **kw)
    dm.setup("validate")
    stats = dm.stats()
    assert stats["unknown_tokens"] == unseen > 0
    assert stats["train"] + stats["val"] + stats["test"] == len(text)
    stream = np.concatenate([dm.splits[k] for k in ("train", "val", "test")])
    assert [i for i, t in enumerate(stream) if t == trained.unk_id] == [i for i, c in enumerate(text) if c in ";!"]
    assert trained.decode(stream[:48]) == text[:48].replace(";", "\ufffd").replace("!", "\ufffd")
    assert count_unknown(dm.splits["val"], trained) == sum(c in ";!" for c in text[400:450])

    rebuilt = CountingChar(trained.chars)  # e.g. rebuilt from a checkpoint: same fingerprint, cached stream
    again = make_dm(f, rebuilt, **kw)
    again.setup("validate")
    assert CountingChar.calls == 1 and isinstance(again.splits["train"], np.memmap)
    assert again.stats() == stats and rebuilt.unknown_count == 0  # counted from the stream, not the encoder

    old = make_dm(f, CharTokenizer(trained.chars, unk=False), **kw)  # a checkpoint from before <unk>
    with pytest.raises(UserError, match="';'.*predates unknown-character support.*retrain"):
        old.setup("validate")
    assert count_unknown(stream, SimpleNamespace(unk_id=None)) == 0  # no unk id (GPT-2's bytes): nothing to count


def test_datamodule_bad_arguments(corpus_file):
    with pytest.raises(UserError, match="batch_size"):
        LMDataModule(batch_size=0)
    with pytest.raises(UserError, match="fraction"):
        LMDataModule(val_fraction=0.7, test_fraction=0.5)
    with pytest.raises(UserError, match="data.path"):
        LMDataModule(corpus="text").documents()


def test_datamodule_state_dict_round_trip(corpus_file):
    dm = make_dm(corpus_file, block_size=16, batch_size=3, seed=11)
    assert dm.state_dict() == {"next_batch": 0}
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2)
    assert dm.state_dict() == {"next_batch": 10}

    fresh = make_dm(corpus_file, block_size=16, batch_size=3, seed=11)
    fresh.load_state_dict({"next_batch": 10})
    assert fresh.next_batch == 10 and fresh.state_dict() == {"next_batch": 10}
    fresh.setup("fit")
    x, _ = next(iter(fresh.train_dataloader()))
    ref = RandomWindows(fresh.splits["train"], 16, 3, seed=11)
    assert torch.equal(x, ref.batch(10)[0])


class _Recorder(L.LightningModule):
    """Records the first token of every training window it is fed."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x[:, 0].tolist() + y[:, -1].tolist())
        return self.w * x.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    )


def test_lightning_resume_continues_the_batch_sequence(corpus_file, tmp_path):
    """6 optimizer steps straight == 3 steps, checkpoint, resume to 6 (Lightning saves the
    datamodule's state_dict in the checkpoint and restores it before the train loader is built)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(block_size=8, batch_size=2, seed=5, cache_dir=tmp_path / "cache")
    straight = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path, 6, [ckpt]).fit(straight, datamodule=make_dm(corpus_file, **kw))
    assert len(straight.seen) == 12  # 6 steps x 2 accumulated batches

    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert torch.load(path, weights_only=False)["LMDataModule"] == {"next_batch": 6}
    resumed = _Recorder()
    _trainer(tmp_path, 6).fit(resumed, datamodule=make_dm(corpus_file, **kw), ckpt_path=str(path))
    assert resumed.seen == straight.seen[6:]
