"""Word vectors (word2vec / GloVe output) and their standard intrinsic benchmarks.

* :class:`WordVectors` — a vocabulary plus a V×d float32 matrix, with cosine neighbours and
  analogies.
* :func:`evaluate_word_pairs` — Spearman/Pearson correlation of cosine similarity with human
  judgements (WordSim-353, SimLex-999, or any file in the same tab-separated format).
* :func:`evaluate_analogies` — accuracy on Google's analogy questions (Mikolov et al. 2013,
  "Efficient Estimation of Word Representations in Vector Space").
* :func:`intrinsic_metrics` — all of the above as one flat ``{"bench/metric": float}`` dict.

The benchmark files are the copies shipped inside gensim (:func:`gensim_test_file`), and the
numbers are computed exactly as gensim's ``KeyedVectors.evaluate_word_pairs`` /
``evaluate_word_analogies`` compute them, so results are comparable with published gensim runs —
but with numpy only: gensim is slow to import and its analogy loop does one query at a time.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmlab.errors import UserError

if TYPE_CHECKING:
    import torch

WORDSIM353 = "wordsim353.tsv"
SIMLEX999 = "simlex999.txt"
GOOGLE_ANALOGIES = "questions-words.txt"

PAIRS_FORMAT = "one pair per line: word1<TAB>word2<TAB>score, lines starting with '#' are comments"
ANALOGY_FORMAT = "': section' header lines, then one question per line: a b c expected"

_BATCH = 1024  # analogy questions scored per matrix multiply


class WordVectors:
    """A vocabulary and its embedding matrix: row ``i`` of ``vectors`` is the vector of ``words[i]``.

    ``words`` are in frequency order, most frequent first: ``restrict_vocab=N`` means "the N most
    frequent words", as in word2vec.c's ``compute-accuracy`` and gensim.

    ``vectors`` is a private float32 copy (read-only), so the cached unit-normalised matrix used
    for every cosine can never go stale.
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray | torch.Tensor):
        if hasattr(vectors, "detach"):  # a torch.Tensor; no torch import needed for numpy input
            vectors = vectors.detach().cpu().float().numpy()
        vectors = np.array(vectors, dtype=np.float32, copy=True)
        words = list(words)
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"need a ({len(words)}, d) matrix for {len(words)} words, got shape {vectors.shape}")
        vectors.flags.writeable = False
        self.words = words
        self.vectors = vectors
        self.index = {w: i for i, w in enumerate(words)}
        if len(self.index) != len(words):
            dup = next(w for i, w in enumerate(words) if self.index[w] != i)
            raise ValueError(f"word {dup!r} appears more than once in the vocabulary")
        self._unit: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self._row(word)]

    def __repr__(self) -> str:
        return f"WordVectors({len(self):,} words, dim={self.dim})"

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def unit(self) -> np.ndarray:
        """Rows scaled to unit L2 norm (zero rows stay zero, so their cosine with anything is 0).

        Computed as ``v / ||v||`` in float32, bit-identical to gensim's normalised vectors.
        """
        if self._unit is None:
            norms = np.linalg.norm(self.vectors, axis=1)
            unit = self.vectors / np.where(norms > 0, norms, 1)[:, None]
            unit.flags.writeable = False
            self._unit = unit
        return self._unit

    def _row(self, word: str) -> int:
        try:
            return self.index[word]
        except KeyError:
            raise UserError(
                f"{word!r} is not in the vocabulary of {len(self):,} words: try another word"
            ) from None

    def similarity(self, w1: str, w2: str) -> float:
        """Cosine similarity of two words."""
        return float(self.unit[self._row(w1)] @ self.unit[self._row(w2)])

    def most_similar(
        self,
        query: str | np.ndarray,
        topn: int = 10,
        exclude: Iterable[str] = (),
        restrict_vocab: int | None = None,
    ) -> list[tuple[str, float]]:
        """The ``topn`` words of highest cosine similarity to ``query`` (a word or a vector).

        A word query never returns itself; words in ``exclude`` are never returned either.
        ``restrict_vocab`` searches only the first (most frequent) rows.
        """
        excluded = [self.index[w] for w in exclude if w in self.index]
        if isinstance(query, str):
            excluded.append(self._row(query))
            q = self.unit[self._row(query)]
        else:
            q = np.asarray(query, dtype=np.float32)
            if q.shape != (self.dim,):
                raise UserError(f"query vector has shape {q.shape}, the word vectors have dimension {self.dim}")
            q = _unit_rows(q[None])[0]
        return self._nearest(q, topn, excluded, restrict_vocab)

    def analogy(
        self, a: str, b: str, c: str, topn: int = 10, restrict_vocab: int | None = None
    ) -> list[tuple[str, float]]:
        """"a is to b as c is to ?" by 3CosAdd: argmax_x cos(x, b̂ − â + ĉ), x ∉ {a, b, c}.

        The vector-offset method of Mikolov et al. (2013, "Linguistic Regularities in Continuous
        Space Word Representations"); the name 3CosAdd is from Levy & Goldberg (2014, "Linguistic
        Regularities in Sparse and Explicit Word Representations"). Same ranking as gensim's
        ``most_similar(positive=[b, c], negative=[a])``.
        """
        rows = [self._row(w) for w in (a, b, c)]
        q = _unit_rows(_offset(self.unit, *(np.array([r]) for r in rows)))[0]
        return self._nearest(q, topn, rows, restrict_vocab)

    def _nearest(
        self, q: np.ndarray, topn: int, excluded: list[int], restrict_vocab: int | None
    ) -> list[tuple[str, float]]:
        n = len(self) if restrict_vocab is None else max(0, min(restrict_vocab, len(self)))
        scores = self.unit[:n] @ q
        keep = np.ones(n, dtype=bool)
        keep[[i for i in excluded if i < n]] = False
        candidates = np.flatnonzero(keep)
        k = min(topn, len(candidates))
        if k <= 0:
            return []
        cand_scores = scores[candidates]
        top = np.argpartition(-cand_scores, k - 1)[:k]
        top = top[np.argsort(-cand_scores[top], kind="stable")]
        return [(self.words[candidates[i]], float(cand_scores[i])) for i in top]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32)


