"""ELMo: a character-CNN bidirectional LSTM language model and its layer mix.

References
----------
- Peters, Neumann, Iyyer, Gardner, Clark, Lee & Zettlemoyer 2018, "Deep contextualized word
  representations" (NAACL), §3.1 the biLM objective Σ_k [log p(t_k | t_<k) + log p(t_k | t_>k)] with
  the token representation Θ_x and the softmax Θ_s *shared* by two otherwise separate LSTM stacks;
  §3.2 ELMo_k = γ · Σ_j s_j h_{k,j} with s = softmax(w) and h_{k,0} = [x_k; x_k]; §3.4 the released
  model: 2 biLSTM layers of 4096 cells with 512-d projections, a residual connection from the first
  to the second layer, 2048 character n-gram filters, 2 highway layers, projection to 512.
- Kim, Jernite, Sontag & Rush 2016, "Character-Aware Neural Language Models": the char-CNN (one
  convolution per filter width, max-over-time pooling) followed by highway layers.
- Jozefowicz, Vinyals, Schuster, Shazeer & Wu 2016, "Exploring the Limits of Language Modeling":
  the CNN-input LSTMP language model ELMo's biLM is built from (cell/projection clipping at 3).
- Srivastava, Greff & Schmidhuber 2015, "Highway Networks": y = t ⊙ H(x) + (1 − t) ⊙ x with the
  transform-gate bias initialised negative so that every layer starts out close to the identity.
- Sak, Senior & Beaufays 2014: the LSTM with a recurrent projection layer (LSTMP).
- bilm-tf (AllenAI's reference code) and its ``2x4096_512_2048cnn_2xhighway`` options file; AllenNLP's
  ``ELMoCharacterMapper``: UTF-8 bytes and five marker characters, every id shifted by one so that
  0 means "no token".

Design
------
Plain PyTorch (no Lightning, no Hydra). Input is characters only — ``char_ids`` (B, T, 50) from
:func:`batch_to_char_ids` — so every word, seen or not, gets a vector. The word vocabulary exists
only in the output softmax (``vocab_size``), which is full (the paper used a sampled softmax over
793k words; a method can swap that in).

*Character ids* (AllenNLP's convention, so a converted pretrained model would read the same ids):
byte b of the word's UTF-8 encoding → b + 1; markers BOS 257, EOS 258, BOW 259, EOW 260, in-word
padding 261; 0 = a padded (absent) token. A word is [BOW, bytes[:48], EOW, 261 ...] (truncated so
that both markers always fit); the sentence markers ``<S>``/``</S>`` are [BOW, BOS|EOS, EOW, 261 ...].

*Token representation* (:class:`CharCNN`, shared by both directions): char embedding (16-d) → one
``Conv1d`` per (width, n_filters) → max over the 50 positions → ReLU (or tanh) → concatenation →
``n_highway`` :class:`Highway` layers → linear projection to ``projection_dim``.

*Two directions* (:class:`LSTMPLayer` stacks, *not* a bidirectional ``nn.LSTM``, so that every layer's
states are visible): the forward stack reads t_1..t_N, the backward stack reads each sequence
reversed *by its own length* (tokens are right-padded), so it starts at the last real token and
padding never reaches a real position in either direction. Layer j > 1 adds its input (residual,
``use_skip_connections``). Hidden states are [→h; ←h] per layer, (B, T, 2·projection_dim); layer 0
is [x; x], and padded positions are zero.

*Loss* (:meth:`ElmoBiLM.lm_loss`): the forward top state at k predicts t_{k+1}, the backward top
state at k predicts t_{k−1}; one shared ``softmax`` Linear; the mean cross-entropy of each direction
over its real targets is returned separately (their exp are the forward and backward perplexities;
the paper reports their average). Without sentence markers the first word is never predicted by
the forward LM and the last never by the backward LM: use ``add_sentence_boundaries=True``.

*LSTMP with clipping*: ``nn.LSTM(proj_size=...)`` is the fast fused kernel but cannot clip, so with
``cell_clip``/``proj_clip`` set (the paper: 3) :class:`LSTMPLayer` runs a step loop over the *same*
parameters (equal to the kernel when nothing is clipped; the tests check it). Parameter-count note:
``nn.LSTM`` has two bias vectors (``bias_ih``, ``bias_hh``) where bilm-tf has one, so each layer has
4·lstm_dim more parameters than the reference (65,536 for the paper's four layers).

*Seed preset* (spec §3, §7): the course script's declared sizes (2048-filter CNN, 2 highway, 512
projection, "4096" LSTM, dropout 0.3, 30k vocabulary) built correctly: its LSTM of 2048 cells
without projection (a ``hidden_dim // 2`` slip that crashes its decoders), its untied decoders, its
unused projections/residuals, its lower-cased character vocabulary without BOW/EOW markers and its
uninitialised highway gates are bugs and are not reproduced.

*Scalar mix* (:class:`ScalarMix`): γ · Σ_j softmax(s)_j h_j with s = 0, γ = 1 at init. s and γ belong
to the downstream task (the LM loss never trains them), so the mix is a separate module, not part
of :class:`ElmoBiLM`; :func:`contextual_vectors` applies one (or the plain layer mean).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.nn.losses import IGNORE_INDEX, cross_entropy

# ------------------------------------------------------------------------------------------------
# Character ids (AllenNLP / bilm-tf convention, shifted by +1 so that 0 = padded token)
# ------------------------------------------------------------------------------------------------
MAX_CHARACTERS_PER_TOKEN = 50
N_CHARACTERS = 262  # 256 bytes + 5 markers + the "no token" id 0
BOS_CHAR = 256 + 1  # begin-of-sentence character (inside the <S> token)
EOS_CHAR = 257 + 1  # end-of-sentence character (inside the </S> token)
BOW_CHAR = 258 + 1  # begin of word
EOW_CHAR = 259 + 1  # end of word
PAD_CHAR = 260 + 1  # padding after EOW inside a real token
BOS_TOKEN = "<S>"
EOS_TOKEN = "</S>"

ACTIVATIONS = ("relu", "tanh")


def _marker_token(marker: int, max_chars: int) -> list[int]:
    return [BOW_CHAR, marker, EOW_CHAR] + [PAD_CHAR] * (max_chars - 3)


def word_to_char_ids(word: str, max_chars: int = MAX_CHARACTERS_PER_TOKEN) -> list[int]:
    """``max_chars`` character ids of one token: [BOW, utf-8 bytes + 1 ..., EOW, PAD ...].

    Words longer than ``max_chars - 2`` bytes are truncated so that BOW and EOW always fit. The
    strings ``"<S>"`` and ``"</S>"`` map to the sentence-marker tokens. Never returns id 0 (that id
    marks an absent, padded token).
    """
    if max_chars < 3:
        raise ValueError(f"max_chars={max_chars} must be at least 3 (BOW, one character, EOW)")
    if word == BOS_TOKEN:
        return _marker_token(BOS_CHAR, max_chars)
    if word == EOS_TOKEN:
        return _marker_token(EOS_CHAR, max_chars)
    body = [b + 1 for b in word.encode("utf-8", errors="replace")[: max_chars - 2]]
    ids = [BOW_CHAR, *body, EOW_CHAR]
    return ids + [PAD_CHAR] * (max_chars - len(ids))


def batch_to_char_ids(
    sentences: Sequence[Sequence[str]],
    max_chars: int = MAX_CHARACTERS_PER_TOKEN,
    *,
    add_sentence_boundaries: bool = False,
    pad_to: int | None = None,
) -> torch.Tensor:
    """(B, T, max_chars) LongTensor of token lists, right-padded with all-zero tokens.

    T is the longest sentence (+2 with ``add_sentence_boundaries``, which wraps every sentence in
    ``<S>`` ... ``</S>``) or ``pad_to`` if that is larger.
    """
    rows = [
        [BOS_TOKEN, *s, EOS_TOKEN] if add_sentence_boundaries else list(s) for s in sentences
    ]
    T = max([len(r) for r in rows] + [pad_to or 0])
    out = torch.zeros((len(rows), T, max_chars), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            out[b, : len(row)] = torch.tensor([word_to_char_ids(w, max_chars) for w in row])
    return out


# ------------------------------------------------------------------------------------------------
# Config and presets
# ------------------------------------------------------------------------------------------------
PAPER_FILTERS = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))  # 2048 filters

PRESETS: dict[str, dict] = {
    # CPU-sized: 192 filters, 128-d projection, 256-cell LSTMs; 1.63M parameters with 2k words
    "elmo_tiny": dict(
        vocab_size=2000,
        filters=((1, 32), (2, 32), (3, 64), (4, 64)),
        n_highway=2,
        projection_dim=128,
        lstm_dim=256,
        n_layers=2,
        cell_clip=None,
        proj_clip=None,
        dropout=0.1,
    ),
    # the course seed's declared sizes, built without its bugs (see the module docstring)
    "elmo_seed": dict(
        vocab_size=30000,
        filters=PAPER_FILTERS,
        n_highway=2,
        projection_dim=512,
        lstm_dim=4096,
        n_layers=2,
        cell_clip=None,
        proj_clip=None,
        dropout=0.3,
    ),
    # Peters et al. 2018 / bilm-tf 2x4096_512_2048cnn_2xhighway; 1B Word Benchmark vocabulary
    "elmo_paper": dict(
        vocab_size=793471,
        filters=PAPER_FILTERS,
        n_highway=2,
        projection_dim=512,
        lstm_dim=4096,
        n_layers=2,
        cell_clip=3.0,
        proj_clip=3.0,
        dropout=0.1,
    ),
}


@dataclass
class ElmoConfig:
    """Sizes of the biLM; field names follow bilm-tf's options file (``lstm.dim``, ``char_cnn.filters`` ...)."""

    vocab_size: int  # words in the output softmax (the input side needs no word vocabulary)
    filters: tuple[tuple[int, int], ...] = PAPER_FILTERS  # (width, n_filters) per convolution
    n_characters: int = N_CHARACTERS  # character-embedding rows (id 0 = padded token)
    char_embed_dim: int = 16
    max_characters_per_token: int = MAX_CHARACTERS_PER_TOKEN
    activation: str = "relu"  # after max-over-time pooling: relu | tanh
    n_highway: int = 2
    projection_dim: int = 512  # token representation = LSTM projection = softmax input
    lstm_dim: int = 4096  # memory cells per LSTM layer and direction
    n_layers: int = 2  # LSTM layers per direction
    use_skip_connections: bool = True  # residual connection into every layer above the first
    cell_clip: float | None = 3.0  # clip the memory cell to ±cell_clip (None = off, fused kernel)
    proj_clip: float | None = 3.0  # clip the projected output to ±proj_clip (None = off)
    dropout: float = 0.1  # on every LSTM layer's input and on the softmax input

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_characters", "char_embed_dim", "max_characters_per_token",
                     "projection_dim", "lstm_dim", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} must be a positive integer")
        if isinstance(self.n_highway, bool) or not isinstance(self.n_highway, int) or self.n_highway < 0:
            raise UserError(f"model.n_highway={self.n_highway!r} must be a non-negative integer")
        try:  # Hydra hands over lists of lists
            self.filters = tuple((int(w), int(n)) for w, n in self.filters)
        except (TypeError, ValueError) as e:
            raise UserError(
                f"model.filters={self.filters!r} must be a list of [width, n_filters] pairs, "
                "e.g. [[1, 32], [2, 32], [3, 64]]"
            ) from e
        if not self.filters or any(w < 1 or n < 1 for w, n in self.filters):
            raise UserError(f"model.filters={self.filters!r}: need at least one filter, widths and counts >= 1")
        if self.max_characters_per_token < 3:
            raise UserError(
                f"model.max_characters_per_token={self.max_characters_per_token} must be at least 3 "
                "(BOW, one character, EOW)"
            )
        widest = max(w for w, _ in self.filters)
        if widest > self.max_characters_per_token:
            raise UserError(
                f"model.filters has width {widest} > max_characters_per_token="
                f"{self.max_characters_per_token}: narrow the filter or allow more characters per token"
            )
        if self.n_characters < N_CHARACTERS:
            raise UserError(
                f"model.n_characters={self.n_characters} must be at least {N_CHARACTERS} (bytes + markers)"
            )
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"model.activation={self.activation!r} is unknown: use one of {', '.join(ACTIVATIONS)}"
            )
        if self.projection_dim >= self.lstm_dim:
            raise UserError(
                f"model.projection_dim={self.projection_dim} must be smaller than model.lstm_dim="
                f"{self.lstm_dim} (an LSTMP projects the cells down)"
            )
        for name in ("cell_clip", "proj_clip"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                raise UserError(f"model.{name}={value!r} must be positive, or null to switch clipping off")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ElmoConfig:
        """``ElmoConfig.from_preset("elmo_tiny", vocab_size=500)``; names are the keys of :data:`PRESETS`."""
        if name not in PRESETS:
            raise UserError(f"unknown ELMo preset {name!r}: use one of {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown ElmoConfig field(s) {unknown}: use fields of ElmoConfig {sorted(known)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def n_filters(self) -> int:
        return sum(n for _, n in self.filters)

    @property
    def output_dim(self) -> int:
        """Size of every biLM layer's state and of the ELMo vector: [forward; backward]."""
        return 2 * self.projection_dim


# ------------------------------------------------------------------------------------------------
# Token representation: character CNN + highway + projection
# ------------------------------------------------------------------------------------------------
class Highway(nn.Module):
    """y = t ⊙ relu(W_H x + b_H) + (1 − t) ⊙ x, t = σ(W_T x + b_T), with b_T = ``gate_bias`` < 0.

    A negative transform-gate bias (−2: t ≈ 0.12) makes the layer start out carrying its input,
    as Srivastava et al. recommend and bilm-tf does; as b_T → −∞ the layer is the identity.
    """

    def __init__(self, dim: int, gate_bias: float = -2.0) -> None:
        super().__init__()
        self.gate_bias = gate_bias
        self.transform = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.transform.reset_parameters()
        self.gate.reset_parameters()
        nn.init.constant_(self.gate.bias, self.gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.gate(x))
        return t * F.relu(self.transform(x)) + (1.0 - t) * x


class CharCNN(nn.Module):
    """Character ids (..., C) → token vectors (..., projection_dim); see the module docstring."""

    def __init__(self, config: ElmoConfig) -> None:
        super().__init__()
        self.config = config
        self.char_embedding = nn.Embedding(config.n_characters, config.char_embed_dim, padding_idx=0)
        self.convolutions = nn.ModuleList(
            nn.Conv1d(config.char_embed_dim, n, kernel_size=w) for w, n in config.filters
        )
        self.activation = F.relu if config.activation == "relu" else torch.tanh
        self.highways = nn.ModuleList(Highway(config.n_filters) for _ in range(config.n_highway))
        self.projection = nn.Linear(config.n_filters, config.projection_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # bilm-tf: char embeddings U(-1, 1); the padding row stays 0 (it marks absent tokens)
            nn.init.uniform_(self.char_embedding.weight, -1.0, 1.0)
            self.char_embedding.weight[0].zero_()
        for m in (*self.convolutions, *self.highways, self.projection):
            m.reset_parameters()

    def forward(self, char_ids: torch.Tensor) -> torch.Tensor:
        lead = char_ids.shape[:-1]
        e = self.char_embedding(char_ids.reshape(-1, char_ids.size(-1)))  # (N, C, E)
        e = e.transpose(1, 2)  # (N, E, C): Conv1d wants channels first
        # max over time, then the (monotone) activation: same as activation first, cheaper
        pooled = [self.activation(conv(e).amax(dim=-1)) for conv in self.convolutions]  # [(N, n_i)]
        x = torch.cat(pooled, dim=-1)  # (N, n_filters)
        for highway in self.highways:
            x = highway(x)
        return self.projection(x).view(*lead, -1)  # (..., projection_dim)


# ------------------------------------------------------------------------------------------------
# One LSTMP layer
# ------------------------------------------------------------------------------------------------
class LSTMPLayer(nn.Module):
    """One unidirectional LSTM layer with a projection (batch-first, (B, T, in) → (B, T, proj)).

    The parameters are those of ``nn.LSTM(input_size, lstm_dim, proj_size=proj)`` (gate order i, f,
    g, o). Without clipping the fused kernel runs; with ``cell_clip``/``proj_clip`` a step loop over
    the same parameters clips c_t to ±cell_clip and h_t = W_hr(o ⊙ tanh c_t) to ±proj_clip.
    """

    def __init__(self, input_size: int, lstm_dim: int, proj_size: int,
                 cell_clip: float | None = None, proj_clip: float | None = None) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, lstm_dim, proj_size=proj_size, batch_first=True)
        self.cell_clip = cell_clip
        self.proj_clip = proj_clip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.lstm.reset_parameters()  # U(-1/sqrt(lstm_dim), 1/sqrt(lstm_dim))
        H = self.lstm.hidden_size
        with torch.no_grad():
            # biases 0 except the forget gate's, 1: the cell remembers by default (TF's forget_bias)
            self.lstm.bias_ih_l0.zero_()
            self.lstm.bias_hh_l0.zero_()
            self.lstm.bias_ih_l0[H : 2 * H].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cell_clip is None and self.proj_clip is None:
            with warnings.catch_warnings():  # torch notes once per process that oneDNN has no LSTMP path
                warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
                return self.lstm(x)[0]
        return self._step_loop(x)

    def _step_loop(self, x: torch.Tensor) -> torch.Tensor:
        lstm = self.lstm
        B, T, _ = x.shape
        # the input part of the gates for all steps at once; only W_hh h_{t-1} is sequential
        gates_x = F.linear(x, lstm.weight_ih_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)  # (B, T, 4H)
        h = x.new_zeros(B, lstm.proj_size)
        c = x.new_zeros(B, lstm.hidden_size)
        outputs = []
        for t in range(T):
            i, f, g, o = (gates_x[:, t] + F.linear(h, lstm.weight_hh_l0)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if self.cell_clip is not None:
                c = c.clamp(-self.cell_clip, self.cell_clip)
            h = F.linear(torch.sigmoid(o) * torch.tanh(c), lstm.weight_hr_l0)  # (B, proj)
            if self.proj_clip is not None:
                h = h.clamp(-self.proj_clip, self.proj_clip)
            outputs.append(h)
        return torch.stack(outputs, dim=1)  # (B, T, proj)


# ------------------------------------------------------------------------------------------------
# The bidirectional LM
# ------------------------------------------------------------------------------------------------
@dataclass
class ElmoOutput:
    """``hidden_states``: n_layers + 1 tensors (B, T, 2·projection_dim), layer 0 = [x; x], then
    [→h_j; ←h_j], zero at padded positions. ``mask`` (B, T) bool. The losses are set when
    ``input_ids`` were given."""

    hidden_states: tuple[torch.Tensor, ...]
    mask: torch.Tensor
    forward_loss: torch.Tensor | None = None
    backward_loss: torch.Tensor | None = None


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Lengths of right-padded sequences; refuses masks with holes or left padding."""
    lengths = mask.sum(dim=1)
    T = mask.size(1)
    prefix = torch.arange(T, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    if not torch.equal(prefix, mask):
        raise ValueError("attention_mask must be right-padded: 1 for the first len tokens of a row, then 0")
    return lengths


def _reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) time index reversing each row's first ``len`` positions and leaving padding in place
    (its own inverse)."""
    k = torch.arange(T, device=lengths.device).unsqueeze(0)  # (1, T)
    L = lengths.unsqueeze(1)  # (B, 1)
    return torch.where(k < L, L - 1 - k, k)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.size(-1)))  # (B, T, D)


class ElmoBiLM(nn.Module):
    """ELMo's biLM: shared :class:`CharCNN`, separate forward/backward :class:`LSTMPLayer` stacks,
    one shared softmax over ``vocab_size`` words. See the module docstring."""

    def __init__(self, config: ElmoConfig) -> None:
        super().__init__()
        self.config = config
        c = config

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                LSTMPLayer(c.projection_dim, c.lstm_dim, c.projection_dim, c.cell_clip, c.proj_clip)
                for _ in range(c.n_layers)
            )

        self.char_cnn = CharCNN(c)
        self.forward_layers = stack()
        self.backward_layers = stack()
        self.dropout = nn.Dropout(c.dropout)
        self.softmax = nn.Linear(c.projection_dim, c.vocab_size)  # shared by both directions
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.char_cnn.reset_parameters()
        for layer in (*self.forward_layers, *self.backward_layers):
            layer.reset_parameters()
        # bilm-tf: softmax weights N(0, 1/projection_dim), biases 0 -> initial loss close to ln V
        nn.init.normal_(self.softmax.weight, std=1.0 / math.sqrt(self.config.projection_dim))
        nn.init.zeros_(self.softmax.bias)

    @property
    def num_layers(self) -> int:
        """Number of representation layers for :class:`ScalarMix`: the token layer + the LSTM layers."""
        return self.config.n_layers + 1

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def num_params(self, exclude_softmax: bool = False) -> int:
        """Parameter count; ``exclude_softmax`` leaves out the vocabulary-sized output layer."""
        skip = {id(p) for p in self.softmax.parameters()} if exclude_softmax else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    # ------------------------------------------------------------------ forward
    def _run(self, layers: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
        states = []
        for i, layer in enumerate(layers):
            inp = self.dropout(x)
            out = layer(inp)  # (B, T, P)
            if i > 0 and self.config.use_skip_connections:
                out = out + inp  # residual (bilm-tf adds the dropped-out input)
            states.append(out)
            x = out
        return states

    def forward(
        self,
        char_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> ElmoOutput:
        """Per-layer states of ``char_ids`` (B, T, max_characters_per_token), right-padded.

        ``attention_mask`` (B, T), 1 = real token, defaults to "any character id is non-zero".
        With ``input_ids`` (B, T) word ids of the same tokens, the two LM losses are computed too
        (see :meth:`lm_loss`).
        """
        c = self.config
        if char_ids.dim() != 3 or char_ids.size(-1) != c.max_characters_per_token:
            raise ValueError(
                f"char_ids must have shape (batch, seq_len, {c.max_characters_per_token}), "
                f"got {tuple(char_ids.shape)}: encode tokens with batch_to_char_ids()"
            )
        B, T, _ = char_ids.shape
        mask = (char_ids != 0).any(dim=-1) if attention_mask is None else attention_mask.bool()
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} must be (batch, seq_len) = {(B, T)}")
        lengths = _lengths(mask)

        # the char-CNN only sees real tokens; padded positions are exactly 0
        x = char_ids.new_zeros((B, T, c.projection_dim), dtype=self.softmax.weight.dtype)
        x[mask] = self.char_cnn(char_ids[mask])  # (B, T, P)

        forward_states = self._run(self.forward_layers, x)
        reverse = _reverse_index(lengths, T)  # each row read back to front from its last real token
        reversed_states = self._run(self.backward_layers, _gather_time(x, reverse))
        backward_states = [_gather_time(h, reverse) for h in reversed_states]  # back to reading order

        keep = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        hidden = [torch.cat([x, x], dim=-1)]
        hidden += [torch.cat([f, b], dim=-1) * keep for f, b in zip(forward_states, backward_states)]
        out = ElmoOutput(tuple(hidden), mask)
        if input_ids is not None:
            out.forward_loss, out.backward_loss = self._losses(
                forward_states[-1], backward_states[-1], input_ids, mask
            )
        return out

    def _losses(self, top_fwd: torch.Tensor, top_bwd: torch.Tensor, input_ids: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.shape != mask.shape:
            raise ValueError(
                f"input_ids shape {tuple(input_ids.shape)} must be (batch, seq_len) = {tuple(mask.shape)}"
            )
        ids = input_ids.masked_fill(~mask, IGNORE_INDEX)  # padding is never a target
        fwd_targets = torch.full_like(ids, IGNORE_INDEX)
        fwd_targets[:, :-1] = ids[:, 1:]  # state at k predicts token k+1
        bwd_targets = torch.full_like(ids, IGNORE_INDEX)
        bwd_targets[:, 1:] = ids[:, :-1]  # state at k predicts token k-1
        bwd_targets.masked_fill_(~mask, IGNORE_INDEX)  # (a padded k would "predict" the last token)
        losses = []
        for top, targets in ((top_fwd, fwd_targets), (top_bwd, bwd_targets)):
            valid = targets != IGNORE_INDEX
            if bool(((targets < 0) & valid).any() | (targets >= self.config.vocab_size).any()):
                raise ValueError(
                    f"input_ids must be in [0, vocab_size={self.config.vocab_size}) (or -100 = ignore)"
                )
            logits = self.softmax(self.dropout(top[valid]))  # (N, V): only rows with a target
            losses.append(cross_entropy(logits, targets[valid]))
        return losses[0], losses[1]

    def lm_loss(
        self,
        char_ids: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward CE, backward CE): mean cross-entropy of each direction over its real targets.

        The forward LM predicts ``input_ids[k+1]`` from tokens ≤ k, the backward LM ``input_ids[k-1]``
        from tokens ≥ k; padded positions are neither inputs nor targets, and an input id of -100
        is never a target. NaN for a direction with no target at all (like ``F.cross_entropy``).
        """
        out = self(char_ids, attention_mask, input_ids=input_ids)
        return out.forward_loss, out.backward_loss


# ------------------------------------------------------------------------------------------------
# Scalar mix and the ELMo vectors
# ------------------------------------------------------------------------------------------------
class ScalarMix(nn.Module):
    """ELMo = γ · Σ_j softmax(s)_j · h_j over ``num_layers`` layers (paper eq. 1); s = 0, γ = 1 at init.

    ``layer_norm=True`` normalises each layer per token over its features (no affine) before
    mixing, as the paper suggests for some tasks. The paper's optional λ‖s‖² regulariser is
    ``lam * mix.scalar_parameters.pow(2).sum()`` in the task loss.
    """

    def __init__(self, num_layers: int, layer_norm: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.scalar_parameters = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(1))

    @property
    def weights(self) -> torch.Tensor:
        """softmax(s): the layer weights s_j, summing to 1."""
        return torch.softmax(self.scalar_parameters, dim=0)

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(layers) != self.num_layers:
            raise ValueError(f"ScalarMix expects {self.num_layers} layers, got {len(layers)}")
        h = torch.stack(list(layers), dim=0)  # (L+1, ..., D)
        if self.layer_norm:
            h = F.layer_norm(h, h.shape[-1:])
        w = self.weights.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))  # broadcast over (..., D)
        return self.gamma.to(h.dtype) * (w * h).sum(dim=0)


def contextual_vectors(
    model: ElmoBiLM,
    tokens: Sequence[Sequence[str]] | torch.Tensor,
    mix: ScalarMix | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    add_sentence_boundaries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELMo vectors (B, T, 2·projection_dim) and the mask (B, T) of real tokens.

    ``tokens`` are token lists or ready ``char_ids``; ``mix`` defaults to the plain mean of the
    layers (s uniform, γ = 1). With ``add_sentence_boundaries`` (token lists only) every sentence is
    wrapped in ``<S>`` ... ``</S>`` for the biLM, as in training, and the markers are dropped from
    the output. Gradients flow as usual (wrap in ``torch.no_grad()`` for frozen features).
    """
    if isinstance(tokens, torch.Tensor):
        if add_sentence_boundaries:
            raise ValueError("add_sentence_boundaries needs token lists, not char_ids")
        char_ids = tokens
    else:
        char_ids = batch_to_char_ids(
            tokens, model.config.max_characters_per_token, add_sentence_boundaries=add_sentence_boundaries
        )
    char_ids = char_ids.to(model.softmax.weight.device)
    out = model(char_ids, attention_mask)
    mix = mix if mix is not None else ScalarMix(model.num_layers).to(char_ids.device)
    vectors, mask = mix(out.hidden_states), out.mask
    if add_sentence_boundaries:  # token k of the sentence sits at position k + 1, </S> at len - 1
        mask = mask[:, 2:]
        vectors = vectors[:, 1:-1]
    return vectors * mask.unsqueeze(-1).to(vectors.dtype), mask
