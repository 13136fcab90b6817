"""VADER sentiment scores (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text", ICWSM; PyPI ``vaderSentiment``).

A lexicon of ~7,500 rated words plus rules (negation, "but", intensifiers, capitals, "!"): no
training, no download, deterministic — the "true" reward of llmlab's sentiment-control task
("continue this line joyfully", the classic RLHF demo of Ziegler et al. 2019 with a lexicon in place
of a classifier), used both to build preference data from real lines and to score PPO rollouts.
``compound`` is the normalised sum of the valences in [-1, 1] (>= 0.05 positive, <= -0.05 negative,
the authors' thresholds).
"""

from __future__ import annotations

from functools import lru_cache

from llmlab.errors import UserError

__all__ = ["FIELDS", "analyzer", "compound", "polarity"]

FIELDS = ("compound", "pos", "neu", "neg")  # what SentimentIntensityAnalyzer.polarity_scores returns


@lru_cache(maxsize=1)
def analyzer():
    """One SentimentIntensityAnalyzer per process (loading the lexicon takes ~0.1 s)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise UserError("VADER sentiment needs the Python package vaderSentiment: run "
                        "`pip install vaderSentiment==3.3.2` (a dependency of llmlab: make install)") from None
    return SentimentIntensityAnalyzer()


def polarity(texts: list[str], field: str = "compound") -> list[float]:
    """``field`` (compound | pos | neu | neg) of each text's VADER scores."""
    if field not in FIELDS:
        raise UserError(f"VADER field {field!r} is unknown: use one of {', '.join(FIELDS)}")
    a = analyzer()
    return [float(a.polarity_scores(str(t))[field]) for t in texts]


def compound(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (higher = more positive)."""
    return polarity(texts, "compound")
