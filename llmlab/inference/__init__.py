"""Decoding: next-token sampling rules and the autoregressive generation loop."""

from llmlab.inference.generate import generate
from llmlab.inference.sampling import sample_next, top_k_filter, top_p_filter, validate_sampling_args

__all__ = ["generate", "sample_next", "top_k_filter", "top_p_filter", "validate_sampling_args"]
