"""Synthetic labelled data of the seed's prompt-tuning demos (spec seed000_part2 §1.3).

``sentiment_examples(n, seed)`` is ``create_synthetic_sentiment_data`` of the seed's
``prompt_tuning_methods.py`` (soft prompt tuning, Lester et al. 2021; P-Tuning v2, Liu et al. 2022):
``n`` rows alternating one positive (label 1) and one negative (label 0) sentence, each drawn at
random from five fixed templates. With only ten distinct sentences, accuracy on a random split
measures memorisation, not generalisation: it is a smoke test that a tuner can steer the model at all
(the spec's §12 targets: soft prompt >= 0.95, P-Tuning v2 >= 0.9).

``data=sentiment`` (conf/data/sentiment.yaml) feeds these rows to
:class:`~llmlab.data.classification.LabeledDataModule` through its ``generator`` key.
"""

from __future__ import annotations

import random

POSITIVE = (
    "This movie is absolutely fantastic and wonderful",
    "I really love this product, it works great",
    "The service was excellent and very satisfying",
    "Amazing quality, highly recommend to everyone",
    "Best experience ever, truly outstanding performance",
)
NEGATIVE = (
    "This is terrible and completely disappointing",
    "I hate this product, it does not work at all",
    "The worst service I have ever experienced",
    "Very bad quality, do not recommend anyone",
    "Awful experience, totally waste of money",
)


def sentiment_examples(n: int = 1000, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"text": ..., "label": 1 | 0}``: even rows positive, odd rows negative, each a
    template drawn with a ``seed``-ed generator (same seed, same rows)."""
    rng = random.Random(int(seed))
    return [{"text": rng.choice(POSITIVE if k % 2 == 0 else NEGATIVE), "label": 1 if k % 2 == 0 else 0}
            for k in range(int(n))]
