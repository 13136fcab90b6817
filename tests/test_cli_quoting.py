"""Prose overrides (text=, prompt=, query=, analogy=) reach the task verbatim, whatever they contain."""

from __future__ import annotations

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from llmlab.cli import quote_free_text

PROSE = [
    "Thank you <extra_id_0> me to your party <extra_id_1> week.",  # < > break Hydra's lexer unquoted
    "to be, or not to [MASK]",  # , would make a sweep, [ ] a list
    "o'er the king's crown",
    "a \\n escape and a trailing backslash \\",
    "mixed 'quotes' and \\' backslash-quote",
]


@pytest.mark.parametrize("value", PROSE)
@pytest.mark.parametrize("key", ["text", "prompt", "query", "analogy"])
def test_prose_values_round_trip_through_hydra(key, value):
    parsed = OverridesParser.create().parse_override(quote_free_text(f"{key}={value}"))
    assert parsed.key_or_group == key and parsed.value() == value


@pytest.mark.parametrize("arg", ["model=gpt_nano", "prompt=", "text='already quoted'", 'text="already"', "trainer.max_steps=5"])
def test_other_overrides_are_untouched(arg):
    assert quote_free_text(arg) == arg


def test_multirun_flag_may_come_after_overrides():
    from llmlab.cli import hydra_argv

    assert hydra_argv("train", ["data=text", "-m", "model.n_head=3,4"]) == [
        "llmlab train", "-m", "data=text", "model.n_head=3,4"]
    assert hydra_argv("train", ["--cfg", "job", "prompt=a, b"]) == ["llmlab train", "--cfg", "job", "prompt='a, b'"]
