"""Export word vectors: the word2vec.c file format (text and binary) and a 2-D PCA picture.

The word2vec format is what word2vec.c writes and what gensim's
``KeyedVectors.load_word2vec_format`` (and most other tools) read:

* header ``"{V} {d}\\n"``;
* text: one ``word v1 v2 ... vd\\n`` line per word, values printed so float32 round-trips exactly;
* binary: ``word`` + ``b" "`` + d little-endian float32s + ``b"\\n"`` per word.

Words are separated from their vector by whitespace, so words containing whitespace cannot be
stored and are rejected rather than silently producing a corrupt file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmlab.errors import UserError
from llmlab.evaluation.word_vectors import WordVectors
from llmlab.utils import atomic_write_bytes, png_bytes

_F32 = np.dtype("<f4")


def _as_matrix(words: Sequence[str], vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):  # torch.Tensor
        vectors = vectors.detach().cpu().float().numpy()
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise UserError(f"need a ({len(words)}, d) matrix for {len(words)} words, got shape {vectors.shape}")
    return vectors


def save_word2vec_format(path: str | os.PathLike, words: Sequence[str], vectors, *, binary: bool) -> Path:
    """Write ``words`` and their ``vectors`` (V×d) in word2vec.c's format, atomically."""
    words = list(words)
    vectors = _as_matrix(words, vectors)
    for w in words:
        if not w or any(ch.isspace() for ch in w):
            raise UserError(
                f"cannot save word {w!r} in word2vec format: words must be non-empty and contain no whitespace"
            )
    header = f"{len(words)} {vectors.shape[1]}\n".encode()
    if binary:
        rows = vectors.astype(_F32)
        body = b"".join(w.encode() + b" " + row.tobytes() + b"\n" for w, row in zip(words, rows))
    else:
        # str(np.float32) is the shortest decimal that parses back to the same float32
        body = "".join(f"{w} {' '.join(map(str, row))}\n" for w, row in zip(words, vectors)).encode()
    return atomic_write_bytes(path, header + body)


def load_word2vec_format(path: str | os.PathLike, *, binary: bool) -> WordVectors:
    """Read a word2vec.c-format file (as written by :func:`save_word2vec_format`, word2vec.c or gensim)."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"word-vector file {str(path)!r} does not exist") from None

    def malformed(why: str) -> UserError:
        kind = "binary" if binary else "text"
        return UserError(f"{str(path)!r} is not a valid {kind} word2vec file: {why}")

    header, newline, body = data.partition(b"\n")
    try:
        n, dim = (int(x) for x in header.split())
    except ValueError:
        raise malformed(f"the first line should be '<vocabulary size> <dimension>', got {header[:60]!r}") from None
    if n < 0 or dim <= 0 or not newline:
        raise malformed(f"bad header {header.decode(errors='replace')!r}")

    words: list[str] = []
    if binary:
        vectors = np.empty((n, dim), dtype=np.float32)
        pos, width = 0, dim * _F32.itemsize
        for i in range(n):
            while body[pos : pos + 1] == b"\n":  # word2vec.c ends each vector with a newline, gensim doesn't
                pos += 1
            space = body.find(b" ", pos)
            if space < 0 or len(body) - (space + 1) < width:
                raise malformed(f"the header promises {n:,} words but the file ends after {i:,}")
            word = _decode(body[pos:space], malformed)
            if not word or any(ch.isspace() for ch in word):
                raise malformed(f"word {i + 1} is {word!r}")
            words.append(word)
            vectors[i] = np.frombuffer(body, dtype=_F32, count=dim, offset=space + 1)
            pos = space + 1 + width
        if body[pos:].strip():
            raise malformed(f"unexpected data after the {n:,} words the header promises")
    else:
        lines = body.split(b"\n")
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != n:
            raise malformed(f"the header promises {n:,} words but there are {len(lines):,} lines")
        vectors = np.empty((n, dim), dtype=np.float32)
        for i, line in enumerate(lines):
            parts = _decode(line, malformed).rstrip().split(" ")
            if len(parts) != dim + 1:
                raise malformed(f"line {i + 2} has {len(parts) - 1} values, expected {dim}")
            if not parts[0]:
                raise malformed(f"line {i + 2} does not start with a word")
            words.append(parts[0])
            try:
                vectors[i] = np.array(parts[1:], dtype=np.float32)
            except ValueError:
                raise malformed(f"line {i + 2} has a value that is not a number") from None
    if len(set(words)) != len(words):
        raise malformed("a word appears more than once")
    return WordVectors(words, vectors)


def _decode(raw: bytes, malformed) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(f"{raw[:40]!r} is not UTF-8") from None


def plot_pca(
    words: Sequence[str],
    vectors,
    *,
    title: str,
    num_words: int = 300,
    annotate_every: int | None = None,
) -> bytes:
    """PNG bytes of the ``num_words`` most frequent words projected on their first two principal components.

    PCA is an SVD of the centred rows; the axis labels give each component's share of the variance.
    Every ``annotate_every``-th word is labelled (default: ~50 labels, every word when fewer than 50
    are plotted). Drawn on a private Agg canvas, so matplotlib's global backend is left alone.
    """
    words = list(words)
    vectors = _as_matrix(words, vectors)
    if len(words) < 2:
        raise UserError(f"a PCA plot needs at least 2 words, got {len(words)}")
    n = min(num_words, len(words))
    if n < 2:
        raise UserError(f"a PCA plot needs num_words >= 2, got {num_words}")
    if annotate_every is not None and annotate_every < 1:
        raise UserError(f"annotate_every must be >= 1, got {annotate_every}")
    x = vectors[:n].astype(np.float64)
    x -= x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    coords = np.zeros((n, 2))
    k = min(2, len(s))
    coords[:, :k] = u[:, :k] * s[:k]
    variance = s**2
    share = np.zeros(2)
    if variance.sum() > 0:
        share[:k] = variance[:k] / variance.sum() * 100

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 10))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], alpha=0.6, s=20)
    step = annotate_every if annotate_every is not None else max(1, n // 50)
    for i in range(0, n, step):
        ax.annotate(words[i], (coords[i, 0], coords[i, 1]), fontsize=8)
    ax.set_xlabel(f"PC1 ({share[0]:.2f}% variance)")
    ax.set_ylabel(f"PC2 ({share[1]:.2f}% variance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return png_bytes(fig, dpi=150)
