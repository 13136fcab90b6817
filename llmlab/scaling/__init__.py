"""Scaling laws (seed §11.3.1): the published laws and compute-optimal allocation (:mod:`.laws`), fits of
Kaplan's and Chinchilla's laws to your own runs (:mod:`.fit`, figures in :mod:`.plots`)."""

from llmlab.scaling.fit import Point, bootstrap, collect, fit_isoflop, fit_kaplan, fit_parametric, run_fit
from llmlab.scaling.laws import PRESETS, ChinchillaLaw, KaplanLaw, twenty_tokens_rule

__all__ = ["PRESETS", "ChinchillaLaw", "KaplanLaw", "Point", "bootstrap", "collect", "fit_isoflop", "fit_kaplan",
           "fit_parametric", "run_fit", "twenty_tokens_rule"]
