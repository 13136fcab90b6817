"""Span corruption: T5's unsupervised pretraining objective (Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", §3.1.4 and Figure 2; the
noise mask is the reference ``random_spans_noise_mask`` of the T5 code base, §3.3.4).

About 15 % of the tokens (``noise_density``) are dropped out in contiguous spans of mean length 3
(``mean_noise_span_length``). The encoder input keeps the other tokens and replaces each dropped
span with one sentinel token; the decoder target lists the dropped spans, each preceded by the
sentinel that replaced it, then one final sentinel. Both end with EOS::

    original: Thank you for inviting me to your party last week .
    inputs:   Thank you <X> me to your party <Y> week . </s>
    targets:  <X> for inviting <Y> last <Z> </s>

The mask is not i.i.d. per token. Its sizes are exact, so every example costs the same:
``num_noise = round(n * density)`` (at least 1, at most ``n - 1``) noise tokens in
``num_spans = round(num_noise / mean_span_length)`` (at least 1) spans. Both the noise tokens and
the kept tokens are split into ``num_spans`` non-empty runs by a uniformly random composition, and
the runs alternate kept, noise, kept, noise ..., so two spans never touch and the sequence starts
with a kept token. :func:`compute_input_and_target_lengths` inverts the sizes: how many raw tokens
to read so that the corrupted input is exactly ``inputs_length`` long.

Sentinels ``<extra_id_0> .. <extra_id_99>`` are the *top* ids of the vocabulary in Hugging Face's
descending order: ``<extra_id_i> = vocab_size - 1 - i`` (32099 .. 32000 for the T5 tokenizer,
whose ``vocab_size`` is 32,100; the model's embedding is padded to 32,128, which does not matter
here). Text tokens must therefore be ids below ``vocab_size - num_sentinels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmlab.errors import UserError
from llmlab.nn.losses import IGNORE_INDEX

NUM_SENTINELS = 100  # <extra_id_0> .. <extra_id_99>

RNG = np.random.Generator | torch.Generator | int | None


def _as_rng(rng: RNG) -> np.random.Generator:
    """A numpy Generator from a numpy/torch generator or a seed (None = fresh entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        # draw the numpy seed from the torch generator, so the torch generator's state decides
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
    return np.random.default_rng(rng)


def _check_args(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise UserError(f"noise_density={noise_density} must be in (0, 1) (T5: 0.15)")
    if not mean_noise_span_length >= 1.0:
        raise UserError(f"mean_noise_span_length={mean_noise_span_length} must be >= 1 (T5: 3)")


def noise_span_counts(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` that :func:`random_spans_noise_mask` uses for ``length``.

    Python's ``round`` (half to even), as in the T5 reference. Sequences of length 1 are treated as
    length 2 and the mask is cut back (so they get no noise at all).
    """
    _check_args(noise_density, mean_noise_span_length)
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    # each span needs one noise token and one kept token before it; only bites for extreme settings
    num_spans = min(num_spans, num_noise, length - num_noise)
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty runs."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False) + 1)  # distinct cut points
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, rng: RNG = None
) -> np.ndarray:
    """Boolean mask ``(length,)``, True = noise, with exactly the counts of :func:`noise_span_counts`.

    Noise spans and kept runs alternate (kept first), so spans are never adjacent.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise UserError(f"cannot corrupt a sequence of length {length!r}: it needs at least one token")
    gen = _as_rng(rng)
    padded = max(int(length), 2)
    num_noise, num_spans = noise_span_counts(padded, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, gen)
    kept_lengths = _random_segmentation(padded - num_noise, num_spans, gen)
    runs = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, kept, noise ...
    is_noise = np.repeat(np.tile([False, True], num_spans), runs)
    return is_noise[:length]


def compute_input_and_target_lengths(
    inputs_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    *,
    final_sentinel: bool = True,
) -> tuple[int, int]:
    """``(tokens_length, targets_length)``: read ``tokens_length`` raw tokens so that the corrupted
    input (kept tokens + one sentinel per span + EOS) is exactly ``inputs_length`` long; the target
    (noise tokens + one sentinel per span + the final sentinel + EOS) is then ``targets_length``.

    This is the T5 reference computation: the largest raw length whose input fits. The input
    length grows by 0 or 1 per extra raw token, so the fit is exact. ``final_sentinel=False`` gives
    the reference's target length, whose targets have no final sentinel (e.g. 512 -> (568, 114)).
    """
    _check_args(noise_density, mean_noise_span_length)
    if isinstance(inputs_length, bool) or not isinstance(inputs_length, int) or inputs_length < 3:
        raise UserError(f"inputs_length={inputs_length!r} must be an integer >= 3 (a token, a sentinel, EOS)")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
        num_kept = tokens_length - num_noise
        return num_kept + num_spans + 1, num_noise + num_spans + int(final_sentinel) + 1

    # 2 raw tokens always fit (1 kept + 1 sentinel + EOS = 3); the T5 reference starts the search at
    # inputs_length, which overshoots for short inputs with a single noise span
    tokens_length = 2
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def sentinel_id(i: int, vocab_size: int) -> int:
    """Id of ``<extra_id_i>``: ``vocab_size - 1 - i`` (Hugging Face's descending order)."""
    return vocab_size - 1 - i


def _as_array(tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise UserError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
    return arr


def corrupt_with_mask(
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    noise_mask: Sequence[bool] | np.ndarray,
    vocab_size: int,
    eos_id: int = 1,
    num_sentinels: int = NUM_SENTINELS,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` for a given noise mask; each maximal run of noise is one span."""
    tokens = _as_array(tokens)
    mask = np.asarray(noise_mask, dtype=bool)
    if mask.shape != tokens.shape:
        raise UserError(f"noise mask shape {mask.shape} does not match the {tokens.shape} tokens")
    first_sentinel = vocab_size - num_sentinels  # ids >= this are sentinels
    if tokens.size and (tokens.min() < 0 or tokens.max() >= first_sentinel):
        raise UserError(
            f"token ids must lie in [0, {first_sentinel}): ids {first_sentinel}..{vocab_size - 1} are the "
            f"{num_sentinels} sentinels <extra_id_*>; give vocab_size including the sentinels"
        )
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    span_index = np.cumsum(starts) - 1  # which span a noise token belongs to
    num_spans = int(starts.sum())
    if num_spans + 1 > num_sentinels:  # one per span plus the final one
        raise UserError(
            f"{num_spans} noise spans need {num_spans + 1} sentinels but only {num_sentinels} exist: "
            "use shorter sequences or a larger mean_noise_span_length"
        )
    sentinels = vocab_size - 1 - span_index  # <extra_id_k> of each noise token's span
    keep_in_input = ~mask | starts  # kept tokens, and the first token of a span becomes its sentinel
    inputs = np.where(starts, sentinels, tokens)[keep_in_input]
    # targets: the sentinel, then the span's tokens, for every span; then a final sentinel
    pairs = np.stack([np.where(starts, sentinels, -1), tokens], axis=1)  # (n, 2): sentinel or -1, token
    body = pairs[mask].reshape(-1)
    body = body[body != -1]
    targets = np.concatenate([body, [sentinel_id(num_spans, vocab_size), eos_id]])
    return np.append(inputs, eos_id), targets.astype(np.int64)


def span_corruption(
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    vocab_size: int,
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    eos_id: int = 1,
    num_sentinels: int = NUM_SENTINELS,
    rng: RNG = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one sequence of token ids (no EOS yet): ``(inputs, targets)``, each ending with EOS."""
    tokens = _as_array(tokens)
    mask = random_spans_noise_mask(tokens.size, noise_density, mean_noise_span_length, rng)
    return corrupt_with_mask(tokens, mask, vocab_size, eos_id, num_sentinels)


def uncorrupt(
    inputs: Sequence[int] | np.ndarray | torch.Tensor,
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    vocab_size: int,
    *,
    eos_id: int = 1,
    num_sentinels: int = NUM_SENTINELS,
) -> np.ndarray:
    """The original tokens back from ``(inputs, targets)``: every sentinel in the input is replaced
    by what follows the same sentinel in the target, up to the next sentinel or EOS. Trailing EOS
    and padding after it are ignored. A sentinel missing from the target (an incomplete model
    prediction) becomes an empty span."""
    inputs, targets = _as_array(inputs), _as_array(targets)
    first_sentinel = vocab_size - num_sentinels

    def until_eos(x: np.ndarray) -> np.ndarray:
        hits = np.flatnonzero(x == eos_id)
        return x[: hits[0]] if hits.size else x

    inputs, targets = until_eos(inputs), until_eos(targets)
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets.tolist():
        if t >= first_sentinel:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs.tolist():
        out.extend(spans.get(t, []) if t >= first_sentinel else [t])
    return np.asarray(out, dtype=np.int64)


@dataclass
class SpanCorruptionCollator:
    """Batches for T5 pretraining: a list of raw token sequences -> padded tensors.

    Each sequence (ideally ``compute_input_and_target_lengths(inputs_length)[0]`` tokens long) is
    corrupted with a fresh mask; ``input_ids`` are right-padded with ``pad_id`` (``attention_mask``
    1 = real token), ``labels`` with -100, so the loss skips padding. The decoder inputs are the
    labels shifted right (:meth:`llmlab.models.t5.T5.shift_right`). Draws come from
    ``numpy.random.default_rng(seed)`` in call order, so a run is reproducible.
    """

    vocab_size: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    pad_id: int = 0
    eos_id: int = 1
    num_sentinels: int = NUM_SENTINELS
    seed: int | None = 0

    def __post_init__(self) -> None:
        _check_args(self.noise_density, self.mean_noise_span_length)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, batch: Sequence[Sequence[int] | np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        pairs = [
            span_corruption(
                seq,
                self.vocab_size,
                noise_density=self.noise_density,
                mean_noise_span_length=self.mean_noise_span_length,
                eos_id=self.eos_id,
                num_sentinels=self.num_sentinels,
                rng=self.rng,
            )
            for seq in batch
        ]
        S = max(len(i) for i, _ in pairs)
        T = max(len(t) for _, t in pairs)
        input_ids = torch.full((len(pairs), S), self.pad_id, dtype=torch.long)
        labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
        for row, (inp, tgt) in enumerate(pairs):
            input_ids[row, : len(inp)] = torch.from_numpy(inp)
            labels[row, : len(tgt)] = torch.from_numpy(tgt)
        attention_mask = torch.zeros_like(input_ids)
        for row, (inp, _) in enumerate(pairs):
            attention_mask[row, : len(inp)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
