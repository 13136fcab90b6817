"""Helpers of the ``llmlab bench`` tests: run a bench's ``main`` in-process, read its Markdown table."""

from __future__ import annotations

import contextlib
import io
import re


def run_main(module, argv: list[str]) -> tuple[str, str, int]:
    """``module.main(argv)`` -> (stdout, stderr, exit code)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return out.getvalue(), err.getvalue(), code


def table_rows(text: str) -> dict[str, list[str]]:
    """benchmark label -> its three number cells, from the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] not in ("benchmark", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(re.fullmatch(r"([0-9.]+)×?", cell).group(1))


def check_lines(text: str) -> list[str]:
    """The parity-check lines under the table."""
    return [line for line in text.splitlines() if line.startswith("- ") and "—" in line]
