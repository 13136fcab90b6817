"""Decoding: next-token sampling rules, the autoregressive generation loop and beam search."""

from llmlab.inference.beam import beam_search, validate_beam_args
from llmlab.inference.generate import generate
from llmlab.inference.sampling import sample_next, top_k_filter, top_p_filter, validate_sampling_args

__all__ = ["beam_search", "generate", "sample_next", "top_k_filter", "top_p_filter", "validate_beam_args",
           "validate_sampling_args"]
