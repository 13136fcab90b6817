"""Every config composes, and every key is commented (configs teach)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_every_key_has_a_comment():
    bare = []
    for path in sorted(CONF.rglob("*.yaml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*[A-Za-z_.]+:", line) and "#" not in line:
                bare.append(f"{path.relative_to(CONF)}:{n}: {line.strip()}")
    assert not bare, "\n".join(bare)


def test_every_experiment_starts_with_its_command():
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_"
        command = f"# llmlab train experiment={path.stem}"
        assert lines[1] == command or lines[1].startswith(command + " "), path  # + what it requires (model.init_from=...)


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_model_presets_compose(option):
    from llmlab.models.elmo import PRESETS as ELMO_PRESETS
    from llmlab.models.elmo import ElmoConfig
    from llmlab.models.gpt import GPTConfig

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={option}"])
    from llmlab.models.build import ARCHS, LOADING_KEYS

    assert cfg.model.arch in ARCHS
    if cfg.model.arch in ("word2vec", "glove"):  # sizes interpolate the method's keys (gensim's names)
        cfg = compose_with(f"model={option}", f"method={option}")
        assert cfg.model.vector_size == cfg.method.vector_size
        return
    fields = {k: v for k, v in cfg.model.items() if k not in LOADING_KEYS}
    fields["vocab_size"] = fields["vocab_size"] or 50257
    if option.startswith("elmo"):  # the YAML is the preset of llmlab.models.elmo
        config = ElmoConfig(**fields)
        assert config == ElmoConfig(**{**ELMO_PRESETS[option], "vocab_size": 50257})
    elif option.startswith("bert"):
        from llmlab.models.bert import BERT_PRESETS, BertConfig

        expected = BertConfig(**BERT_PRESETS[option])
        assert BertConfig(**{**fields, "vocab_size": expected.vocab_size}) == expected
    elif option.startswith("t5"):
        from llmlab.models.t5 import PRESETS as T5_PRESETS
        from llmlab.models.t5 import T5Config

        T5Config(**{**fields, "vocab_size": T5_PRESETS[option].get("vocab_size") or 32128})
    else:
        GPTConfig(**fields)  # validates head/width divisibility


def test_gpt2_124m_preset_has_gpt2_small_size():
    import torch

    from llmlab.models.build import build_model

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["model=gpt2_124m", "tokenizer=gpt2"])
    with torch.device("meta"):
        model = build_model(dict(cfg.model), vocab_size=50257)
    assert model.num_params() == 124_439_808
