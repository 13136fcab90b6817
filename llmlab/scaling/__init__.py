"""Scaling laws (seed §11.3.1): the published laws and compute-optimal allocation (:mod:`.laws`)."""

from llmlab.scaling.laws import PRESETS, ChinchillaLaw, KaplanLaw, twenty_tokens_rule

__all__ = ["PRESETS", "ChinchillaLaw", "KaplanLaw", "twenty_tokens_rule"]