def _offset(unit: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """b̂ − â + ĉ for index arrays a, b, c, summed in gensim's order ((b̂ + ĉ) − â) in float32."""
    return unit[b] + unit[c] - unit[a]


def gensim_test_file(name: str) -> Path:
    """Path of ``gensim/test/test_data/<name>`` (WordSim-353, SimLex-999, Google's analogies ...).

    Found with ``importlib.util.find_spec`` so gensim is never imported (that takes seconds).
    """
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the benchmark file {name!r} ships with gensim, which is not installed: pip install gensim"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "test" / "test_data" / name
        if path.is_file():
            return path
    raise UserError(f"gensim's test data has no file {name!r} (looked in {root}/test/test_data): reinstall gensim")


# --------------------------------------------------------------------------- word-pair similarity


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy's ``method='average'``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new_group) - 1]
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when undefined (fewer than 2 points or a constant input)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    xm, ym = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xm @ xm) * float(ym @ ym))
    if denom == 0:
        return math.nan
    return float(np.clip((xm @ ym) / denom, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho = Pearson's r of the (tie-averaged) ranks; NaN when undefined."""
    if len(x) < 2:
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def _read_lines(path: str | os.PathLike, what: str, fmt: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except FileNotFoundError:
        raise UserError(f"{what} file {str(path)!r} does not exist (expected format: {fmt})") from None
    except IsADirectoryError:
        raise UserError(f"{what} file {str(path)!r} is a directory (expected format: {fmt})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} file {str(path)!r} is not UTF-8 text ({e.reason}); expected format: {fmt}") from None


def _lookup(wv: WordVectors, n: int, case_insensitive: bool) -> dict[str, int]:
    """Key → row among the first ``n`` words; with ``case_insensitive`` keys are upper-cased and the
    first (most frequent) case variant wins, exactly as in gensim."""
    lookup: dict[str, int] = {}
    for i, w in enumerate(wv.words[:n]):
        lookup.setdefault(w.upper() if case_insensitive else w, i)
    return lookup


def evaluate_word_pairs(wv: WordVectors, path: str | os.PathLike, *, case_insensitive: bool = True) -> dict:
    """Correlation of cosine similarity with human similarity scores (WordSim-353, SimLex-999 ...).

    Parsing follows gensim's ``KeyedVectors.evaluate_word_pairs``: tab-separated
    ``word1 word2 score`` lines, ``#`` lines skipped, other unparsable lines skipped, pairs with an
    out-of-vocabulary word skipped (gensim's ``dummy4unknown=False``). Unlike gensim, the whole
    vocabulary is searched (gensim's default ``restrict_vocab=300000``).

    Returns ``spearman``, ``pearson`` (NaN if fewer than 2 pairs are scored), ``pairs`` (scored),
    ``total`` (valid lines), ``coverage`` (pairs/total) and ``oov_ratio`` (percent, like gensim).
    """
    lookup = _lookup(wv, len(wv), case_insensitive)
    gold, rows_a, rows_b = [], [], []
    total = 0
    for line in _read_lines(path, "word-pair similarity", PAIRS_FORMAT):
        if line.startswith("#"):
            continue
        fields = [f.upper() for f in line.split("\t")] if case_insensitive else line.split("\t")
        if len(fields) != 3:
            continue
        a, b, score = fields
        try:
            score = float(score)
        except ValueError:
            continue
        total += 1
        if a in lookup and b in lookup:
            gold.append(score)
            rows_a.append(lookup[a])
            rows_b.append(lookup[b])
    if total == 0:
        raise UserError(f"no word pairs could be parsed from {str(path)!r}: expected {PAIRS_FORMAT}")
    unit = wv.unit
    model = np.einsum("ij,ij->i", unit[rows_a], unit[rows_b]) if gold else np.zeros(0, np.float32)
    pairs = len(gold)
    return {
        "spearman": spearman(gold, model),
        "pearson": pearson(gold, model),
        "pairs": pairs,
        "total": total,
        "coverage": pairs / total,
        "oov_ratio": (total - pairs) / total * 100,
    }


# --------------------------------------------------------------------------- analogies


def _parse_analogies(path: str | os.PathLike, case_insensitive: bool) -> list[tuple[str, list[tuple[str, ...]]]]:
    """``[(section name, [(a, b, c, expected), ...]), ...]`` from a Google analogy file."""
    sections: list[tuple[str, list[tuple[str, ...]]]] = []
    for line_no, line in enumerate(_read_lines(path, "analogy", ANALOGY_FORMAT), start=1):
        if line.startswith(": "):
            sections.append((line.lstrip(": ").strip(), []))
            continue
        words = line.upper().split() if case_insensitive else line.split()
        if not sections:
            if words:
                raise UserError(
                    f"line {line_no} of {str(path)!r} comes before the first ': section' header: expected {ANALOGY_FORMAT}"
                )
            continue
        if len(words) == 4:  # anything else is skipped, as gensim does
            sections[-1][1].append(tuple(words))
    if not any(questions for _, questions in sections):
        raise UserError(f"no analogy questions could be parsed from {str(path)!r}: expected {ANALOGY_FORMAT}")
    return sections


class _Variants:
    """All rows of each case-variant group ("Paris", "paris", "PARIS"), for masking them at once."""

    def __init__(self, group: np.ndarray):
        self.order = np.argsort(group, kind="stable")  # rows sorted by group
        self.start = np.searchsorted(group[self.order], np.arange(len(group)))
        self.size = np.bincount(group, minlength=len(group))

    def mask(self, reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays (question, row) of every variant of ``reps[i]``, for ``scores[...] = -inf``."""
        counts = self.size[reps]
        question = np.repeat(np.arange(len(reps)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return question, self.order[np.repeat(self.start[reps], counts) + within]


def _accuracy(correct: int, total: int) -> float:
    return correct / total if total else 0.0


def evaluate_analogies(
    wv: WordVectors,
    path: str | os.PathLike,
    *,
    restrict_vocab: int | None = 30000,
    case_insensitive: bool = True,
) -> dict:
    """Accuracy on "a is to b as c is to ?" questions (Google's analogy test set, Mikolov et al. 2013).

    Mirrors gensim's ``evaluate_word_analogies`` (and word2vec.c's ``compute-accuracy``): only the
    ``restrict_vocab`` most frequent words are used, a question with any word outside them is
    skipped, the answer is the 3CosAdd argmax over those words excluding a, b and c (and, when
    ``case_insensitive``, their other case variants), and it is correct if it equals ``expected``.

    Questions are scored in batches: one (batch × restrict_vocab) matrix multiply each.

    Returns ``total``/``semantic``/``syntactic`` accuracies (syntactic = the ``gram*`` sections,
    semantic = the rest; 0.0 when nothing was covered), ``covered`` (questions scored),
    ``questions`` (valid questions in the file) and ``sections`` ``{name: {"correct", "total"}}``.
    """
    sections = _parse_analogies(path, case_insensitive)
    n = len(wv) if restrict_vocab is None else max(0, min(restrict_vocab, len(wv)))
    lookup = _lookup(wv, n, case_insensitive)
    # group[i] = row of the case variant that represents word i (i itself when case-sensitive)
    group = np.array([lookup[w.upper() if case_insensitive else w] for w in wv.words[:n]], dtype=np.int64)
    variants = _Variants(group)
    unit = wv.unit[:n]

    covered_q, covered_sec = [], []
    for s, (_, questions) in enumerate(sections):
        for q in questions:
            if all(w in lookup for w in q):
                covered_q.append([lookup[w] for w in q])
                covered_sec.append(s)
    q_rows = np.array(covered_q, dtype=np.int64).reshape(-1, 4)
    is_correct = np.zeros(len(q_rows), dtype=bool)
    for start in range(0, len(q_rows), _BATCH):
        a, b, c, expected = q_rows[start : start + _BATCH].T
        scores = _unit_rows(_offset(unit, a, b, c)) @ unit.T  # (batch, n) cosines
        batch = np.arange(len(a))
        for rows in (a, b, c):
            scores[variants.mask(rows)] = -np.inf
        best = scores.argmax(axis=1)
        is_correct[start : start + _BATCH] = (group[best] == expected) & np.isfinite(scores[batch, best])

    per_section = np.zeros((len(sections), 2), dtype=np.int64)  # correct, total
    np.add.at(per_section, (np.array(covered_sec, dtype=np.int64), 0), is_correct.astype(np.int64))
    np.add.at(per_section, (np.array(covered_sec, dtype=np.int64), 1), 1)
    result_sections: dict[str, dict[str, int]] = {}
    for (name, _), (correct, total) in zip(sections, per_section.tolist()):
        entry = result_sections.setdefault(name, {"correct": 0, "total": 0})
        entry["correct"] += correct
        entry["total"] += total

    def acc(select) -> float:
        chosen = [v for k, v in result_sections.items() if select(k)]
        return _accuracy(sum(v["correct"] for v in chosen), sum(v["total"] for v in chosen))

    return {
        "total": acc(lambda name: True),
        "semantic": acc(lambda name: not name.startswith("gram")),
        "syntactic": acc(lambda name: name.startswith("gram")),
        "covered": len(q_rows),
        "questions": sum(len(questions) for _, questions in sections),
        "sections": result_sections,
    }


# --------------------------------------------------------------------------- all together


def intrinsic_metrics(
    wv: WordVectors,
    *,
    similarity: Iterable[str | os.PathLike] | None = None,
    analogies: str | os.PathLike | None = None,
    restrict_vocab: int | None = 30000,
) -> dict[str, float]:
    """WordSim-353, SimLex-999, extra similarity files and an analogy file as flat float metrics.

    Keys: ``ws353/spearman``, ``ws353/coverage``, ``simlex/spearman``, ``simlex/coverage``,
    ``<file stem>/spearman``, ``<file stem>/coverage`` for each file in ``similarity``, and
    ``analogy/{total,semantic,syntactic,covered}`` (Google's analogies unless ``analogies`` names
    another file in that format).
    """
    if isinstance(similarity, (str, os.PathLike)):
        similarity = [similarity]
    pair_files = {"ws353": gensim_test_file(WORDSIM353), "simlex": gensim_test_file(SIMLEX999)}
    for path in similarity or ():
        name = Path(path).stem
        if name in pair_files:
            raise UserError(f"similarity file {str(path)!r} has the same name {name!r} as another benchmark: rename it")
        pair_files[name] = Path(path)
    metrics: dict[str, float] = {}
    for name, path in pair_files.items():
        result = evaluate_word_pairs(wv, path)
        metrics[f"{name}/spearman"] = result["spearman"]
        metrics[f"{name}/coverage"] = result["coverage"]
    result = evaluate_analogies(
        wv, analogies if analogies is not None else gensim_test_file(GOOGLE_ANALOGIES), restrict_vocab=restrict_vocab
    )
    for key in ("total", "semantic", "syntactic", "covered"):
        metrics[f"analogy/{key}"] = float(result[key])
    return metrics


_COUNTS = {"covered", "pairs", "questions"}


def format_table(metrics: dict[str, float]) -> str:
    """``{"bench/metric": value}`` as an aligned plain-text table (benchmark | metric | value)."""
    rows = [("benchmark", "metric", "value")]
    for key, value in metrics.items():
        bench, _, metric = key.rpartition("/")
        if metric in _COUNTS and float(value).is_integer():
            text = f"{int(value):,}"
        else:
            text = f"{value:.4f}"
        rows.append((bench or "-", metric, text))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
