"""llmlab.evaluation against gensim: same benchmark numbers, same neighbours, files gensim can read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from llmlab.errors import UserError
from llmlab.evaluation import (
    GOOGLE_ANALOGIES,
    SIMLEX999,
    WORDSIM353,
    WordVectors,
    evaluate_analogies,
    evaluate_word_pairs,
    format_table,
    gensim_test_file,
    intrinsic_metrics,
    load_word2vec_format,
    plot_pca,
    save_word2vec_format,
)
from llmlab.evaluation.word_vectors import rankdata, spearman

DIM = 20


def _benchmark_words() -> list[str]:
    words: dict[str, None] = {}
    for name in (WORDSIM353, SIMLEX999):
        for line in gensim_test_file(name).read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                words.update(dict.fromkeys(line.split("\t")[:2]))
    for line in gensim_test_file(GOOGLE_ANALOGIES).read_text(encoding="utf-8").splitlines():
        if not line.startswith(":"):
            words.update(dict.fromkeys(line.split()))
    return list(words)


def make_vocab() -> tuple[list[str], np.ndarray]:
    """Every benchmark word, some case variants and filler words, shuffled (so restrict_vocab bites),
    random vectors, plus two sections whose analogies hold by construction (so accuracies aren't ~0)."""
    rng = np.random.default_rng(0)
    words = _benchmark_words()
    words += [w.lower() for w in words[::7] if w.lower() not in words]  # case variants (Athens / athens)
    words += [w.upper() for w in words[::11] if w.upper() not in words]
    words += [f"filler{i}" for i in range(500)]
    words = [words[i] for i in rng.permutation(len(words))]
    vectors = rng.standard_normal((len(words), DIM)).astype(np.float32)
    row = {w: i for i, w in enumerate(words)}
    section = None
    for line in gensim_test_file(GOOGLE_ANALOGIES).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[2:]
            offset = rng.standard_normal(DIM).astype(np.float32)
        elif section in ("capital-common-countries", "family"):
            a, b, c, d = line.split()
            for x, y in ((a, b), (c, d)):
                vectors[row[y]] = vectors[row[x]] + offset + 0.3 * rng.standard_normal(DIM).astype(np.float32)
    return words, vectors


@pytest.fixture(scope="module")
def vocab() -> tuple[list[str], np.ndarray]:
    return make_vocab()


@pytest.fixture(scope="module")
def wv(vocab) -> WordVectors:
    return WordVectors(*vocab)


@pytest.fixture(scope="module")
def kv(vocab) -> KeyedVectors:
    words, vectors = vocab
    kv = KeyedVectors(vector_size=DIM)
    kv.add_vectors(words, vectors)
    return kv


def test_rankdata_averages_ties():
    np.testing.assert_array_equal(rankdata([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])
    assert spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(0.9486832980505138)


@pytest.mark.parametrize("name", [WORDSIM353, SIMLEX999])
def test_word_pairs_match_gensim(wv, kv, name):
    path = gensim_test_file(name)
    ours = evaluate_word_pairs(wv, path)
    (pearson, _), spearman_result, oov_ratio = kv.evaluate_word_pairs(str(path))
    assert ours["spearman"] == pytest.approx(spearman_result.statistic, abs=1e-6)
    assert ours["pearson"] == pytest.approx(pearson, abs=1e-6)
    assert ours["oov_ratio"] == pytest.approx(oov_ratio, abs=1e-9)
    assert ours["pairs"] == ours["total"] > 300  # every benchmark word is in the vocabulary
    assert ours["coverage"] == 1.0


def test_word_pairs_skip_oov_like_gensim(vocab, tmp_path):
    words, vectors = vocab
    keep = [i for i, w in enumerate(words) if i % 3]  # drop a third of the vocabulary
    small = WordVectors([words[i] for i in keep], vectors[keep])
    kv = KeyedVectors(vector_size=DIM)
    kv.add_vectors(small.words, small.vectors)
    path = gensim_test_file(WORDSIM353)
    ours = evaluate_word_pairs(small, path)
    (pearson, _), spearman_result, oov_ratio = kv.evaluate_word_pairs(str(path))
    assert 0 < ours["pairs"] < ours["total"]
    assert ours["coverage"] == pytest.approx(ours["pairs"] / ours["total"])
    assert ours["spearman"] == pytest.approx(spearman_result.statistic, abs=1e-6)
    assert ours["pearson"] == pytest.approx(pearson, abs=1e-6)
    assert ours["oov_ratio"] == pytest.approx(oov_ratio, abs=1e-9)


@pytest.mark.parametrize("restrict_vocab", [1500, 2000])
def test_analogies_match_gensim(wv, kv, restrict_vocab):
    path = gensim_test_file(GOOGLE_ANALOGIES)
    ours = evaluate_analogies(wv, path, restrict_vocab=restrict_vocab)
    score, sections = kv.evaluate_word_analogies(str(path), restrict_vocab=restrict_vocab)
    theirs = {s["section"]: (len(s["correct"]), len(s["correct"]) + len(s["incorrect"])) for s in sections}
    total = theirs.pop("Total accuracy")
    assert {name: (s["correct"], s["total"]) for name, s in ours["sections"].items()} == theirs
    assert ours["total"] == pytest.approx(score, abs=1e-12)
    assert ours["covered"] == total[1]
    assert ours["questions"] == 19544
    assert ours["sections"]["capital-common-countries"]["correct"] > 0  # analogies built in do get solved
    semantic = [s for name, s in ours["sections"].items() if not name.startswith("gram")]
    assert len(semantic) == 5
    expected = sum(s["correct"] for s in semantic) / max(1, sum(s["total"] for s in semantic))
    assert ours["semantic"] == pytest.approx(expected)


def test_most_similar_and_analogy_match_gensim(wv, kv):
    for word in ("king", "tiger", "Paris", "filler3"):
        ours = wv.most_similar(word, topn=8)
        theirs = kv.most_similar(word, topn=8)
        assert [w for w, _ in ours] == [w for w, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)
        assert word not in dict(ours)
    ours = wv.most_similar("king", topn=5, restrict_vocab=800)
    theirs = kv.most_similar("king", topn=5, restrict_vocab=800)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    vec = wv["tiger"] * 3
    assert [w for w, _ in wv.most_similar(vec, topn=5)] == [w for w, _ in kv.similar_by_vector(vec, topn=5)]
    assert wv.most_similar(vec, topn=1)[0][0] == "tiger"  # a vector query excludes nothing
    assert "cat" not in dict(wv.most_similar("tiger", topn=50, exclude=["cat"]))
    for a, b, c in (("Athens", "Greece", "Baghdad"), ("boy", "girl", "brother"), ("man", "king", "woman")):
        ours = wv.analogy(a, b, c, topn=5)
        theirs = kv.most_similar(positive=[b, c], negative=[a], topn=5)
        assert [w for w, _ in ours] == [w for w, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)
        assert not {a, b, c} & set(dict(ours))
    assert wv.analogy("Athens", "Greece", "Baghdad", topn=1)[0][0] == "Iraq"  # true by construction
    assert wv.similarity("tiger", "cat") == pytest.approx(kv.similarity("tiger", "cat"), abs=1e-6)


def test_zero_vectors_and_torch_input():
    wv = WordVectors(["a", "b", "zero"], torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    assert wv.vectors.dtype == np.float32 and not np.isnan(wv.unit).any()
    assert wv.similarity("a", "zero") == 0.0
    assert [w for w, _ in wv.most_similar("a")] == ["b", "zero"]
    assert wv.most_similar("a", restrict_vocab=1) == []


def test_unknown_word_is_a_user_error(wv):
    with pytest.raises(UserError, match="'xyzzy' is not in the vocabulary of .* words"):
        wv.most_similar("xyzzy")
    with pytest.raises(UserError, match="xyzzy"):
        wv.analogy("king", "xyzzy", "woman")
    with pytest.raises(UserError):
        wv["xyzzy"]
    assert "king" in wv and "xyzzy" not in wv


def test_intrinsic_metrics_and_user_files(wv, tmp_path):
    mine = tmp_path / "mypairs.tsv"
    mine.write_text("# my pairs\ntiger\tcat\t7.35\nking\tqueen\t8.5\nbook\tpaper\t7.46\nfoo bar baz\n")
    metrics = intrinsic_metrics(wv, similarity=[mine], restrict_vocab=1500)
    assert set(metrics) == {
        "ws353/spearman", "ws353/coverage", "simlex/spearman", "simlex/coverage",
        "mypairs/spearman", "mypairs/coverage",
        "analogy/total", "analogy/semantic", "analogy/syntactic", "analogy/covered",
    }  # fmt: skip
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["mypairs/coverage"] == 1.0
    assert metrics["analogy/total"] == evaluate_analogies(wv, gensim_test_file(GOOGLE_ANALOGIES), restrict_vocab=1500)["total"]
    table = format_table(metrics)
    assert "mypairs" in table and "spearman" in table and len({len(line) for line in table.splitlines()}) == 1

    with pytest.raises(UserError, match=r"nope\.tsv.*word1<TAB>word2<TAB>score"):
        intrinsic_metrics(wv, similarity=[tmp_path / "nope.tsv"])
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("this is not a pairs file\n")
    with pytest.raises(UserError, match=r"garbage\.txt.*word1<TAB>word2<TAB>score"):
        intrinsic_metrics(wv, similarity=[garbage])

    analogies = tmp_path / "mine.txt"
    analogies.write_text(": family\nboy girl brother sister\nxyzzy a b c\n: gram-test\nboy girl king queen\n")
    result = evaluate_analogies(wv, analogies)
    assert result["questions"] == 3 and result["covered"] == 2
    assert result["sections"]["family"] == {"correct": 1, "total": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text("boy girl brother sister\n")
    with pytest.raises(UserError, match="section"):
        evaluate_analogies(wv, bad)


@pytest.mark.parametrize("binary", [False, True])
def test_word2vec_format_round_trip(vocab, tmp_path, binary):
    words, vectors = vocab
    words, vectors = words[:300] + ["naïve"], np.vstack([vectors[:300], [np.float32(1e-38)] * DIM])
    vectors[0, :3] = [0.1, -1e30, np.float32(1) / 3]
    path = tmp_path / f"vectors.{'bin' if binary else 'txt'}"
    save_word2vec_format(path, words, vectors, binary=binary)
    kv = KeyedVectors.load_word2vec_format(str(path), binary=binary)
    assert kv.index_to_key == words
    assert np.array_equal(kv.vectors, vectors)
    ours = load_word2vec_format(path, binary=binary)
    assert ours.words == words
    assert np.array_equal(ours.vectors, vectors)
    # gensim's own files (no newline after binary vectors) load too
    kv.save_word2vec_format(str(tmp_path / "gensim"), binary=binary)
    assert np.array_equal(load_word2vec_format(tmp_path / "gensim", binary=binary).vectors, vectors)


def test_word2vec_format_errors(tmp_path):
    with pytest.raises(UserError, match="whitespace"):
        save_word2vec_format(tmp_path / "x.txt", ["ok", "two words"], np.zeros((2, 3)), binary=False)
    assert not (tmp_path / "x.txt").exists()
    for binary, content in [
        (False, b"hello\n"),
        (False, b"2 3\na 1 2 3\n"),
        (False, b"1 3\na 1 2\n"),
        (False, b"1 3\na 1 x 3\n"),
        (True, b"2 3\na " + np.zeros(3, "<f4").tobytes() + b"\nb " + b"\0" * 5),
        (True, b"1 3\na " + np.zeros(3, "<f4").tobytes() + b"\nextra"),
    ]:
        path = tmp_path / "bad"
        path.write_bytes(content)
        with pytest.raises(UserError, match="not a valid"):
            load_word2vec_format(path, binary=binary)
    with pytest.raises(UserError, match="does not exist"):
        load_word2vec_format(tmp_path / "missing", binary=True)


def test_plot_pca(vocab):
    words, vectors = vocab
    for n in (5, 400):
        png = plot_pca(words[:n], vectors[:n], title=f"{n} words", num_words=300)
        assert png.startswith(b"\x89PNG")
    with pytest.raises(UserError, match="at least 2"):
        plot_pca(words[:1], vectors[:1], title="one")
