"""Evaluation and export of word vectors (word2vec / GloVe): intrinsic benchmarks, word2vec files, PCA plots.

Plain numpy (and optionally torch tensors as input); no Lightning or Hydra, so it can be used on
any embedding matrix.
"""

from llmlab.evaluation.export import load_word2vec_format, plot_pca, save_word2vec_format
from llmlab.evaluation.word_vectors import (
    GOOGLE_ANALOGIES,
    SIMLEX999,
    WORDSIM353,
    WordVectors,
    evaluate_analogies,
    evaluate_word_pairs,
    format_table,
    gensim_test_file,
    intrinsic_metrics,
)

__all__ = [
    "GOOGLE_ANALOGIES",
    "SIMLEX999",
    "WORDSIM353",
    "WordVectors",
    "evaluate_analogies",
    "evaluate_word_pairs",
    "format_table",
    "gensim_test_file",
    "intrinsic_metrics",
    "load_word2vec_format",
    "plot_pca",
    "save_word2vec_format",
]
