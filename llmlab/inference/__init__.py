"""Decoding: next-token sampling rules, the autoregressive generation loop, beam search, speculative
decoding, the paged KV cache and the continuous-batching engine."""

from llmlab.inference.beam import CausalLMSteps, beam_search, run_beam_search, validate_beam_args
from llmlab.inference.engine import Completion, Engine, RequestOutput, SamplingParams
from llmlab.inference.generate import generate
from llmlab.inference.paged import KVCacheOOM, PagedKVCache, PagedLM, paged_attention
from llmlab.inference.processors import apply_processors
from llmlab.inference.sampling import sample_next, top_k_filter, top_p_filter, validate_sampling_args
from llmlab.inference.speculative import SpecStats, speculative_generate
from llmlab.inference.stopping import StopStrings

__all__ = ["CausalLMSteps", "Completion", "Engine", "KVCacheOOM", "RequestOutput", "SamplingParams", "PagedKVCache", "PagedLM", "SpecStats", "StopStrings", "apply_processors", "beam_search", "run_beam_search", "generate", "paged_attention",
           "sample_next", "speculative_generate", "top_k_filter", "top_p_filter", "validate_beam_args",
           "validate_sampling_args"]
