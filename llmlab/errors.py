"""User-facing errors.

A :class:`UserError` is bad input (a missing file, an unknown option, a corrupt checkpoint ...).
The CLI prints it as one line, ``error: <message>``, and exits with code 2 — no traceback.
Write the message so that it names the problem *and* the fix.
"""


class UserError(Exception):
    """Bad input from the user; the message names the problem and how to fix it."""

    exit_code = 2
